"""The nixl transport keeps NIXL transfer requests per op shape and posts them again: fresh
bytes move on every repost, a new shape gets its own request, and every request is released
when its local region is unregistered, its peer dies, it is evicted or the engine closes.
The owner still checks every op (key, permission, bounds), also the one-segment fast path."""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import zlib
from typing import Any, Iterator

import numpy as np
import pytest

from tensorfabric import Access, Engine, TensorFabricError, TransferTimeout

HAVE_NIXL = any(importlib.util.find_spec(m) is not None for m in ("nixl_cu13", "nixl_cu12", "nixl"))
pytestmark = [pytest.mark.nixl,
              pytest.mark.skipif(not HAVE_NIXL, reason="nixl is not installed "
                                 "(pip install --no-deps nixl-cu13==1.5.1)")]

SECRET = "nixl-prepared"
OPTS = {"tls": "shm", "net_devices": "lo"}


@pytest.fixture
def pair() -> Iterator[tuple[Engine, Engine]]:
    a = Engine(SECRET, transports=("nixl", "tcp"), nixl=OPTS, name="pa")
    b = Engine(SECRET, transports=("nixl", "tcp"), nixl=OPTS, name="pb")
    with a, b:
        yield a, b


def _handles(eng: Engine) -> list[Any]:
    return [h for p in eng._nixl._prepared.values() for h in p.idle]


def test_reposts_move_fresh_bytes(pair: tuple[Engine, Engine]) -> None:
    """Same shape again: the same NIXL request is posted again, with the new op's
    notification, and each time the destination holds the source's current bytes."""
    a, b = pair
    rng = np.random.default_rng(7)
    dst = b.register(np.zeros(1 << 20, np.uint8))
    src = a.register(np.zeros(1 << 20, np.uint8))
    back = a.register(np.zeros(1 << 18, np.uint8))
    desc = dst.descriptor()
    first = None
    for i in range(6):
        src.array[:] = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
        a.write(src, desc, src_offset=4096, dst_offset=8192, nbytes=1 << 18, imm=40).wait(20)
        b.expect(40).wait(20)
        assert (zlib.crc32(dst.array[8192:8192 + (1 << 18)])
                == zlib.crc32(src.array[4096:4096 + (1 << 18)])), f"write {i}"
        dst.array[1 << 19:] = rng.integers(0, 256, 1 << 19, dtype=np.uint8)  # owner's own data
        a.read(desc, back, src_offset=1 << 19).wait(20)
        assert zlib.crc32(back.array) == zlib.crc32(dst.array[1 << 19:(1 << 19) + (1 << 18)])
        if first is None:
            first = {id(h) for h in _handles(a)}
            assert len(first) == 2  # one write shape, one read shape
        else:
            assert {id(h) for h in _handles(a)} == first, "the kept requests were not reposted"
    assert len(a._nixl._prepared) == 2


def test_a_new_shape_gets_its_own_request(pair: tuple[Engine, Engine]) -> None:
    a, b = pair
    dst = b.register(np.zeros(1 << 20, np.uint8))
    src = a.register(np.arange(1 << 20, dtype=np.uint32).astype(np.uint8))
    desc = dst.descriptor()
    shapes = [dict(nbytes=4096), dict(nbytes=8192), dict(nbytes=4096, dst_offset=65536),
              dict(nbytes=4096, src_offset=100)]
    for n, kw in enumerate(shapes * 2, 1):
        dst.array[:] = 0
        a.write(src, desc, imm=41, **kw).wait(20)
        b.expect(41).wait(20)
        so, do, nb = kw.get("src_offset", 0), kw.get("dst_offset", 0), kw["nbytes"]
        assert np.array_equal(dst.array[do:do + nb], src.array[so:so + nb]), kw
        assert not dst.array[:do].any() and not dst.array[do + nb:].any()
        assert len(a._nixl._prepared) == min(n, len(shapes))
    pages = dict(src_pages=[3, 0, 7], dst_pages=[1, 5, 2], page_size=4096)
    for _ in range(2):
        a.write_pages(src, desc, imm=42, **pages).wait(20)
        b.expect(42).wait(20)
        for s, d in zip(pages["src_pages"], pages["dst_pages"]):
            assert np.array_equal(dst.array[d * 4096:(d + 1) * 4096],
                                  src.array[s * 4096:(s + 1) * 4096])
    assert len(a._nixl._prepared) == len(shapes) + 1


def test_unregister_and_close_release_every_request(pair: tuple[Engine, Engine]) -> None:
    a, b = pair
    dst = b.register(np.zeros(1 << 16, np.uint8))
    src1 = a.register(np.full(1 << 16, 1, np.uint8))
    src2 = a.register(np.full(1 << 16, 2, np.uint8))
    a.write(src1, dst.descriptor(), nbytes=1000).wait(20)
    a.write(src2, dst.descriptor(), nbytes=1000).wait(20)
    a.read(dst.descriptor(), src2, nbytes=500).wait(20)
    kept = [(p.local_rid, list(p.idle)) for p in a._nixl._prepared.values()]
    assert sorted(rid for rid, _ in kept) == sorted([src1.id, src2.id, src2.id])
    assert all(hs for _, hs in kept)
    a.unregister(src1)
    assert all(h._released for rid, hs in kept if rid == src1.id for h in hs)
    assert not any(h._released for h in _handles(a))
    assert {p.local_rid for p in a._nixl._prepared.values()} == {src2.id}
    a.write(b"\x05" * 1000, dst.descriptor(), imm=43).wait(20)  # not a region: not kept
    b.expect(43).wait(20)
    assert bytes(dst.array[:3]) == b"\x05\x05\x05"
    assert {p.local_rid for p in a._nixl._prepared.values()} == {src2.id}
    survivors = _handles(a)
    a.close()
    assert survivors and all(h._released for h in survivors)
    assert not a._nixl._prepared


