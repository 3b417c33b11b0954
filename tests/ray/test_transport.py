"""Ray actors pass tensors over the tensorfabric engine (a registered Ray tensor transport)."""

from __future__ import annotations

import hashlib

import pytest

ray = pytest.importorskip("ray")
torch = pytest.importorskip("torch")

# a hang guard: >180 s beside stress-ng and the vLLM tier
pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


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
        # (the first call waits for two fresh actors: worker starts take ~10 s idle, minutes
        # on a loaded machine; the limit is a hang guard, as for the puts below)
        got, used = ray.get(consumer.digest.remote(ref), timeout=240)
        assert used, "the consumer did not receive through the tensorfabric transport"
        assert got == digest(make_tensors(seed))
        del ref
    ray.kill(producer)
    ray.kill(consumer)


# ---- Ray's own custom-transport cases (python/ray/tests/rdt/test_rdt_custom.py), adapted to
# ---- our transport, plus every tensor kind Ray's object store accepts, and region accounting.


def describe(t) -> tuple:
    """What must survive a trip: values, dtype, shape, conj/neg bits, requires_grad, and the
    strides where they mean something (dense tensors, including permuted ones)."""
    from tensorfabric.pool._transport import _dense

    plain = t.detach().resolve_conj().resolve_neg().contiguous()
    data = hashlib.sha256(plain.reshape(-1).view(torch.uint8).numpy()).hexdigest() if plain.numel() else ""
    # A view with gaps arrives compacted: its strides are those of its contiguous copy.
    stride = tuple(t.stride() if _dense(t) else t.contiguous().stride())
    return (str(t.dtype), tuple(t.shape), stride,
            t.is_conj(), t.is_neg(), t.requires_grad, data)  # fmt: skip


def tensor_zoo() -> dict:
    g = torch.Generator().manual_seed(7)
    c = torch.randn(6, 5, dtype=torch.complex64, generator=g)
    zoo = {
        "conj": c.conj(),
        "conj-transposed": c.conj().t(),
        "neg": torch._neg_view(torch.randn(8, generator=g)),
        "conj-neg": torch._neg_view(c.conj()),
        "requires-grad": torch.randn(4, 4, generator=g, requires_grad=True),
        "transposed": torch.randn(7, 3, generator=g).t(),
        "permuted": torch.randn(2, 3, 4, generator=g).permute(2, 0, 1),
        "gaps": torch.arange(90, dtype=torch.int32)[::3],
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.empty(0, 4),
        "complex128": torch.randn(3, dtype=torch.complex128, generator=g),
    }
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8,
               torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool, torch.uint16,
               torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2):  # fmt: skip
        zoo[str(dt)] = (torch.randn(33, generator=g) * 50).to(dt)
    return zoo


def test_ray_custom_transport_cases_with_every_tensor_the_object_store_takes(pool_cluster):
    """test_register_and_use_custom_transport: a transport method's result is consumed by
    another actor, a plain method still works; then each tensor kind (and a nested structure
    of them) arrives identical, wherever Ray's object store also carries it."""
    from tensorfabric.pool import register_transport

    register_transport()
    ids = pool_cluster["ids"]

    @ray.remote(num_cpus=0, enable_tensor_transport=True)
    class Actor:
        @ray.method(tensor_transport="TENSORFABRIC")
        def echo(self, data):
            return data

        def non_rdt_echo(self, data):
            return data

        def sum(self, data):
            return data.sum().item()

        def describe(self, data):
            return ({k: describe(v) for k, v in data.items() if k != "_nested"},
                    [describe(t) for t in data["_nested"][1]["list"]])

    a = Actor.options(label_selector={"ray.io/node-id": ids["us"]}).remote()
    b = Actor.options(label_selector={"ray.io/node-id": ids["eu-b"]}).remote()
    assert ray.get(b.sum.remote(a.echo.remote(torch.tensor([1, 2, 3]))), timeout=240) == 6
    assert ray.get(b.sum.remote(a.non_rdt_echo.remote(torch.tensor([1, 2, 3]))), timeout=60) == 6

    zoo = {}
    for name, t in tensor_zoo().items():  # only what the object store itself accepts
        try:
            ray.get(ray.put(t), timeout=30)
        except Exception:
            continue
        zoo[name] = t
    assert len(zoo) >= 20, sorted(zoo)
    inner = [zoo["conj"], zoo["gaps"]]
    payload = {**zoo, "_nested": ("x", {"list": inner})}
    got, nested = ray.get(b.describe.remote(a.echo.remote(payload)), timeout=120)
    want = {k: describe(v) for k, v in zoo.items()}
    got.pop("_nested", None)
    bad = {k: (got.get(k), want[k]) for k in want if got.get(k) != want[k]}
    assert not bad, bad
    assert nested == [describe(t) for t in inner]
    for actor in (a, b):
        ray.kill(actor)


