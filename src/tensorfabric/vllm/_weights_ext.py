"""The vLLM worker side of weight updates: a worker extension (``--worker-extension-cls``).

vLLM mixes ``WeightsExtension`` into its worker class; the methods below are reached through
``collective_rpc`` (our middleware in the API server process calls them, see
``_weights_http``), which vLLM runs in the worker's own thread *between* engine steps. Each
worker owns a tensorfabric Engine and a single-slot ``Subscriber``: the publisher's one-sided
writes land in that staging region while vLLM keeps serving the version it loaded; a verified
version is switched in by ``tf_weights_switch``. Where every staged tensor maps 1:1 onto a
parameter (the plan writes vLLM's own layout: fused qkv/gate_up, served dtype), the switch puts
it there in place: live parameters (norms, embeddings) are copied into, and the linear layers
that vLLM's CPU backend packed away (an empty ``.weight`` next to a oneDNN kernel holding its
own packed copy) get their kernel rebuilt from the staged tensor by the layer's own
``quant_method.process_weights_after_loading``; then the tied LM head is repacked. Otherwise
(or with ``TENSORFABRIC_VLLM_SWITCH=reload``) it hands the staged tensors to vLLM's
``model_runner.reload_weights``, which re-runs the weight loaders and repacking (3-4x slower
on the CPU backend). Nothing here patches vLLM.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import tensorfabric as tf
from tensorfabric._errors import ConfigError
from tensorfabric.weights import Layout, LayoutError, NoVersionError, Subscriber
from tensorfabric.weights._plan import weights_key
from tensorfabric.weights._vllm_layout import check_vllm_layout, vocab_padded

log = logging.getLogger("tensorfabric.vllm.weights")

#: the value of ``--worker-extension-cls``
EXTENSION_CLS = "tensorfabric.vllm._weights_ext.WeightsExtension"
_DTYPES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}
_MAX_REJECTED = 8


class _State:
    """Per-worker state (the extension has no ``__init__`` of its own: vLLM builds the worker)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.engine: Any = None
        self.sub: Subscriber | None = None
        self.publisher = ""
        self.serving = 0  # the version vLLM's model holds (0: the one it loaded at start)
        self.switches = 0
        self.last_switch_s = 0.0
        self.last_path = ""  # "in-place" or "reload": how the last switch loaded the version