def test_eviction_releases_the_oldest_shape(pair: tuple[Engine, Engine],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorfabric.transports import _nixl

    monkeypatch.setattr(_nixl, "_PREP_MAX", 3)
    a, b = pair
    dst = b.register(np.zeros(1 << 16, np.uint8))
    src = a.register(np.arange(1 << 16, dtype=np.uint16).astype(np.uint8))
    seen = []
    for n in range(1, 6):
        a.write(src, dst.descriptor(), nbytes=n * 100, imm=44).wait(20)
        b.expect(44).wait(20)
        assert np.array_equal(dst.array[:n * 100], src.array[:n * 100])
        seen.append(list(_handles(a)))
    assert len(a._nixl._prepared) == 3
    oldest = seen[0]
    assert oldest and all(h._released for h in oldest)


def _owner(conn: Any) -> None:
    with Engine(SECRET, transports=("nixl", "tcp"), nixl=OPTS, name="dying") as eng:
        region = eng.register(np.zeros(1 << 20, np.uint8))
        conn.send((eng.address, region.descriptor().to_bytes()))
        conn.recv()  # killed while waiting here


def test_a_dead_peer_releases_its_requests() -> None:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_owner, args=(child,), daemon=True)
    proc.start()
    try:
        assert parent.poll(60), "owner process did not start"
        _, desc = parent.recv()
        with Engine(SECRET, transports=("nixl", "tcp"), nixl=OPTS, name="survivor") as a:
            src = a.register(np.ones(1 << 20, np.uint8))
            a.write(src, desc, nbytes=1 << 16).wait(20)
            kept = _handles(a)
            assert kept
            proc.kill()
            proc.join(10)
            with pytest.raises(TensorFabricError):
                a.write(src, desc, nbytes=1 << 16).wait(20)
            assert all(h._released for h in kept)
            assert not a._nixl._prepared
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(10)


def test_owner_checks_every_note(pair: tuple[Engine, Engine]) -> None:
    """Notifications forged past the initiator's checks: the owner counts the immediate of a
    valid one only (one-segment fast path and multi-segment tables alike)."""
    from tensorfabric.transports import _nixl

    a, b = pair
    region = b.register(np.zeros(4096, np.uint8))
    ro = b.register(np.zeros(4096, np.uint8), Access.REMOTE_READ)
    desc = region.descriptor()
    a.write(b"x", desc).wait(20)  # opens the region: the agents know each other
    agent = b._nixl.agent_name

    def note(rid: int, key: bytes, imm: int, segs: list[tuple[int, int]],
             need: Access = Access.REMOTE_WRITE) -> None:
        flags = _nixl._F_IMM | _nixl._F_NO_ACK
        msg = _nixl._NOTE.pack(b"tfNN", 10_000 + imm, rid, int(need), flags, imm, key)
        msg += b"".join(_nixl._SEG1.pack(o, n) for o, n in segs)
        with a._nixl._lock:
            a._nixl._agent.send_notif(agent, msg)

    note(desc.region_id, desc.key, 50, [(4000, 97)])  # one byte past the end
    note(desc.region_id, desc.key, 51, [((1 << 64) - 1, 2)])  # offset wraps around
    note(desc.region_id, bytes(16), 52, [(0, 10)])  # wrong key
    note(ro.id, ro.descriptor().key, 53, [(0, 10)])  # no remote write
    note(desc.region_id, desc.key, 54, [(0, 10), (4090, 10)])  # second segment outside
    note(desc.region_id, desc.key, 55, [(4000, 96)])  # exactly to the end: valid
    note(desc.region_id, desc.key, 56, [(0, 10), (4086, 10)])  # valid table
    b.expect(55).wait(20)
    b.expect(56).wait(20)
    for imm in (50, 51, 52, 53, 54):
        with pytest.raises(TransferTimeout):
            b.expect(imm, timeout=0.3).wait()


def test_one_shape_from_many_threads(pair: tuple[Engine, Engine]) -> None:
    """Overlapping ops of one shape each get their own request; at most 2 stay idle after."""
    import threading

    a, b = pair
    dst = b.register(np.zeros(1 << 20, np.uint8))
    src = a.register(np.arange(1 << 20, dtype=np.uint32).astype(np.uint8))
    desc = dst.descriptor()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            pending = [a.write(src, desc, nbytes=1 << 18, imm=60) for _ in range(10)]
            for t in pending:
                t.wait(30)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    b.expect(60, 40).wait(20)
    assert np.array_equal(dst.array[:1 << 18], src.array[:1 << 18])
    (prep,) = a._nixl._prepared.values()
    assert 1 <= len(prep.idle) <= 2 and len({id(h) for h in prep.idle}) == len(prep.idle)
    assert not a._nixl._ops
