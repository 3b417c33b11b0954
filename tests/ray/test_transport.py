"""Ray actors pass tensors over the tensorfabric engine (a registered Ray tensor transport)."""

from __future__ import annotations

import hashlib

import pytest

ray = pytest.importorskip("ray")
torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]


def make_tensors(seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(1024, 1024, generator=g),  # 4 MiB float32
        torch.arange(300_000, dtype=torch.int64)[::3],  # not contiguous
        torch.randn(7, 5, generator=g).to(torch.bfloat16),  # no numpy dtype
        torch.empty(0, 3),  # zero bytes
    ]


def digest(tensors: list) -> list:
    return [(tuple(t.shape), str(t.dtype),
             hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest())
            for t in tensors]  # fmt: skip


def actor_classes() -> tuple:
    """Defined after register_transport(): Ray checks the transport name at decoration."""

    @ray.remote(num_cpus=0, enable_tensor_transport=True)
    class Producer:
        @ray.method(tensor_transport="TENSORFABRIC")
        def make(self, seed: int) -> list:
            return make_tensors(seed)

    @ray.remote(num_cpus=0, enable_tensor_transport=True)
    class Consumer:
        def digest(self, tensors: list) -> tuple:
            from ray.experimental.rdt.util import transport_managers

            return digest(tensors), "TENSORFABRIC" in transport_managers

    return Producer, Consumer


def test_actor_to_actor_tensors_arrive_intact(pool_cluster):
    from tensorfabric.pool import register_transport

    assert register_transport() == "TENSORFABRIC"
    Producer, Consumer = actor_classes()
    ids = pool_cluster["ids"]
    producer = Producer.options(label_selector={"ray.io/node-id": ids["us"]}).remote()
    consumer = Consumer.options(label_selector={"ray.io/node-id": ids["eu-b"]}).remote()
    for seed in (1, 2):
        ref = producer.make.remote(seed)
        got, used = ray.get(consumer.digest.remote(ref), timeout=60)
        assert used, "the consumer did not receive through the tensorfabric transport"
        assert got == digest(make_tensors(seed))
        del ref
    ray.kill(producer)
    ray.kill(consumer)
