"""The tensorfabric engine as a Ray tensor transport (Ray Direct Transport, ``ray.experimental``).

Register it once in the driver, before creating the actors that use it::

    from tensorfabric.pool import register_transport
    register_transport()                      # name: "TENSORFABRIC"

    @ray.remote(enable_tensor_transport=True)
    class Producer:
        @ray.method(tensor_transport="TENSORFABRIC")
        def make(self):
            return torch.randn(1024, 1024)

A returned tensor stays in the producer; Ray hands the consumer a small metadata object and
the consumer's engine *reads* the bytes straight from the producer's registered memory (a
one-sided transfer: the producer's task is not involved). Ray's object store is not used.

Each actor process runs one :class:`tensorfabric.Engine`, created on first use, listening on
the node's Ray IP; it authenticates peers with the cluster secret from ``TENSORFABRIC_SECRET``
in the node's environment (set by ``tensorfabric pool up/join``). CPU tensors only.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

try:
    import torch
    from ray.experimental import (
        CommunicatorMetadata,
        TensorTransportManager,
        TensorTransportMetadata,
        register_tensor_transport,
    )
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "the tensorfabric Ray transport needs Ray and torch: pip install 'tensorfabric[ray,llm]'"
    ) from exc

TRANSPORT_NAME = "TENSORFABRIC"
TIMEOUT_ENV = "TENSORFABRIC_RAY_TIMEOUT"
SWEEP_ENV = "TENSORFABRIC_RAY_SWEEP_S"

_engine_lock = threading.Lock()
_engine: Any = None
_register_lock = threading.Lock()


def process_engine() -> Any:
    """This process's engine for the transport (created on first use, closed at exit)."""
    global _engine
    with _engine_lock:
        if _engine is None:
            import ray

            import tensorfabric as tf

            _engine = tf.Engine(
                host=ray.util.get_node_ip_address(), port=0, name=f"ray-rdt-{os.getpid()}"
            )
        return _engine


def _timeout() -> float:
    return float(os.environ.get(TIMEOUT_ENV, "60"))


def _bytes_view(t: torch.Tensor) -> Any:
    """A writable uint8 numpy view of a contiguous CPU tensor's memory (any dtype)."""
    return t.detach().reshape(-1).view(torch.uint8).numpy()