def test_regions_are_released_on_free_and_after_the_owner_dies(pool_cluster, child_env):
    """Count the producer's registered regions: Ray's free (garbage_collect) releases them,
    and so does the sweep when the driver holding the reference dies without freeing it."""
    import subprocess
    import sys
    import time

    from tensorfabric.pool import register_transport

    register_transport()

    @ray.remote(num_cpus=0, enable_tensor_transport=True)
    class Producer:
        @ray.method(tensor_transport="TENSORFABRIC")
        def make(self, n: int):
            return [torch.full((1024,), float(i)) for i in range(n)]

        def regions(self) -> tuple:
            from ray.experimental.rdt.util import get_tensor_transport_manager

            from tensorfabric.pool._transport import process_engine

            tm = get_tensor_transport_manager("TENSORFABRIC")
            return tm.held_regions(), process_engine().stats()["regions"]

    @ray.remote(num_cpus=0, enable_tensor_transport=True)
    class Consumer:
        def total(self, tensors) -> float:
            return float(sum(t.sum().item() for t in tensors))

    ids = pool_cluster["ids"]
    producer = Producer.options(label_selector={"ray.io/node-id": ids["us"]}).remote()
    consumer = Consumer.options(label_selector={"ray.io/node-id": ids["eu-b"]}).remote()
    try:
        ref = producer.make.remote(3)
        # two fresh actors' first call (see above): a hang guard
        assert ray.get(consumer.total.remote(ref), timeout=240) == 1024 * 3.0
        assert ray.get(producer.regions.remote(), timeout=30)[0] == 3
        del ref
        wait_for(lambda: ray.get(producer.regions.remote(), timeout=30) == (0, 0), 60, "freed")

        # A second driver (its own job) starts a detached producer, takes a reference and
        # dies without freeing it: nobody will ever call garbage_collect for it.
        script = (
            "import os, sys, ray, torch\n"
            "from tensorfabric.pool import register_transport\n"
            "register_transport()\n"
            "ray.init(address=sys.argv[1], namespace='tensorfabric-pool', log_to_driver=False)\n"
            "@ray.remote(num_cpus=0, enable_tensor_transport=True)\n"
            "class Orphan:\n"
            "    @ray.method(tensor_transport='TENSORFABRIC')\n"
            "    def make(self, n):\n"
            "        return [torch.full((1024,), 1.0) for _ in range(n)]\n"
            "    def regions(self):\n"
            "        from ray.experimental.rdt.util import get_tensor_transport_manager\n"
            "        from tensorfabric.pool._transport import process_engine\n"
            "        tm = get_tensor_transport_manager('TENSORFABRIC')\n"
            "        return tm.held_regions(), process_engine().stats()['regions']\n"
            "p = Orphan.options(name='region-orphan', lifetime='detached', label_selector={'ray.io/node-id': sys.argv[2]},\n"
            "                   runtime_env={'env_vars': {'TENSORFABRIC_RAY_SWEEP_S': '1'}}).remote()\n"
            "ref = p.make.remote(2)\n"
            "ray.wait([ref], fetch_local=False, timeout=60)\n"
            "print('HELD', ray.get(p.regions.remote(), timeout=30)[0], flush=True)\n"
            "os._exit(0)\n"
        )
        out = subprocess.run([sys.executable, "-c", script, pool_cluster["cluster"].address, ids["us"]],
                             env=child_env, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert "HELD 2" in out.stdout, out.stdout + out.stderr[-2000:]
        orphan = ray.get_actor("region-orphan", namespace="tensorfabric-pool")
        t0 = time.monotonic()
        try:
            wait_for(lambda: ray.get(orphan.regions.remote(), timeout=30) == (0, 0), 60,
                     "the sweep released the dead driver's regions")  # fmt: skip
        finally:
            ray.kill(orphan)
        print(f"released {time.monotonic() - t0:.1f} s after the driver died")
    finally:
        ray.kill(producer)
        ray.kill(consumer)


def test_actor_puts_through_the_transport_right_after_it_starts(pool_cluster):
    """An actor whose first act is ray.put(_tensor_transport=...) does not race Ray's own
    registration of the transport on it (register_transport() in __init__)."""
    from tensorfabric.pool import register_transport

    register_transport()

    @ray.remote(num_cpus=0, enable_tensor_transport=True)
    class Putter:
        def __init__(self) -> None:
            from tensorfabric.pool import register_transport

            register_transport()
            self.ref = ray.put(torch.arange(10), _tensor_transport="TENSORFABRIC")

        def refs(self) -> list:
            return [self.ref]

    @ray.remote(num_cpus=0)
    def total(refs: list) -> int:
        from tensorfabric.pool import register_transport

        register_transport()  # a plain task: Ray registers custom transports on actors only
        return int(ray.get(refs[0]).sum())

    putters = [Putter.options(label_selector={"ray.io/node-id": pool_cluster["ids"]["us"]}).remote()
               for _ in range(3)]  # fmt: skip
    for p in putters:
        # actor and worker starts: ~10 s idle, over 60 s beside stress-ng and the vLLM tier
        assert ray.get(total.remote(ray.get(p.refs.remote(), timeout=240)), timeout=240) == 45
        ray.kill(p)


@pytest.mark.slow
def test_256_mib_tensor_and_producer_killed_mid_transfer(pool_cluster):
    """Ray's large-tensor and killed-actor cases: a 256 MiB tensor crosses intact; a producer
    killed while its 256 MiB result is being fetched gives the consumer a Ray error in time,
    never a hang or wrong values, and the consumer then receives from a new producer."""
    from tensorfabric.pool import register_transport

    register_transport()
    n = 64 * 2**20  # int32 elements (exact values): 256 MiB

    @ray.remote(num_cpus=0, enable_tensor_transport=True)
    class Big:
        @ray.method(tensor_transport="TENSORFABRIC")
        def make(self, n: int, offset: int):
            return torch.arange(n, dtype=torch.int32) + offset

    @ray.remote(num_cpus=0, enable_tensor_transport=True)
    class Check:
        def check(self, t) -> tuple:
            idx = torch.tensor([0, 1, 12345, t.numel() // 2, t.numel() - 1])
            return t.numel(), str(t.dtype), t[idx].tolist()

    ids = pool_cluster["ids"]
    on = lambda name: {"ray.io/node-id": ids[name]}  # noqa: E731
    check = Check.options(label_selector=on("eu-b")).remote()

    def want(off: int, m: int = n) -> tuple:
        return m, "torch.int32", [off + i for i in (0, 1, 12345, m // 2, m - 1)]

    big = Big.options(label_selector=on("us")).remote()
    try:
        assert ray.get(check.check.remote(big.make.remote(n, 5)), timeout=240) == want(5)
        ref = big.make.remote(n, 7)
        ray.wait([ref], fetch_local=False, timeout=120)  # made and registered on the producer
        pending = check.check.remote(ref)
        ray.kill(big)  # while the consumer fetches the 256 MiB (or just before it starts)
        try:
            got = ray.get(pending, timeout=240)
        except ray.exceptions.GetTimeoutError:
            raise AssertionError("the consumer hung after its producer was killed") from None
        except ray.exceptions.RayError as exc:  # the expected outcome: a Ray error naming the loss
            assert "Timeout" not in type(exc).__name__, exc
            print(f"the consumer got {type(exc).__name__}")
        else:
            assert got == want(7)  # the fetch had finished before the kill landed
            print("the fetch finished before the kill")
        del ref
        big = Big.options(label_selector=on("us")).remote()  # the consumer is still usable
        assert ray.get(check.check.remote(big.make.remote(2**16, 2)), timeout=120) == want(2, 2**16)
    finally:
        ray.kill(big)
        ray.kill(check)


def wait_for(fn, timeout: float, what: str) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout:g} s: {what}")