class WeightsExtension:
    """Methods vLLM's worker gains; call them with ``collective_rpc("tf_weights_...")``."""

    def _tf_state(self) -> _State:
        st = getattr(self, "_tf_weights_state", None)
        if st is None:
            st = _State()
            self._tf_weights_state = st
        return st

    def _tf_model(self) -> Any:
        return self.model_runner.get_model()  # type: ignore[attr-defined]

    def tf_weights_params(self) -> dict[str, list[Any]]:
        """vLLM's own parameters, as loaded from the checkpoint (before any repacking): name ->
        [shape, dtype]. Taken from the metadata vLLM records for in-place reloads."""
        from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

        out: dict[str, list[Any]] = {}
        for mod_name, mod in self._tf_model().named_modules():
            params = get_layerwise_info(mod).restore_metadata[0]
            for pname, meta in params.items():
                full = f"{mod_name}.{pname}" if mod_name else pname
                out[full] = [list(meta.shape), _DTYPES.get(str(meta.dtype), str(meta.dtype))]
        return out

    def tf_weights_join(self, config: str) -> dict[str, Any]:
        """Join a publisher: ``config`` is JSON {publisher: address hex, layout: Layout JSON,
        name, timeout, host, transports}. The secret is ``$TENSORFABRIC_SECRET`` of the vLLM
        process (never sent over HTTP). A layout that does not match this model is refused
        before anything is allocated. Joining again (a new publisher) replaces the old one."""
        cfg = json.loads(config)
        if not isinstance(cfg, dict):
            raise ConfigError("tf_weights_join: config must be a JSON object")
        layout = Layout.from_json(cfg["layout"])
        check_vllm_layout(layout, {k: (v[0], v[1]) for k, v in self.tf_weights_params().items()})
        secret = os.environ.get("TENSORFABRIC_SECRET", "")
        if not secret:
            raise ConfigError("the vLLM process has no TENSORFABRIC_SECRET: weight updates "
                              "need the shared secret in its environment")
        st = self._tf_state()
        with st.lock:
            self._tf_close(st)
            timeout = float(cfg.get("timeout", 60.0))
            st.engine = tf.Engine(secret=secret, host=str(cfg.get("host", "127.0.0.1")),
                                  transports=tuple(cfg.get("transports", ("shm", "tcp"))),
                                  timeout=timeout, name=f"vllm-weights-{cfg.get('name', '')}")
            st.sub = Subscriber(st.engine, bytes.fromhex(cfg["publisher"]), layout,
                                name=str(cfg.get("name", "vllm")), timeout=timeout,
                                key=weights_key(secret), single_slot=True)
            st.publisher = cfg["publisher"]
        return self.tf_weights_state()

    def tf_weights_state(self) -> dict[str, Any]:
        """{publisher, address (this worker's engine, hex; "" before a join), staged (verified
        version in staging, 0: none), serving, rejected, switches, last_switch_s, last_path}."""
        st = self._tf_state()
        sub, engine = st.sub, st.engine
        return {"publisher": st.publisher, "serving": st.serving,
                "address": engine.address.hex() if engine is not None else "",
                "staged": sub.version if sub is not None else 0,
                "rejected": [list(r) for r in (sub.rejected if sub else [])[-_MAX_REJECTED:]],
                "switches": st.switches, "last_switch_s": st.last_switch_s, "last_path": st.last_path}

    def tf_weights_switch(self, version: str) -> dict[str, Any]:
        """Load the verified staged ``version`` into vLLM's model. Runs between engine steps
        (collective_rpc), so no forward pass sees a half-loaded model. Refused (nothing
        changes) unless staging holds exactly that version, verified."""
        import time

        want = int(version)
        st = self._tf_state()
        with st.lock:
            if st.sub is None:
                raise ConfigError("tf_weights_switch: this worker has not joined a publisher")
            if st.serving == want:
                return self.tf_weights_state()
            try:
                lease = st.sub.acquire()
                snap = lease.__enter__()
            except NoVersionError:
                raise LayoutError(f"version {want} is not staged (an update is being written "
                                  f"or was rejected); still serving {st.serving}") from None
            try:
                if snap.version != want:
                    raise LayoutError(f"staging holds version {snap.version}, not {want}; "
                                      f"still serving {st.serving}")
                t0 = time.perf_counter()
                st.last_path = self._tf_load(st.sub.layout, snap.tensors)
                st.last_switch_s = time.perf_counter() - t0
                st.serving = want
                st.switches += 1
            finally:
                lease.__exit__(None, None, None)
        log.info("switched to weights version %d in %.3f s (%s)", want, st.last_switch_s,
                 st.last_path)
        return self.tf_weights_state()

    def _tf_load(self, layout: Layout, views: dict[str, Any]) -> str:
        """Put the staged tensors into the model: in place where every tensor maps 1:1 onto a
        parameter (``_in_place``), else through vLLM's ``reload_weights``. Returns which."""
        model = self._tf_model()
        if os.environ.get("TENSORFABRIC_VLLM_SWITCH", "in-place") != "reload":
            steps = _in_place_steps(model, _torch_tensors(layout, views))
            if steps is not None:
                try:
                    _apply_in_place(model, steps)
                    return "in-place"
                except Exception:  # a kernel refused the new weights: reload them all
                    log.exception("in-place load failed; reloading the whole version instead")
        self.model_runner.reload_weights(  # type: ignore[attr-defined]
            weights_iterator=_torch_tensors(layout, views))
        _repack_tied(model)
        return "reload"

    def tf_weights_leave(self) -> dict[str, Any]:
        """Close the Subscriber and Engine (the model keeps the version it serves)."""
        st = self._tf_state()
        with st.lock:
            self._tf_close(st)
        return self.tf_weights_state()

    @staticmethod
    def _tf_close(st: _State) -> None:
        """Detach the Subscriber and Engine and close them in the background: this runs in
        the worker's own thread, which must get back to serving at once even if closing links
        to a dead publisher takes a while."""
        sub, engine = st.sub, st.engine
        st.sub, st.engine, st.publisher = None, None, ""
        if sub is None and engine is None:
            return

        def close() -> None:
            try:
                if sub is not None:
                    sub.close()
            finally:
                if engine is not None:
                    engine.close()

        threading.Thread(target=close, name="tf-weights-close", daemon=True).start()


