"""The shared conformance suite on the nixl transport (NIXL's UCX backend over shm and tcp),
plus what only nixl has: metadata handed out only after authentication and a region key."""

from __future__ import annotations

import importlib.util
import time
from typing import Iterator

import numpy as np
import pytest

from tensorfabric import (Access, AuthenticationError, ConfigError, Engine, TensorFabricError,
                          TransferTimeout)
from tensorfabric.testing import Pair, TransportConformance

HAVE_NIXL = any(importlib.util.find_spec(m) is not None for m in ("nixl_cu13", "nixl_cu12", "nixl"))
pytestmark = [pytest.mark.nixl,
              pytest.mark.skipif(not HAVE_NIXL, reason="nixl is not installed "
                                 "(pip install --no-deps nixl-cu13==1.5.1)")]

SECRET = "nixl-conformance"


def nixl_engines(tls: str, name: str = "n") -> tuple[Engine, Engine]:
    opts = {"tls": tls, "net_devices": "lo"}
    a = Engine(SECRET, transports=("nixl", "tcp"), nixl=opts, name=f"{name}a")
    b = Engine(SECRET, transports=("nixl", "tcp"), nixl=opts, name=f"{name}b")
    return a, b


def _pair(tls: str, big: int) -> Iterator[Pair]:
    a, b = nixl_engines(tls)
    with a, b:
        def make(n: int, acc: Access):
            region = b.register(np.zeros(n, np.uint8), acc)
            expected = "nixl" if acc & Access.REMOTE_WRITE else "tcp"  # read-only: not nixl
            assert a._transport_for(a._peer(b.address), region.descriptor()).name == expected
            return region

        yield Pair(a, b, make, big=big)


class TestNixlShm(TransportConformance):
    """UCX over shared memory (cma for registered DRAM)."""

    @pytest.fixture
    def pair(self) -> Iterator[Pair]:
        yield from _pair("shm", 1 << 30)


class TestNixlTcp(TransportConformance):
    """UCX over tcp on loopback."""

    @pytest.fixture
    def pair(self) -> Iterator[Pair]:
        yield from _pair("tcp", 256 << 20)


def test_no_metadata_without_the_secret() -> None:
    """A peer with the wrong cluster secret never gets NIXL metadata: the open goes over
    the authenticated tcp link, which refuses it."""
    opts = {"tls": "shm", "net_devices": "lo"}
    with Engine(SECRET, transports=("nixl", "tcp"), nixl=opts) as owner, \
            Engine("wrong", transports=("nixl", "tcp"), nixl=opts) as intruder:
        region = owner.register(np.zeros(4096, np.uint8))
        with pytest.raises(AuthenticationError):
            intruder.write(b"x" * 10, region.descriptor()).wait(10)
        assert not region.array.any()
        assert not owner._nixl._remote_agents and not owner._nixl._owned


def test_missing_nixl_names_the_extra() -> None:
    from tensorfabric.transports import _nixl

    with pytest.raises(ImportError, match=r"tensorfabric\[nixl\]"):
        _nixl.load_nixl("no_such_nixl_module")
    with pytest.raises(ImportError, match=r"tensorfabric\[nixl\]"):
        Engine(SECRET, transports=("nixl", "tcp"), nixl={"module": "no_such_nixl_module"})


@pytest.mark.parametrize("opts, match", [
    ({"tsl": "shm"}, "unknown nixl option"),
    ({"tls": "no_such_tl"}, "could not start its UCX backend"),
    ({"backend": "NOPE"}, "has no NOPE plugin"),
])
def test_bad_options_are_config_errors(opts: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Engine(SECRET, transports=("nixl", "tcp"), nixl=opts)


def test_bulk_bytes_bypass_the_tcp_links() -> None:
    """The data goes through NIXL: tcp carries only the open request and its answer."""
    a, b = nixl_engines("shm", "bypass")
    with a, b:
        region = b.register(np.zeros(16 << 20, np.uint8))
        src = np.random.default_rng(1).integers(0, 256, 16 << 20, dtype=np.uint8)
        a.write(src, region.descriptor(), imm=3).wait(20)
        b.expect(3).wait(20)
        assert np.array_equal(region.array, src)
        sent = sum(sum(v) for v in a.stats()["links"].values())
        assert 0 < sent < 64 << 10, f"{sent} bytes went over tcp"


def test_both_directions_at_once() -> None:
    """Each engine is owner and initiator: metadata loaded in both roles must not clash."""
    import threading

    a, b = nixl_engines("shm", "both")
    with a, b:
        ra, rb = a.register(np.zeros(1 << 20, np.uint8)), b.register(np.zeros(1 << 20, np.uint8))
        errors: list[BaseException] = []

        def run(src: Engine, dst_desc, imm: int) -> None:
            try:
                for i in range(16):
                    src.write(np.full(1 << 16, i, np.uint8), dst_desc, dst_offset=i << 16,
                              imm=imm).wait(20)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(a, rb.descriptor(), 1)),
                   threading.Thread(target=run, args=(b, ra.descriptor(), 2))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        b.expect(1, 16).wait(20)
        a.expect(2, 16).wait(20)
        for r in (ra, rb):
            assert all((r.array[i << 16:(i + 1) << 16] == i).all() for i in range(16))


def test_cancelled_ops_leave_no_work_behind() -> None:
    a, b = nixl_engines("shm", "cancel")
    with a, b:
        region = b.register(np.zeros(64 << 20, np.uint8))
        a.write(b"warm", region.descriptor()).wait(20)
        for _ in range(3):
            a.write(np.ones(64 << 20, np.uint8), region.descriptor()).cancel()
        deadline = time.monotonic() + 20
        while a._nixl._ops and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not a._nixl._ops, "finished or cancelled ops must be dropped by the progress loop"


def test_docs_examples_run() -> None:
    """Every python block in docs/nixl.md runs as written."""
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[2] / "docs" / "nixl.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
    assert blocks
    for i, code in enumerate(blocks):
        exec(compile(code, f"nixl.md[{i}]", "exec"), {"__name__": "__doc_example__"})


def test_without_confirmation_the_owner_still_checks() -> None:
    """confirm=False: ops complete when NIXL is done; the owner still counts only valid ops."""
    opts = {"tls": "shm", "net_devices": "lo", "confirm": False}
    with Engine(SECRET, transports=("nixl", "tcp"), nixl=opts) as a, \
            Engine(SECRET, transports=("nixl", "tcp"), nixl=opts) as b:
        region = b.register(np.zeros(1 << 20, np.uint8))
        desc = region.descriptor()
        a.write(np.full(1 << 20, 5, np.uint8), desc, imm=8).wait(20)
        b.expect(8).wait(20)
        assert (region.array == 5).all()
        back = np.zeros(1000, np.uint8)
        a.read(desc, back).wait(20)
        assert (back == 5).all()
        b.unregister(region)  # a's open is cached; NIXL may refuse, else the owner does
        try:
            a.write(b"x" * 10, desc, imm=9).wait(20)
        except TensorFabricError:
            pass
        with pytest.raises(TransferTimeout):
            b.expect(9, timeout=0.5).wait()
        fresh = b.register(np.zeros(100, np.uint8))  # the pair recovers
        a.write(b"y" * 100, fresh.descriptor(), imm=10).wait(20)
        b.expect(10).wait(20)
        assert bytes(fresh.array[:3]) == b"yyy"
