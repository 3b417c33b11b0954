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

_engine_lock = threading.Lock()
_engine: Any = None


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
    return t.reshape(-1).view(torch.uint8).numpy()


@dataclass
class TensorFabricCommunicatorMetadata(CommunicatorMetadata):
    """Nothing to agree on: the descriptors carry the producer's address."""


@dataclass
class TensorFabricTransportMetadata(TensorTransportMetadata):
    """Shapes/dtypes (base class) plus one engine region descriptor per tensor."""

    descriptors: list[bytes] | None = None


class TensorFabricTransport(TensorTransportManager):
    """One-sided: the receiver reads each tensor from the producer's registered region."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, list[tuple[Any, torch.Tensor]]] = {}  # obj_id -> (region, tensor)
        self._inflight: dict[str, list[Any]] = {}  # obj_id -> Transfers being received

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

        meta, descs, held = [], [], []
        for t in rdt_object:
            if t.device.type != "cpu":
                raise ValueError(
                    f"the {TRANSPORT_NAME} transport moves CPU tensors; got one on {t.device}"
                )
            src = t.contiguous()  # keeps the original alive too if it was not contiguous
            meta.append((t.shape, t.dtype))
            if src.numel() == 0:
                descs.append(b"")
                continue
            region = process_engine().register(_bytes_view(src), access=tf.Access.REMOTE_READ)
            held.append((region, src))
            descs.append(region.descriptor().to_bytes())
        with self._lock:
            self._held[obj_id] = held
        return TensorFabricTransportMetadata(
            tensor_meta=meta, tensor_device="cpu" if rdt_object else None, descriptors=descs
        )

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
        out = []
        for i, (shape, dtype) in enumerate(metas):
            buf = target_buffers[i] if target_buffers else None
            if buf is None or not buf.is_contiguous() or buf.shape != shape or buf.dtype != dtype:
                buf = torch.empty(shape, dtype=dtype)  # type: ignore[arg-type]  # torch dtypes here
            out.append(buf)
        if not any(descs):
            return out
        eng = process_engine()
        transfers = [
            eng.read(tf.RegionDescriptor.from_bytes(d), _bytes_view(t), timeout=_timeout())
            for d, t in zip(descs, out)
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
        return out

    def send_multiple_tensors(self, tensors: list[Any], tensor_transport_metadata: TensorTransportMetadata,
                              communicator_metadata: CommunicatorMetadata) -> None:  # fmt: skip
        raise NotImplementedError(f"{TRANSPORT_NAME} is one-sided: the receiver reads")

    def garbage_collect(self, obj_id: str, tensor_transport_meta: TensorTransportMetadata,
                        tensors: list[Any]) -> None:  # fmt: skip
        with self._lock:
            held = self._held.pop(obj_id, [])
        for region, _tensor in held:
            process_engine().unregister(region)

    def abort_transport(self, obj_id: str, communicator_metadata: CommunicatorMetadata) -> None:
        with self._lock:
            transfers = self._inflight.pop(obj_id, [])
        for tr in transfers:
            tr.cancel()


def register_transport() -> str:
    """Register the transport with Ray in this (driver) process; idempotent. Returns its name,
    for ``@ray.method(tensor_transport=...)``. Call it before creating the actors."""
    from ray.experimental.rdt.util import transport_manager_info

    if TRANSPORT_NAME not in transport_manager_info:
        register_tensor_transport(TRANSPORT_NAME, ["cpu"], TensorFabricTransport, torch.Tensor)
    return TRANSPORT_NAME
