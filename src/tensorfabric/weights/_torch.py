"""torch glue: a model's weights as a name -> tensor mapping, and models bound to slot memory.

Binding makes a model's parameters *views* of a slot (no copy): the replica keeps one model per
slot, and a lease hands out the model of the active version. Needs ``pip install 'tensorfabric[llm]'``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("tensorfabric.weights' torch support needs torch: "
                          "pip install 'tensorfabric[llm]'") from exc
    return torch


def model_tensors(model: Any) -> dict[str, Any]:
    """The model's parameters and persistent buffers, one entry per distinct tensor (tied
    weights such as lm_head/embed_tokens appear once, under their first name)."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = t.detach()
    return out


def _as_torch(arr: np.ndarray, dtype: str) -> Any:
    torch = _torch()
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def bind_torch(factory: Callable[[], Any], dtypes: dict[str, str] | None = None
               ) -> Callable[[int, dict[str, np.ndarray]], Any]:
    """A ``Subscriber(bind=...)`` hook: builds a model with ``factory()`` for each slot and makes
    its weights views of that slot. ``dtypes`` maps names to layout dtypes (default: taken from
    the views; bf16 views, stored as uint16, must be listed)."""

    def bind(slot: int, views: dict[str, np.ndarray]) -> Any:
        torch = _torch()
        model = factory()
        names = dict(model.state_dict(keep_vars=True))
        by_id: dict[int, Any] = {}
        for full, t in names.items():
            canonical = next(n for n, u in names.items() if u is t)
            if canonical not in views:
                continue  # e.g. lm_head.weight, tied to the embeddings by tie_weights() below
            if id(t) not in by_id:
                dtype = (dtypes or {}).get(canonical, str(views[canonical].dtype))
                view = _as_torch(views[canonical], dtype)
                by_id[id(t)] = (torch.nn.Parameter(view, requires_grad=False)
                                if isinstance(t, torch.nn.Parameter) else view)
            owner_name, _, leaf = full.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            if isinstance(by_id[id(t)], torch.nn.Parameter):
                owner._parameters[leaf] = by_id[id(t)]
            else:
                owner._buffers[leaf] = by_id[id(t)]
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        missing = [n for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
        if missing:
            raise KeyError(f"the slot layout lacks {missing[:3]} that the model needs")
        return model.eval()

    return bind
