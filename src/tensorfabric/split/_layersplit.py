"""Layer-split inference: the edge runs layers [0, k), the cloud runs [k, n) plus the head.

A :class:`LayerStage` is a contiguous slice of a Llama-style decoder (``model.model.layers``)
with its own KV cache per sequence, so the edge and the cloud each keep the cache of their
layers and only the hidden states of the new tokens cross the link (``T x hidden_size`` fp32
for the prompt, then ``hidden_size`` floats per generated token).

The stages call the same modules, in the same order, with the same arguments as the model's own
``forward``; the split output is identical to running the whole model in one place (the
integration test checks token ids and logits).

Hidden states are not anonymous: activation inversion recovers a large share of prompt tokens
from early layers. PII is scrubbed from the text before either mode runs.
"""

from __future__ import annotations

import copy
from typing import Any

from ._errors import SplitConfigError

__all__ = ["LayerStage", "split_stages"]


class LayerStage:
    """Layers ``[start, end)`` of ``model``; the first stage embeds, the last one norms and
    projects to logits. Stateless apart from the per-sequence caches it hands out."""

    def __init__(self, model: Any, start: int, end: int) -> None:
        inner: Any = getattr(model, "model", None)
        layers: Any = getattr(inner, "layers", None)
        if layers is None or not hasattr(inner, "rotary_emb"):
            raise SplitConfigError(
                f"layer split needs a Llama-style decoder (model.model.layers, rotary_emb); "
                f"{type(model).__name__} is not one; use mode: route"
            )
        n = len(layers)
        if not 0 <= start < end <= n:
            raise SplitConfigError(
                f"layer_split.layers_at_edge must be within 1..{n - 1} for this model "
                f"({n} layers), got a stage [{start}, {end})"
            )
        self.start, self.end, self.total = start, end, n
        self.first, self.last = start == 0, end == n
        cfg = copy.deepcopy(model.config)
        cfg.num_hidden_layers = end - start
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = list(cfg.layer_types)[start:end]
        self.config = cfg
        if start == 0:
            self.layers = list(layers[start:end])
        else:
            # A private copy renumbered from 0, so this stage's cache holds only its layers.
            self.layers = [copy.deepcopy(layer) for layer in layers[start:end]]
            for layer in self.layers:
                for mod in layer.modules():
                    if isinstance(getattr(mod, "layer_idx", None), int):
                        mod.layer_idx -= start
        self.embed: Any = inner.embed_tokens if self.first else None
        self.rotary: Any = inner.rotary_emb
        self.norm: Any = inner.norm if self.last else None
        self.lm_head: Any = model.lm_head if self.last else None
        self.hidden_size = int(model.config.hidden_size)

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def forward(self, x: Any, cache: Any, pos0: int) -> Any:
        """``x``: token ids ``[1, T]`` (first stage) or hidden states ``[1, T, H]``.

        Returns hidden states ``[1, T, H]``, or the last position's logits ``[V]`` for the last
        stage. ``pos0`` is the number of tokens already in ``cache``.
        """
        import torch
        from transformers.masking_utils import create_causal_mask

        with torch.inference_mode():
            h = self.embed(x) if self.first else x
            pos = (torch.arange(h.shape[1]) + pos0).unsqueeze(0)
            mask = create_causal_mask(
                config=self.config,
                inputs_embeds=h,
                attention_mask=None,
                past_key_values=cache,
                position_ids=pos,
            )
            pe = self.rotary(h, position_ids=pos)
            for layer in self.layers:
                h = layer(
                    h,
                    attention_mask=mask,
                    position_embeddings=pe,
                    position_ids=pos,
                    past_key_values=cache,
                    use_cache=True,
                )
            if not self.last:
                return h
            # Project every position, as the model's own forward does: a GEMM over fewer rows
            # may round differently, and the split must match the whole model bit for bit.
            return self.lm_head(self.norm(h))[0, -1].float()


def split_stages(model: Any, layers_at_edge: int) -> tuple[LayerStage, LayerStage]:
    """(edge stage, cloud stage) for ``model`` split after ``layers_at_edge`` layers."""
    n = len(model.model.layers)
    return LayerStage(model, 0, layers_at_edge), LayerStage(model, layers_at_edge, n)
