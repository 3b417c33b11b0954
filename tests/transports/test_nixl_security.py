"""NIXL: a whole op is checked before anything is posted, and unregister revokes. Peers that
opened the region are told, drop what they hold for it and confirm before ``unregister``
returns; nothing they post afterwards lands, and the owner's NIXL registration is released
once every opener confirmed."""

from __future__ import annotations

import importlib.util
import threading

import numpy as np
import pytest

from tensorfabric import AccessError, ConfigError, Engine, TensorFabricError

HAVE_NIXL = any(importlib.util.find_spec(m) is not None for m in ("nixl_cu13", "nixl_cu12", "nixl"))
pytestmark = [pytest.mark.nixl,
              pytest.mark.skipif(not HAVE_NIXL, reason="nixl is not installed "
                                 "(pip install --no-deps nixl-cu13==1.5.1)")]

SECRET = "nixl-revoke"


@pytest.mark.parametrize("tls", ["shm", "tcp"])
def test_unregister_revokes_every_opener(tls: str) -> None:
    opts = {"tls": tls, "net_devices": "lo"}
    with Engine(SECRET, transports=("nixl", "tcp"), nixl=opts, name="ra") as a, \
            Engine(SECRET, transports=("nixl", "tcp"), nixl=opts, name="rb") as b:
        mem = np.zeros(1 << 20, np.uint8)  # the user's memory: it outlives the region
        region = b.register(mem)
        desc = region.descriptor()
        src = a.register(np.full(1 << 20, 1, np.uint8))
        a.write(src, desc, imm=1).wait(20)  # a opens the region and keeps a prepared request
        b.expect(1).wait(20)
        assert (mem == 1).all() and a._nixl._remotes and a._nixl._prepared
        other = b.register(np.zeros(4096, np.uint8))  # a second region of the same owner
        a.write(b"k" * 4096, other.descriptor()).wait(20)

        b.unregister(region)
        # before unregister returned, a dropped the open region and its prepared requests,
        # and b released the registration (nothing retired: every opener confirmed)
        assert all(k[1] != desc.region_id for k in a._nixl._remotes)
        assert all(p.remote.nbytes != mem.nbytes for p in a._nixl._prepared.values())
        assert not b._nixl._retired and desc.region_id not in b._nixl._owned

        src.array[:] = 7
        with pytest.raises(AccessError):
            a.write(src, desc, imm=2).wait(20)  # reopened: the owner refuses
        assert (mem == 1).all(), "a write after unregister landed"
        out = np.zeros(16, np.uint8)
        with pytest.raises(TensorFabricError):
            a.read(desc, out).wait(20)
        assert not out.any()
        # the owner's other region and the pair still work
        a.write(b"m" * 4096, other.descriptor(), imm=3).wait(20)
        b.expect(3).wait(20)
        assert bytes(other.array[:2]) == b"mm"


def test_revocation_races_with_writes() -> None:
    """Writes in flight from another thread while the owner unregisters: each either landed
    before ``unregister`` returned or is refused; none lands after."""
    opts = {"tls": "shm", "net_devices": "lo"}
    with Engine(SECRET, transports=("nixl", "tcp"), nixl=opts, name="qa") as a, \
            Engine(SECRET, transports=("nixl", "tcp"), nixl=opts, name="qb") as b:
        mem = np.zeros(1 << 16, np.uint8)
        region = b.register(mem)
        desc = region.descriptor()
        src = a.register(np.full(1 << 16, 5, np.uint8))
        a.write(src, desc).wait(20)
        stop = threading.Event()
        errors: list[BaseException] = []

        def writer() -> None:
            while not stop.is_set():
                try:
                    a.write(src, desc).wait(20)
                except AccessError:
                    pass
                except BaseException as exc:  # anything else is a bug
                    errors.append(exc)
                    return

        th = threading.Thread(target=writer)
        th.start()
        try:
            b.unregister(region)
            mem[:] = 0  # the owner reuses its memory at once
            src.array[:] = 9
            for _ in range(20):
                with pytest.raises(AccessError):
                    a.write(src, desc).wait(20)
        finally:
            stop.set()
            th.join(30)
        assert not errors, errors
        assert not mem.any(), "a write landed after unregister returned"


