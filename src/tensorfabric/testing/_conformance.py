"""The conformance suite every transport must pass.

Subclass :class:`TransportConformance` in a pytest module and provide a ``pair`` fixture that
yields a :class:`Pair`: two engines and a way to make destination regions on the second one
that the transport under test will carry. Every test below then runs on that transport::

    class TestTcp(TransportConformance):
        @pytest.fixture
        def pair(self):
            with Engine(secret="s", transports=("tcp",)) as a, Engine(secret="s") as b:
                yield Pair(a, b, lambda n, acc: b.register(np.zeros(n, np.uint8), acc))

Needs pytest (imported when this module is).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Callable

import numpy as np
import pytest

from .._engine import Engine, ScatterDest
from .._errors import (
    AccessError,
    BrokenError,
    CancelledError,
    ClosedError,
    ConfigError,
    TransferTimeout,
)
from .._region import Access, MemoryRegion, RegionDescriptor


@dataclasses.dataclass
class Pair:
    """Two connected engines: ``a`` acts on regions that ``b`` owns."""

    a: Engine
    b: Engine
    make_region: Callable[[int, Access], MemoryRegion]  # a region owned by ``b``
    big: int = 1 << 30  # size of the "huge payload" test

    def region(self, nbytes: int, access: Access = Access.READ_WRITE) -> MemoryRegion:
        return self.make_region(nbytes, access)


def _rand(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def _forged(desc: RegionDescriptor, **changes: object) -> RegionDescriptor:
    return dataclasses.replace(desc, **changes)  # type: ignore[arg-type]


class TransportConformance:
    """Behaviour every transport shares. Provide a ``pair`` fixture (see module docstring)."""

    T = 20.0  # seconds any single wait may take
    HUGE_T = 600.0  # the gigabyte write and read (test_huge_write_and_read)

    # -- sizes ---------------------------------------------------------------------------

    @pytest.mark.parametrize("n", [0, 1, 7, 4095, 4097, 65_537, 1_000_003, (4 << 20) + 3])
    def test_write_sizes(self, pair: Pair, n: int) -> None:
        dst = pair.region(n + 16)
        src = _rand(n, n)
        pair.a.write(src, dst.descriptor(), dst_offset=8).wait(self.T)
        got = dst.array
        assert np.array_equal(got[8:8 + n], src)
        assert not got[:8].any() and not got[8 + n:].any()

    def test_huge_write_and_read(self, pair: Pair) -> None:
        n = pair.big
        dst = pair.region(n)
        src = np.empty(n, dtype=np.uint8)
        src[::4096] = np.arange(len(src[::4096]), dtype=np.uint64).astype(np.uint8)
        src[-1] = 0xAB
        # the ops' own deadline, not the engine's default (60 s): a loaded 2-core machine has
        # taken over a minute for a gigabyte over one tcp link with a stalled link redialled
        pair.a.write(src, dst.descriptor(), imm=11, timeout=self.HUGE_T).wait(self.HUGE_T)
        pair.b.expect(11).wait(self.T)
        assert np.array_equal(dst.array[::4096], src[::4096]) and dst.array[-1] == 0xAB
        back = np.zeros(n, dtype=np.uint8)
        pair.a.read(dst.descriptor(), back, timeout=self.HUGE_T).wait(self.HUGE_T)
        assert np.array_equal(back[::4096], src[::4096]) and back[-1] == 0xAB

    def test_large_random_write_and_read_are_exact(self, pair: Pair) -> None:
        # big enough that copies are split across threads and frames across links
        n = (18 << 20) + 5
        dst = pair.region(n + 8)
        src = _rand(n, 17)
        pair.a.write(src, dst.descriptor(), dst_offset=3).wait(self.T)
        assert np.array_equal(dst.array[3:3 + n], src)
        back = np.zeros(n + 1, dtype=np.uint8)
        pair.a.read(dst.descriptor(), back, src_offset=3, dst_offset=1, nbytes=n).wait(self.T)
        assert back[0] == 0 and np.array_equal(back[1:], src)

    def test_write_from_region_and_offsets(self, pair: Pair) -> None:
        src_region = pair.a.register(_rand(10_000, 3))
        dst = pair.region(20_000)
        pair.a.write(src_region, dst.descriptor(), src_offset=100, dst_offset=5_000,
                     nbytes=3_000).wait(self.T)
        assert np.array_equal(dst.array[5_000:8_000], src_region.array[100:3_100])

    # -- paged and scatter ---------------------------------------------------------------

    @pytest.mark.parametrize("page", [1, 1000, 16 << 10])
    def test_write_pages(self, pair: Pair, page: int) -> None:
        npages = 300
        rng = np.random.default_rng(page)
        src = _rand(npages * page * 2 + 64, page)
        dst = pair.region(npages * page * 3 + 128)
        # a contiguous run first (merged into one segment by the engine), then random pages
        src_rest = rng.permutation(np.arange(50, npages * 2))[:npages - 50]
        dst_rest = rng.permutation(np.setdiff1d(np.arange(npages * 3), np.arange(100, 150)))
        src_pages = np.concatenate([np.arange(50), src_rest])
        dst_pages = np.concatenate([np.arange(100, 150), dst_rest[:npages - 50]])
        pair.a.write_pages(src, dst.descriptor(), src_pages=src_pages, dst_pages=dst_pages,
                           page_size=page, src_offset=64, dst_offset=128, imm=5).wait(self.T)
        pair.b.expect(5).wait(self.T)
        expect = np.zeros_like(dst.array)
        for s, d in zip(src_pages, dst_pages):
            expect[128 + d * page:128 + (d + 1) * page] = src[64 + s * page:64 + (s + 1) * page]
        assert np.array_equal(dst.array, expect)

    @pytest.mark.parametrize("page", [64, 4096])
    def test_write_pages_gathered_into_consecutive_pages(self, pair: Pair, page: int) -> None:
        """Scattered source pages into back-to-back destination pages (an MoE combine's
        shape: a receiver may take such pages as one piece), with one gap between two runs."""
        n = 200
        rng = np.random.default_rng(page + 1)
        src = _rand(n * 2 * page, page + 3)
        dst = pair.region((n + 7) * page)
        src_pages = rng.permutation(2 * n)[:n]
        dst_pages = np.concatenate([np.arange(n // 2), np.arange(n // 2 + 7, n + 7)])
        pair.a.write_pages(src, dst.descriptor(), src_pages=src_pages, dst_pages=dst_pages,
                           page_size=page, imm=6).wait(self.T)
        pair.b.expect(6).wait(self.T)
        expect = np.zeros_like(dst.array)
        for s, d in zip(src_pages, dst_pages):
            expect[d * page:(d + 1) * page] = src[s * page:(s + 1) * page]
        assert np.array_equal(dst.array, expect)

    def test_write_pages_with_strides(self, pair: Pair) -> None:
        # per-layer KV blocks: a page of 256 bytes every 1024 bytes
        src = _rand(64 * 1024, 9)
        dst = pair.region(64 * 2048)
        pages = np.arange(64)
        pair.a.write_pages(src, dst.descriptor(), src_pages=pages, dst_pages=pages[::-1],
                           page_size=256, src_stride=1024, dst_stride=2048).wait(self.T)
        for i in range(64):
            d = 63 - i
            assert np.array_equal(dst.array[d * 2048:d * 2048 + 256], src[i * 1024:i * 1024 + 256])

    def test_write_pages_rejects_bad_input(self, pair: Pair) -> None:
        dst = pair.region(4096)
        with pytest.raises(ConfigError):
            pair.a.write_pages(b"x" * 4096, dst.descriptor(), src_pages=[0, 1], dst_pages=[0],
                               page_size=1024)
        with pytest.raises(ConfigError):
            pair.a.write_pages(b"x" * 4096, dst.descriptor(), src_pages=[-1], dst_pages=[0],
                               page_size=1024)
        with pytest.raises(AccessError):
            pair.a.write_pages(b"x" * 4096, dst.descriptor(), src_pages=[0], dst_pages=[4],
                               page_size=1024)
        assert not dst.array.any()

    def test_scatter_counts_imm_per_destination(self, pair: Pair) -> None:
        src = _rand(3000, 4)
        regions = [pair.region(1000) for _ in range(3)]
        dests = [ScatterDest(r.descriptor(), i * 1000, 0, 1000) for i, r in enumerate(regions)]
        pair.a.scatter(src, dests, imm=21).wait(self.T)
        pair.b.expect(21, 3).wait(self.T)
        for i, r in enumerate(regions):
            assert np.array_equal(r.array, src[i * 1000:(i + 1) * 1000])
        with pytest.raises(TransferTimeout):
            pair.b.expect(21, 1, timeout=0.3).wait()

    # -- immediates ----------------------------------------------------------------------

    def test_imm_counts_one_op_once(self, pair: Pair) -> None:
        n = 20 << 20  # several chunks, possibly over several links
        dst = pair.region(n)
        pair.a.write(_rand(n, 5), dst.descriptor(), imm=99).wait(self.T)
        pair.b.expect(99).wait(self.T)
        with pytest.raises(TransferTimeout):
            pair.b.expect(99, timeout=0.3).wait()

    def test_expect_before_and_after_arrival(self, pair: Pair) -> None:
        dst = pair.region(100)
        early = pair.b.expect(7, 3)
        for _ in range(2):
            pair.a.write(b"a" * 10, dst.descriptor(), imm=7).wait(self.T)
        assert not early.done()
        pair.a.write(b"b" * 10, dst.descriptor(), imm=7).wait(self.T)
        early.wait(self.T)
        pair.a.write(b"c" * 10, dst.descriptor(), imm=8).wait(self.T)
        pair.b.expect(8).wait(self.T)  # arrived before the call: completes at once

    def test_expect_timeout_returns_what_it_took(self, pair: Pair) -> None:
        dst = pair.region(10)
        pair.a.write(b"x", dst.descriptor(), imm=31).wait(self.T)
        with pytest.raises(TransferTimeout):
            pair.b.expect(31, 2, timeout=0.3).wait()
        pair.b.expect(31, 1).wait(self.T)  # the one arrival was given back

    def test_barrier_and_imm_only_write(self, pair: Pair) -> None:
        dst = pair.region(8)
        pair.a.barrier([pair.b.address], 55).wait(self.T)
        pair.a.write(b"", dst.descriptor(), nbytes=0, imm=55).wait(self.T)
        pair.b.expect(55, 2).wait(self.T)

    # -- reads ---------------------------------------------------------------------------

    def test_read(self, pair: Pair) -> None:
        region = pair.region(50_000)
        region.array[:] = _rand(50_000, 6)
        out = bytearray(20_000)
        pair.a.read(region.descriptor(), out, src_offset=10_000).wait(self.T)
        assert bytes(out) == region.array[10_000:30_000].tobytes()

    def test_read_write_only_region_is_refused(self, pair: Pair) -> None:
        region = pair.region(100, Access.REMOTE_WRITE)
        with pytest.raises(AccessError):
            pair.a.read(region.descriptor(), bytearray(10)).wait(self.T)
        forged = _forged(region.descriptor(), access=Access.READ_WRITE)
        with pytest.raises(AccessError):  # the owner checks too, not only the descriptor
            pair.a.read(forged, bytearray(10)).wait(self.T)

    def test_write_read_only_region_is_refused(self, pair: Pair) -> None:
        region = pair.region(100, Access.REMOTE_READ)
        forged = _forged(region.descriptor(), access=Access.READ_WRITE)
        with pytest.raises(AccessError):
            pair.a.write(b"z" * 100, forged).wait(self.T)
        assert not region.array.any()

    # -- access control ------------------------------------------------------------------

    def test_wrong_key_writes_nothing(self, pair: Pair) -> None:
        region = pair.region(1 << 20)
        forged = _forged(region.descriptor(), key=b"\x00" * 16)
        with pytest.raises(AccessError):
            pair.a.write(_rand(1 << 20, 1) | 1, forged, imm=3).wait(self.T)
        assert not region.array.any()
        with pytest.raises(TransferTimeout):
            pair.b.expect(3, timeout=0.2).wait()
        # the connection survives: a good write still works
        pair.a.write(b"ok", region.descriptor()).wait(self.T)
        assert bytes(region.array[:2]) == b"ok"

    def test_out_of_bounds_checked_by_owner(self, pair: Pair) -> None:
        region = pair.region(1000)
        forged = _forged(region.descriptor(), nbytes=1 << 20)
        with pytest.raises(AccessError):
            pair.a.write(_rand(5000, 2) | 1, forged, dst_offset=500).wait(self.T)
        assert not region.array.any()
        with pytest.raises(AccessError):
            pair.a.read(forged, bytearray(100), src_offset=990).wait(self.T)
        with pytest.raises(AccessError):  # caught locally from the true descriptor
            pair.a.write(b"x" * 10, region.descriptor(), dst_offset=995)

    def test_unregistered_region(self, pair: Pair) -> None:
        region = pair.region(100)
        desc = region.descriptor()
        pair.b.unregister(region)
        with pytest.raises(AccessError):
            pair.a.write(b"x", desc).wait(self.T)

    def test_descriptor_round_trip(self, pair: Pair) -> None:
        region = pair.region(4096)
        desc = region.descriptor()
        again = RegionDescriptor.from_bytes(desc.to_bytes())
        assert again == desc
        pair.a.write(b"abc", desc.to_bytes()).wait(self.T)  # bytes work wherever descriptors do
        assert bytes(region.array[:3]) == b"abc"
        with pytest.raises(ConfigError):
            RegionDescriptor.from_bytes(b"garbage")

    # -- two-sided messages --------------------------------------------------------------

    def test_send_recv_tags(self, pair: Pair) -> None:
        pair.a.send(pair.b.address, b"one", tag=1).wait(self.T)
        pair.a.send(pair.b.address, b"two", tag=2).wait(self.T)
        assert pair.b.recv(tag=2, timeout=self.T).data == b"two"
        msg = pair.b.recv(tag=1, timeout=self.T)
        assert msg.data == b"one"
        pair.b.send(msg.peer, b"reply", tag=1).wait(self.T)
        assert pair.a.recv(tag=1, timeout=self.T).data == b"reply"
        with pytest.raises(TransferTimeout):
            pair.b.recv(tag=1, timeout=0.2)

    # -- handles, cancellation, close ----------------------------------------------------

    def test_callbacks_and_await(self, pair: Pair) -> None:
        dst = pair.region(1000)
        seen = threading.Event()
        t = pair.a.write(b"q" * 1000, dst.descriptor())
        t.add_done_callback(lambda _: seen.set())
        assert seen.wait(self.T) and t.done() and t.exception() is None

        async def go() -> None:
            await pair.a.write(b"r" * 1000, dst.descriptor(), imm=77)
            await pair.b.expect(77)

        asyncio.run(asyncio.wait_for(go(), self.T))
        assert bytes(dst.array[:1]) == b"r"

    def test_cancel(self, pair: Pair) -> None:
        dst = pair.region(64 << 20)
        t = pair.a.write(np.ones(64 << 20, np.uint8), dst.descriptor())
        cancelled = t.cancel()
        if cancelled:
            assert t.cancelled()
            with pytest.raises(CancelledError):
                t.wait(self.T)
        else:
            t.wait(self.T)
        # the engine still works after a cancel
        pair.a.write(b"after", dst.descriptor()).wait(self.T)
        assert not pair.a.write(b"x", dst.descriptor()).wait(self.T).cancel()

    def test_op_timeout(self, pair: Pair) -> None:
        with pytest.raises(TransferTimeout):
            pair.b.expect(12345, timeout=0.2).wait()
        with pytest.raises(ConfigError):
            pair.b.expect(1, timeout=0)

    def test_close_fails_pending_and_later_ops(self, pair: Pair) -> None:
        desc = pair.region(10).descriptor()
        pending = pair.b.expect(4242)
        pending_recv = pair.b.recv_async(tag=9)
        pair.b.close()
        with pytest.raises(ClosedError):
            pending.wait(self.T)
        with pytest.raises(ClosedError):
            pending_recv.wait(self.T)
        with pytest.raises(ClosedError):
            pair.b.alloc(10)
        t0 = time.monotonic()
        with pytest.raises(BrokenError):
            pair.a.write(b"x", desc, timeout=10).wait()
        assert time.monotonic() - t0 < 9, "a closed peer must fail writes promptly"

    def test_bad_arguments(self, pair: Pair) -> None:
        dst = pair.region(100)
        with pytest.raises(ConfigError):
            pair.a.write(object(), dst.descriptor())
        with pytest.raises(ConfigError):
            pair.a.write(b"x" * 10, dst.descriptor(), src_offset=5, nbytes=10)
        with pytest.raises(ConfigError):
            pair.a.write(b"x", dst.descriptor(), imm=-1)
        for bad in ({"src_offset": -1}, {"dst_offset": -1}, {"nbytes": -1}, {"dst_offset": 2.0},
                    {"src_offset": "1"}, {"nbytes": 20}):
            with pytest.raises(ConfigError):
                pair.a.write(b"x" * 10, dst.descriptor(), **bad)
        # numpy integers (and bools' ints) are offsets like any int
        pair.a.write(b"abcdefghij", dst.descriptor(), src_offset=np.int64(2),  # type: ignore[arg-type]
                     dst_offset=np.uint32(90), nbytes=np.int64(8)).wait(self.T)  # type: ignore[arg-type]
        pair.a.write(b"XY", dst.descriptor(), src_offset=True, dst_offset=98).wait(self.T)
        assert bytes(dst.array[90:100]) == b"cdefghijY\0"
        with pytest.raises(ConfigError):
            pair.a.write(b"x", b"not a descriptor")
        with pytest.raises(ConfigError):
            pair.a.send(b"not an address", b"x")