def _repack_tied(model: Any) -> None:
    """Rebuild the CPU GEMM kernels of layers that keep their weight next to a packed copy
    (``cpu_linear`` with a non-empty ``weight``: the embedding method, so the LM head). A tied
    ``lm_head`` shares ``embed_tokens.weight``, which the reload updates in place, but it gets
    no weights of its own, so vLLM's reload leaves its packed copy (a oneDNN handle) at the old
    values. Re-running its ``process_weights_after_loading`` packs the new ones."""
    for mod in model.modules():
        method = getattr(mod, "quant_method", None)
        weight = getattr(mod, "weight", None)
        if (hasattr(mod, "cpu_linear") and method is not None and weight is not None
                and weight.numel() > 0 and hasattr(method, "process_weights_after_loading")):
            method.process_weights_after_loading(mod)


def _in_place_steps(model: Any, tensors: Iterator[tuple[str, Any]]) -> list[tuple[Any, str, Any]] | None:
    """What an in-place load would do, checked before anything changes: (module, parameter
    name, staged tensor) per tensor, or None when some tensor does not map 1:1 onto a
    parameter (then the caller reloads through vLLM). A parameter is either live (same shape:
    copied into) or packed away by vLLM's CPU backend (an empty ``weight`` next to a
    ``cpu_linear`` kernel built by ``quant_method.process_weights_after_loading``: the kernel is
    rebuilt from the staged tensor). A vocabulary tensor that vLLM padded takes the staged rows
    at its start."""
    mods = dict(model.named_modules())
    steps = []
    for name, t in tensors:
        mod_name, _, pname = name.rpartition(".")
        mod = mods.get(mod_name)
        param = getattr(mod, pname, None) if mod is not None else None
        if param is None or not hasattr(param, "shape"):
            return None
        if tuple(param.shape) == tuple(t.shape) or vocab_padded(name, param.shape, t.shape):
            steps.append((mod, pname, t))
        elif (pname == "weight" and param.numel() == 0 and hasattr(mod, "cpu_linear")
              and hasattr(getattr(mod, "quant_method", None), "process_weights_after_loading")):
            steps.append((mod, pname, t))
        else:
            return None
    return steps


def _apply_in_place(model: Any, steps: list[tuple[Any, str, Any]]) -> None:
    """Copy the live parameters, then rebuild the packed kernels from the staged tensors (the
    kernels keep their own packed copy; a module that keeps the weight itself gets a copy, so
    nothing points into staging, which the next version overwrites), then the tied head."""
    import torch

    repack = []
    with torch.no_grad():
        for mod, pname, t in steps:
            param = getattr(mod, pname)
            if param.numel() == 0 and t.numel() != 0:
                repack.append((mod, pname, t))
            elif tuple(param.shape) == tuple(t.shape):
                param.data.copy_(t)
            else:  # a padded vocabulary: the staged rows at its start
                param.data[: t.shape[0]].copy_(t)
        for mod, pname, t in repack:
            setattr(mod, pname, torch.nn.Parameter(t, requires_grad=False))
            mod.quant_method.process_weights_after_loading(mod)
            kept = getattr(mod, pname)
            if kept.numel() and kept.data_ptr() == t.data_ptr():
                setattr(mod, pname, torch.nn.Parameter(t.clone(), requires_grad=False))
    _repack_tied(model)


def _torch_tensors(layout: Layout, views: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    import torch

    for spec in layout.specs:
        t = torch.from_numpy(views[spec.name])
        if spec.dtype == "bfloat16":
            t = t.view(torch.bfloat16)
        yield spec.name, t