def _raw(t: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """The memory to send for ``t`` and what the receiver needs to rebuild it exactly.

    Conjugate and negative *bits* are lazy views over unchanged memory: we send the memory
    and set the bits again on arrival. A dense tensor (any permutation of its dims, e.g. a
    transpose) travels as its memory span and keeps its strides; a view with gaps or overlap
    is made contiguous (its strides mean nothing once copied)."""
    t = t.detach()
    flags = {"conj": bool(t.is_conj()), "neg": bool(t.is_neg())}
    if flags["conj"]:
        t = t.conj()  # undoes the bit: same memory, no copy
    if flags["neg"]:
        t = torch._neg_view(t)
    if t.is_contiguous():
        return t, {**flags, "stride": None}
    if _dense(t):
        span = t.as_strided((t.numel(),), (1,), t.storage_offset())
        return span, {**flags, "stride": tuple(t.stride())}
    return t.contiguous(), {**flags, "stride": None}


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill one gap-free span of memory, in some dimension order."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _rebuild(flat: torch.Tensor, shape: Any, info: dict[str, Any]) -> torch.Tensor:
    out = flat.as_strided(tuple(shape), info["stride"]) if info.get("stride") else flat.view(shape)
    if info.get("neg"):
        out = torch._neg_view(out)
    if info.get("conj"):
        out = out.conj()
    if info.get("requires_grad"):
        out.requires_grad_(True)
    return out


@dataclass
class TensorFabricCommunicatorMetadata(CommunicatorMetadata):
    """Nothing to agree on: the descriptors carry the producer's address."""


@dataclass
class TensorFabricTransportMetadata(TensorTransportMetadata):
    """Shapes/dtypes (base class), one engine region descriptor per tensor, and how to
    rebuild each (strides, conj/neg bits, requires_grad)."""

    descriptors: list[bytes] | None = None
    layouts: list[dict[str, Any]] | None = None


class TensorFabricTransport(TensorTransportManager):
    """One-sided: the receiver reads each tensor from the producer's registered region.

    Regions are released by :meth:`garbage_collect` (Ray frees the object), and otherwise by
    a sweep (every ``TENSORFABRIC_RAY_SWEEP_S`` seconds, default 5, and on each new object):
    it releases objects Ray dropped from its store without telling us, and objects whose
    owner's job has ended (a driver that died holding the reference never frees it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # obj_id -> (job id hex of the task that made it, [(region, tensor)])
        self._held: dict[str, tuple[str, list[tuple[Any, torch.Tensor]]]] = {}
        self._inflight: dict[str, list[Any]] = {}  # obj_id -> Transfers being received
        self._sweeper: threading.Thread | None = None
        self.released_by_sweep = 0

    def held_regions(self) -> int:
        """Regions this process has registered for objects not yet freed (for tests)."""
        with self._lock:
            return sum(len(h) for _, h in self._held.values())

    def tensor_transport_backend(self) -> str:
        return TRANSPORT_NAME

    @staticmethod
    def is_one_sided() -> bool:
        return True

    @staticmethod
    def can_abort_transport() -> bool:
        return True  # engine transfers can be cancelled; neither side blocks forever

    def actor_has_tensor_transport(self, actor: Any) -> bool:
        return True  # every actor can start an engine (tensorfabric needs only numpy)

    def extract_tensor_transport_metadata(self, obj_id: str, rdt_object: list[Any]) -> TensorFabricTransportMetadata:  # fmt: skip
        import tensorfabric as tf

        meta, descs, layouts, held = [], [], [], []
        for t in rdt_object:
            if t.device.type != "cpu":
                raise ValueError(
                    f"the {TRANSPORT_NAME} transport moves CPU tensors; got one on {t.device}"
                )
            src, info = _raw(t)
            info["requires_grad"] = bool(t.requires_grad)
            meta.append((t.shape, t.dtype))
            layouts.append(info)
            if src.numel() == 0:
                descs.append(b"")
                continue
            region = process_engine().register(_bytes_view(src), access=tf.Access.REMOTE_READ)
            held.append((region, src))
            descs.append(region.descriptor().to_bytes())
        with self._lock:
            self._held[obj_id] = (_current_job(), held)
        self._start_sweeper()
        return TensorFabricTransportMetadata(tensor_meta=meta, tensor_device="cpu" if rdt_object else None,
                                             descriptors=descs, layouts=layouts)  # fmt: skip

    def get_communicator_metadata(self, src_actor: Any, dst_actor: Any,
                                  backend: str | None = None) -> TensorFabricCommunicatorMetadata:  # fmt: skip
        return TensorFabricCommunicatorMetadata()

    def recv_multiple_tensors(self, obj_id: str, tensor_transport_metadata: TensorTransportMetadata,
                              communicator_metadata: CommunicatorMetadata,
                              target_buffers: list[Any] | None = None) -> list[Any]:  # fmt: skip
        import tensorfabric as tf

        assert isinstance(tensor_transport_metadata, TensorFabricTransportMetadata)
        metas = tensor_transport_metadata.tensor_meta
        descs = tensor_transport_metadata.descriptors or []
        layouts = tensor_transport_metadata.layouts or [{} for _ in metas]
        flats = []
        for i, (shape, dtype) in enumerate(metas):
            buf = target_buffers[i] if target_buffers else None
            plain = not any(layouts[i].get(k) for k in ("stride", "conj", "neg", "requires_grad"))
            if (buf is None or not plain or not buf.is_contiguous() or buf.shape != shape
                    or buf.dtype != dtype):  # fmt: skip
                buf = torch.empty(shape, dtype=dtype)
                buf = buf.reshape(-1) if not plain else buf
            flats.append(buf)
        if any(descs):
            eng = process_engine()
            transfers = [
                eng.read(tf.RegionDescriptor.from_bytes(d), _bytes_view(t), timeout=_timeout())
                for d, t in zip(descs, flats)
                if d
            ]
            with self._lock:
                self._inflight[obj_id] = transfers
            try:
                for tr in transfers:
                    tr.wait(_timeout())
            finally:
                with self._lock:
                    self._inflight.pop(obj_id, None)
        return [_rebuild(f, shape, info) for f, (shape, _), info in zip(flats, metas, layouts)]

    def send_multiple_tensors(self, tensors: list[Any], tensor_transport_metadata: TensorTransportMetadata,
                              communicator_metadata: CommunicatorMetadata) -> None:  # fmt: skip
        raise RuntimeError(f"{TRANSPORT_NAME} is one-sided: the receiver reads; Ray never sends")

    def garbage_collect(self, obj_id: str, tensor_transport_meta: TensorTransportMetadata,
                        tensors: list[Any]) -> None:  # fmt: skip
        self._release(obj_id)

    def _release(self, obj_id: str) -> None:
        with self._lock:
            _, held = self._held.pop(obj_id, ("", []))
        for region, _tensor in held:
            process_engine().unregister(region)

    def sweep(self) -> int:
        """Release regions of objects Ray no longer holds, or whose owner's job ended.
        Returns how many objects were released."""
        with self._lock:
            items = [(o, job) for o, (job, _) in self._held.items()]
        if not items:
            return 0
        import ray

        store = ray._private.worker.global_worker.rdt_manager.rdt_store
        dead = _dead_jobs()
        gone = [o for o, job in items if not store.has_object(o) or job in dead]
        for o in gone:
            self._release(o)
        self.released_by_sweep += len(gone)
        return len(gone)

    def _start_sweeper(self) -> None:
        with self._lock:
            if self._sweeper is not None:
                return
            self._sweeper = threading.Thread(target=self._sweep_loop, daemon=True,
                                             name="tensorfabric-rdt-sweep")  # fmt: skip
        self._sweeper.start()

    def _sweep_loop(self) -> None:
        period = float(os.environ.get(SWEEP_ENV, "5"))
        while True:
            time.sleep(period)
            try:
                self.sweep()
            except Exception:  # the GCS may be briefly away; try again next period
                pass

    def abort_transport(self, obj_id: str, communicator_metadata: CommunicatorMetadata) -> None:
        with self._lock:
            transfers = self._inflight.pop(obj_id, [])
        for tr in transfers:
            tr.cancel()


def _current_job() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_job_id()
    except Exception:
        return ""


def _dead_jobs() -> set[str]:
    import ray

    return {j["JobID"] for j in ray._private.state.jobs() if j.get("IsDead")}


def register_transport() -> str:
    """Register the transport with Ray in this process; idempotent and thread-safe. Returns
    its name, for ``@ray.method(tensor_transport=...)``.

    Call it in the driver before creating the actors that use it. An actor whose first act
    is ``ray.put(x, _tensor_transport="TENSORFABRIC")`` should call it too (in ``__init__``):
    Ray registers custom transports on a new actor with a task of its own, which may not
    have run yet."""
    from ray.experimental.rdt.util import transport_manager_info

    with _register_lock:
        if TRANSPORT_NAME not in transport_manager_info:
            try:
                register_tensor_transport(TRANSPORT_NAME, ["cpu"], TensorFabricTransport, torch.Tensor)
            except ValueError:
                if TRANSPORT_NAME not in transport_manager_info:  # not the race with Ray's task
                    raise
    return TRANSPORT_NAME
