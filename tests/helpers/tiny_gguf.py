"""A small Llama GGUF for tests that exercise the model cache or vLLM's weight updates, not
the model.

``write_tiny_gguf(path)`` copies the default model's metadata (chat template, special tokens)
and the first ``VOCAB`` tokens of its byte-level BPE vocabulary with the merges among them
(specials, the 256 bytes, common pieces), and writes 4 layers of width 64 in float32 with
seeded random weights: well under a megabyte (``sizes=VLLM_SIZES``: width 256, which vLLM's
CPU attention takes, ~5 MB). transformers reads and converts it like any
GGUF, tokenizer included; the default model's 49,152-token vocabulary alone takes transformers
~20 s of CPU to convert, its weights as long again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

VOCAB = 1000
SIZES = {"vocab_size": VOCAB, "block_count": 4, "embedding_length": 64, "feed_forward_length": 128,
         "attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 16}
#: the smallest shape vLLM's CPU attention takes (head size 64; 16 is not among its sizes)
VLLM_SIZES = {**SIZES, "embedding_length": 256, "feed_forward_length": 512,
              "rope.dimension_count": 64}


def write_tiny_gguf(path: Path, seed: int = 0, sizes: dict[str, int] | None = None) -> Path:
    """``sizes``: the shape (``SIZES`` by default, ``VLLM_SIZES`` for a model vLLM serves)."""
    import gguf

    from tensorfabric.models import default_model_path

    sizes = SIZES if sizes is None else sizes

    src = gguf.GGUFReader(str(default_model_path()))
    w = gguf.GGUFWriter(str(path), "llama")
    for key, field in src.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        name = key.removeprefix("llama.")
        if name in sizes:
            w.add_uint32(key, sizes[name])
            continue
        if key == "general.file_type":
            w.add_uint32(key, 0)  # all float32
            continue
        types = field.types
        value = field.contents()
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
            value = value[:VOCAB]
        elif key == "tokenizer.ggml.merges":
            kept = set(src.fields["tokenizer.ggml.tokens"].contents()[:VOCAB])
            value = [m for m in value if m.replace(" ", "") in kept
                     and all(part in kept for part in m.split(" "))]
        if types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, types[0], sub_type=types[1])
        else:
            w.add_key_value(key, value, types[0])
    h, f, heads, kv = (sizes[k] for k in ("embedding_length", "feed_forward_length",
                                          "attention.head_count", "attention.head_count_kv"))
    kv_dim = h // heads * kv
    rng = np.random.default_rng(seed)

    def t(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    w.add_tensor("token_embd.weight", t(VOCAB, h))
    w.add_tensor("output_norm.weight", np.ones(h, np.float32))
    for i in range(sizes["block_count"]):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", np.ones(h, np.float32))
        w.add_tensor(b + "ffn_norm.weight", np.ones(h, np.float32))
        w.add_tensor(b + "attn_q.weight", t(h, h))
        w.add_tensor(b + "attn_k.weight", t(kv_dim, h))
        w.add_tensor(b + "attn_v.weight", t(kv_dim, h))
        w.add_tensor(b + "attn_output.weight", t(h, h))
        w.add_tensor(b + "ffn_gate.weight", t(f, h))
        w.add_tensor(b + "ffn_up.weight", t(f, h))
        w.add_tensor(b + "ffn_down.weight", t(h, f))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
