"""The replica layout of a vLLM model, computed from the trainer's tensor specs.

vLLM keeps the projections of a decoder layer fused: ``q_proj``/``k_proj``/``v_proj`` become
one ``qkv_proj`` (rows of q, then k, then v) and ``gate_proj``/``up_proj`` one ``gate_up_proj``;
with tied embeddings there is no ``lm_head.weight`` of its own. ``vllm_layout`` builds that
mapping (plus the cast to the served dtype) as a list of ``DstTensor``s for ``WeightPlan``, so
the publisher writes the bytes vLLM's parameters hold; ``check_vllm_layout`` compares it with
what a running vLLM worker reports before any update is accepted. No vLLM import here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tensorfabric.weights._errors import LayoutError
from tensorfabric.weights._layout import DstTensor, Layout, TensorSpec, fuse, same_layout

#: vLLM's fused parameters and the checkpoint tensors they are made of, in row order
FUSED: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def vllm_layout(source: Sequence[TensorSpec], *, dtype: str | None = None,
                tied_embeddings: bool = True) -> list[DstTensor]:
    """The vLLM parameters of a model whose trainer tensors are ``source`` (Hugging Face
    names, e.g. ``model.layers.0.self_attn.q_proj.weight``), cast to ``dtype`` (the dtype the
    server was started with; default: keep the trainer's).

    Every group of ``q_proj``/``k_proj``/``v_proj`` (and ``gate_proj``/``up_proj``) tensors with
    the same prefix and suffix (``.weight``, ``.bias``) becomes one fused tensor concatenated
    along dim 0. ``lm_head.weight`` is left out when ``tied_embeddings`` (vLLM ties it to
    ``embed_tokens``). A group with a member missing raises ``LayoutError``.
    """
    names = [s.name for s in source]
    if tied_embeddings:
        names = [n for n in names if n != "lm_head.weight"]
    by_name = {s.name: s for s in source}
    dest = same_layout([by_name[n] for n in names], dtype=dtype)
    present = set(names)
    for name in names:
        module, _, suffix = name.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        for fused, members in FUSED.items():
            if leaf != members[0]:
                continue
            group = [f"{parent}.{m}.{suffix}" if parent else f"{m}.{suffix}" for m in members]
            missing = [g for g in group if g not in present]
            if missing:
                raise LayoutError(f"vLLM fuses {list(members)} into {fused!r}, but the trainer "
                                  f"has no {missing[0]!r}")
            target = f"{parent}.{fused}.{suffix}" if parent else f"{fused}.{suffix}"
            dest = fuse(dest, target, group, axis=0)
    for name in names:  # a member seen without its group's first tensor
        leaf = name.rpartition(".")[0].rpartition(".")[2]
        for fused, members in FUSED.items():
            if leaf in members[1:] and any(d.name == name for d in dest):
                raise LayoutError(f"vLLM fuses {list(members)} into {fused!r}, but the trainer "
                                  f"has {name!r} without its {members[0]!r}")
    return dest


#: tensors whose rows are the vocabulary, which vLLM pads (``VocabParallelEmbedding``: to a
#: multiple of ``VOCAB_PADDING`` rows, vLLM's ``DEFAULT_VOCAB_PADDING_SIZE``); the trainer's
#: tensor fills the first rows, vLLM's padding stays as is
VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight")
VOCAB_PADDING = 64


def vocab_padded(name: str, have: Sequence[int], want: Sequence[int]) -> bool:
    """True when ``have`` (vLLM's parameter) is ``want`` (the trainer's shape) with its rows
    padded the way vLLM pads a vocabulary: up to the next multiple of ``VOCAB_PADDING``. The
    trainer's rows then fill its first rows. Any other difference in rows is a mismatch."""
    padded = -(-int(want[0]) // VOCAB_PADDING) * VOCAB_PADDING if want else 0
    return (name.endswith(VOCAB_TENSORS) and len(have) == len(want) >= 1
            and tuple(have[1:]) == tuple(want[1:]) and 0 < want[0] < have[0] == padded)


def check_vllm_layout(layout: Layout, expected: Mapping[str, tuple[Sequence[int], str]]) -> None:
    """Raise ``LayoutError`` unless every tensor of ``layout`` is a parameter the vLLM worker
    reported (``expected``: name -> (shape, dtype), from its model) with the same shape and
    dtype; a vocabulary tensor (``VOCAB_TENSORS``) may have fewer rows than vLLM's, when vLLM's are
    its rows padded to a multiple of 64 (``vocab_padded``).
    Parameters the layout does not cover are allowed (their values stay those loaded at
    start); the message lists the first few problems."""
    problems = []
    for spec in layout.specs:
        if spec.name not in expected:
            problems.append(f"{spec.name}: not a parameter of the vLLM model")
            continue
        shape, dtype = expected[spec.name]
        if (tuple(shape) != spec.shape and not vocab_padded(spec.name, shape, spec.shape)) \
                or dtype != spec.dtype:
            problems.append(f"{spec.name}: vLLM has {tuple(shape)} {dtype}, the plan "
                            f"{spec.shape} {spec.dtype}")
    if problems:
        raise LayoutError("the plan does not match the vLLM model: " + "; ".join(problems[:4])
                          + (f" (+{len(problems) - 4} more)" if len(problems) > 4 else ""))