def test_whole_op_bounds_never_wrap() -> None:
    """The initiator's check of a whole op against the owner's size: a segment whose end
    wraps around 2**64 is outside, as is any segment of a paged op."""
    from tensorfabric.transports._nixl_base import _check_bounds, _Remote

    class Desc:
        region_id = 1

    remote = _Remote("tf-x", 0, 8192)

    def check(off: list[int], n: list[int]) -> None:
        _check_bounds(remote, Desc(), np.array(off, np.uint64), np.array(n, np.uint64), "p")

    check([0], [8192])
    check([4096, 0], [4096, 1])
    for off, n in (([2**64 - 4096], [8192]), ([8193], [0]), ([0, 4096], [4096, 4097]),
                   ([0, 2**63], [1, 2**63])):
        with pytest.raises(AccessError):
            check(off, n)


def test_forged_page_ops_write_nothing() -> None:
    """Paged writes whose offsets, strides or page ids would reach outside the region (or
    wrap around) over nixl: refused, and not a byte lands."""
    opts = {"tls": "shm", "net_devices": "lo"}
    with Engine(SECRET, transports=("nixl", "tcp"), nixl=opts, name="fa") as a, \
            Engine(SECRET, transports=("nixl", "tcp"), nixl=opts, name="fb") as b:
        mem = np.zeros(1 << 16, np.uint8)
        desc = b.register(mem).descriptor()
        src = np.full(1 << 16, 3, np.uint8)
        for kw in ({"dst_offset": 2**64 - 4096}, {"dst_stride": 2**63, "dst_pages": [1]},
                   {"dst_pages": [2**52]}, {"dst_pages": [0, 16]}):
            args = {"src_pages": [0] * len(kw.get("dst_pages", [0])), "dst_pages": [0],
                    "page_size": 4096, **kw}
            with pytest.raises((AccessError, ConfigError)):
                a.write_pages(src, desc, **args).wait(20)
        assert not mem.any()


def test_a_forgotten_opener_leaves_nothing_and_does_not_delay_unregister() -> None:
    """An opener gone past its grace: the owner drops its NIXL metadata and its openings, and
    a later unregister does not wait for it (the region's registration is retired instead:
    that peer cannot confirm)."""
    import time

    opts = {"tls": "shm", "net_devices": "lo"}
    b = Engine(SECRET, transports=("nixl", "tcp"), nixl=opts, name="gb", reconnect_grace=0.3)
    a = Engine(SECRET, transports=("nixl", "tcp"), nixl=opts, name="ga")
    try:
        region = b.register(np.zeros(1 << 16, np.uint8))
        a.write(np.full(1 << 16, 4, np.uint8), region.descriptor()).wait(20)
        assert b._nixl._openers.get(region.id) and b._nixl._remote_agents
        a.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (b._nixl._openers or b._nixl._remote_agents):
            time.sleep(0.05)
        assert not b._nixl._openers and not b._nixl._remote_agents
        t0 = time.monotonic()
        b.unregister(region)
        assert time.monotonic() - t0 < 1.0
        assert len(b._nixl._retired) == 1
    finally:
        a.close()
        b.close()


def test_read_only_region_is_never_opened_over_nixl() -> None:
    """NIXL's memory keys allow writes as well as reads, so a read-only region is read over
    tcp, and an open of it over nixl (a descriptor forged to claim write access) is refused
    without any metadata handed out: a peer bypassing tensorfabric gets nothing to write with."""
    import dataclasses

    from tensorfabric import Access

    opts = {"tls": "shm", "net_devices": "lo"}
    with Engine(SECRET, transports=("nixl", "tcp"), nixl=opts, name="oa") as a, \
            Engine(SECRET, transports=("nixl", "tcp"), nixl=opts, name="ob") as b:
        mem = np.arange(4096, dtype=np.uint8)
        region = b.register(mem, Access.REMOTE_READ)
        desc = region.descriptor()
        assert a._transport_for(a._peer(b.address), desc).name == "tcp"
        out = np.zeros(4096, np.uint8)
        a.read(desc, out).wait(20)
        assert np.array_equal(out, mem)
        forged = dataclasses.replace(desc, access=Access.READ_WRITE)
        assert a._transport_for(a._peer(b.address), forged).name == "nixl"
        for op in (lambda: a.read(forged, out), lambda: a.write(b"x" * 16, forged)):
            with pytest.raises(AccessError, match="read-only|does not allow remote write"):
                op().wait(20)
        assert not b._nixl._owned and not b._nixl._openers  # nothing registered or handed out
        assert np.array_equal(mem, np.arange(4096, dtype=np.uint8))
