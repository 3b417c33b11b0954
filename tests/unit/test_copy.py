"""The shm transport's segment copier: splitting across threads and batched page copies must
move exactly the bytes a plain per-segment loop moves, on the numpy path and through the
compiled loop (``tensorfabric._native.copy_segments``) alike."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensorfabric import _compiled
from tensorfabric.transports import _copy

N = 1 << 16
NATIVE = _compiled.native
# the fixture below sets the path for a whole test, not per example
PROPS = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True, params=["numpy", pytest.param("native", marks=pytest.mark.skipif(
    NATIVE is None, reason="tensorfabric._native is not built (no C compiler at install)"))])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test on the numpy path and on the compiled copy (where it is built)."""
    monkeypatch.setattr(_compiled, "native", None if request.param == "numpy" else NATIVE)
    return str(request.param)


NUMPY_ONLY = pytest.mark.parametrize("kernels", ["numpy"], indirect=True)


def reference(dst: np.ndarray, src: np.ndarray, so: np.ndarray, do: np.ndarray,
              ln: np.ndarray) -> np.ndarray:
    out = dst.copy()
    for s, d, n in zip(so.tolist(), do.tolist(), ln.tolist()):
        out[d:d + n] = src[s:s + n]
    return out


def _case(so: np.ndarray, do: np.ndarray, ln: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random source and destination buffers, and what the destination must hold after."""
    rng = np.random.default_rng(len(ln))
    src = rng.integers(0, 256, N, dtype=np.uint8)
    dst = rng.integers(0, 256, N, dtype=np.uint8)
    return src, dst, reference(dst, src, so, do, ln)


@st.composite
def segments(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-overlapping destination segments (any source), of mixed and repeated sizes."""
    sizes = draw(st.lists(st.sampled_from([1, 3, 64, 512, 4096, 70_000 % N]), min_size=0,
                          max_size=60))
    gaps = draw(st.lists(st.integers(0, 40), min_size=len(sizes), max_size=len(sizes)))
    do, pos = [], 0
    for size, gap in zip(sizes, gaps):
        pos += gap
        if pos + size > N:
            break
        do.append(pos)
        pos += size
    sizes = sizes[:len(do)]
    so = [draw(st.integers(0, N - size)) for size in sizes]
    perm = draw(st.permutations(range(len(do))))
    pick = lambda xs: np.array([xs[i] for i in perm], dtype=np.int64)  # noqa: E731
    return pick(so), pick(do), pick(sizes)


@PROPS
@given(segments(), st.integers(1, 5))
def test_split_then_copy_matches_a_plain_loop(segs, parts) -> None:
    so, do, ln = segs
    src, dst, want = _case(so, do, ln)
    pieces = _copy.split(so, do, ln, parts)
    assert sum(int(p[2].sum()) for p in pieces) == int(ln.sum())
    assert all((p[2] > 0).all() for p in pieces)
    for piece in pieces:
        _copy.copy_segments(dst, src, *piece)
    np.testing.assert_array_equal(dst, want)


def test_split_cuts_one_big_segment_evenly() -> None:
    pieces = _copy.split(np.array([10]), np.array([1000]), np.array([1 << 20]), 4)
    assert [int(p[2][0]) for p in pieces] == [1 << 18] * 4
    assert [int(p[0][0]) for p in pieces] == [10 + i * (1 << 18) for i in range(4)]
    assert [int(p[1][0]) for p in pieces] == [1000 + i * (1 << 18) for i in range(4)]


def test_batched_pages_at_unaligned_offsets_and_readonly_source() -> None:
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, N, dtype=np.uint8)
    src.flags.writeable = False
    dst = np.zeros(N, dtype=np.uint8)
    n, size = 200, 100
    so = rng.integers(0, N - size, n)
    do = np.arange(n, dtype=np.int64) * (size + 7) + 3  # not a multiple of the page size
    ln = np.full(n, size, dtype=np.int64)
    want = reference(dst, src, so, do, ln)
    _copy.copy_segments(dst, src, so, do, ln)
    np.testing.assert_array_equal(dst, want)


def test_plan_parts() -> None:
    mib = 1 << 20
    assert _copy.plan_parts(np.array([1 * mib]), 4, part_min=2 * mib) == 1
    assert _copy.plan_parts(np.array([64 * mib]), 4, part_min=2 * mib) == 4
    assert _copy.plan_parts(np.array([5 * mib]), 4, part_min=2 * mib) == 2
    assert _copy.plan_parts(np.array([64 * mib]), 1, part_min=2 * mib) == 1
    assert _copy.plan_parts(np.array([], dtype=np.int64), 4) == 1


def _runs_of(draw: st.DrawFn, size: int) -> tuple[list[int], list[int], int]:
    """Offsets and lengths of runs of ``size``-byte segments lying back to back (some runs
    short, an odd-sized segment after some), gaps between runs; and the end offset."""
    off, ln, pos = [], [], 0
    for k in draw(st.lists(st.integers(1, 20), min_size=1, max_size=6)):
        pos += draw(st.integers(0, 50))
        for _ in range(k):
            off.append(pos)
            ln.append(size)
            pos += size
        if draw(st.booleans()):  # an odd segment between runs
            off.append(pos)
            ln.append(size + 1)
            pos += size + 1
    return off, ln, pos


def _in_any_order(draw: st.DrawFn, so: list[int], do: list[int], ln: list[int],
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = draw(st.permutations(range(len(ln))))  # the caller's order is arbitrary
    pick = lambda xs: np.array([xs[i] for i in order], dtype=np.int64)  # noqa: E731
    return pick(so), pick(do), pick(ln)


_NONE = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))


@st.composite
def source_runs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pages taken back to back from the source to a shuffled set of non-overlapping
    destination slots."""
    so, ln, end = _runs_of(draw, draw(st.sampled_from([1, 16, 100, 4096])))
    slots = max(ln) + 7  # destination slots of one width, a gap in each
    if end >= N or len(ln) * slots >= N:
        return _NONE
    perm = draw(st.permutations(range(len(ln))))
    return _in_any_order(draw, so, [perm[i] * slots for i in range(len(ln))], ln)


@PROPS
@given(source_runs())
def test_runs_from_a_contiguous_source_match_a_plain_loop(segs) -> None:
    so, do, ln = segs
    src, dst, want = _case(so, do, ln)
    _copy.copy_segments(dst, src, so, do, ln)
    np.testing.assert_array_equal(dst, want)


@pytest.fixture
def looped(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Segments left to the per-page loop, one entry per call."""
    calls: list[int] = []
    real = _copy._loop
    monkeypatch.setattr(_copy, "_loop", lambda d, s, so, do, ln: (calls.append(len(ln)), real(d, s, so, do, ln)))
    return calls


@NUMPY_ONLY  # how the numpy path batches pages
def test_a_long_source_run_is_copied_in_one_numpy_call(looped: list[int]) -> None:
    """1024 pages of 16 KiB from one contiguous source: no per-page loop left over."""
    n, page = 1024, 16 << 10
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, n * page, dtype=np.uint8)
    dst = np.zeros_like(src)
    so = rng.permutation(n).astype(np.int64) * page
    do = rng.permutation(n).astype(np.int64) * page
    ln = np.full(n, page, np.int64)
    _copy.copy_segments(dst, src, so, do, ln)
    assert looped == [0]
    for s, d in zip(so[:64].tolist(), do[:64].tolist()):
        np.testing.assert_array_equal(dst[d:d + page], src[s:s + page])
    np.testing.assert_array_equal(np.sort(dst.reshape(n, page)[:, 0]), np.sort(src.reshape(n, page)[:, 0]))


@NUMPY_ONLY  # how the numpy path batches pages
def test_pages_in_source_runs_are_split_over_threads_in_source_order() -> None:
    n, page = 1024, 16 << 10
    rng = np.random.default_rng(2)
    so = rng.permutation(n).astype(np.int64) * page
    do = rng.permutation(n).astype(np.int64) * page
    ln = np.full(n, page, np.int64)
    s2, d2, l2, runs = _copy.by_source(so, do, ln)
    assert runs and (np.diff(s2) == page).all()
    assert sorted(zip(s2.tolist(), d2.tolist())) == sorted(zip(so.tolist(), do.tolist()))
    assert _copy.plan_parts(l2, 2, runs=runs) == 2 and _copy.plan_parts(l2, 2) == 1
    scattered = rng.choice(4 * n, n, replace=False).astype(np.int64) * page
    spread = rng.choice(4 * n, n, replace=False).astype(np.int64) * page
    assert not _copy.by_source(scattered, spread, ln)[3]  # runs on neither side
    src = rng.integers(0, 256, n * page, dtype=np.uint8)
    dst = np.zeros_like(src)
    for part in _copy.split(s2, d2, l2, 2):  # each part: one long run, copied in one call
        _copy.copy_segments(dst, src, *part)
    np.testing.assert_array_equal(dst, reference(np.zeros_like(src), src, so, do, ln))


@st.composite
def dest_runs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pages gathered from a pool (source offsets mostly multiples of the page size, some not)
    into runs that lie back to back in the destination."""
    size = draw(st.sampled_from([1, 16, 96, 4096]))
    do, ln, end = _runs_of(draw, size)
    pool = N // size
    if end >= N or len(ln) > pool - 1:
        return _NONE
    slots = draw(st.lists(st.integers(0, pool - 2), min_size=len(ln), max_size=len(ln), unique=True))
    shift = draw(st.sampled_from([0, 0, 0, 3]))  # sometimes unaligned: the loop's case
    return _in_any_order(draw, [slot * size + (shift if size > 3 else 0) for slot in slots], do, ln)


@PROPS
@given(dest_runs(), st.integers(1, 3))
def test_runs_into_a_contiguous_destination_match_a_plain_loop(segs, parts) -> None:
    so, do, ln = segs
    src, dst, want = _case(so, do, ln)
    s2, d2, l2, _runs = _copy.by_source(so, do, ln)  # the shm transport's path
    for part in _copy.split(s2, d2, l2, parts):
        _copy.copy_segments(dst, src, *part, presorted=True)
    np.testing.assert_array_equal(dst, want)


@NUMPY_ONLY  # how the numpy path batches pages
def test_pages_gathered_from_a_pool_are_one_take_per_run(looped: list[int]) -> None:
    n, page = 512, 16 << 10
    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, 4 * n * page, dtype=np.uint8)  # a pool 4x the pages moved
    dst = np.zeros(n * page, dtype=np.uint8)
    so = rng.choice(4 * n, n, replace=False).astype(np.int64) * page
    do = rng.permutation(n).astype(np.int64) * page
    ln = np.full(n, page, np.int64)
    s2, d2, l2, runs = _copy.by_source(so, do, ln)
    assert runs and (np.diff(d2) == page).all()
    for part in _copy.split(s2, d2, l2, 2):
        _copy.copy_segments(dst, src, *part, presorted=True)
    assert looped == [0, 0]
    np.testing.assert_array_equal(dst, reference(np.zeros_like(dst), src, so, do, ln))


@pytest.mark.skipif(NATIVE is None, reason="tensorfabric._native is not built")
def test_compiled_copy_checks_every_segment_before_copying_any() -> None:
    src = np.arange(64, dtype=np.uint8)
    dst = np.zeros(64, np.uint8)
    ok = np.array([0, 8], np.int64), np.array([0, 8], np.int64), np.array([8, 8], np.int64)
    for i, bad in ((0, 57), (1, 57), (2, 65), (0, -1), (1, -1), (2, -1), (2, 1 << 62)):
        segs = [a.copy() for a in ok]
        segs[i][1] = bad
        with pytest.raises(IndexError, match="segment 1 .* is outside the buffers"):
            NATIVE.copy_segments(dst, src, *segs)
        assert not dst.any()  # the first, good segment was not copied either
    with pytest.raises(ValueError, match="one length"):
        NATIVE.copy_segments(dst, src, ok[0], ok[1], ok[2][:1])
    ro = np.zeros(64, np.uint8)
    ro.flags.writeable = False
    with pytest.raises((BufferError, ValueError)):
        NATIVE.copy_segments(ro, src, *ok)
    NATIVE.copy_segments(dst, src, *ok)
    assert (dst[:16] == src[:16]).all() and not dst[16:].any()


@pytest.mark.skipif(NATIVE is None, reason="tensorfabric._native is not built")
@pytest.mark.parametrize("kernels", ["native"], indirect=True)
def test_with_the_compiled_copy_any_pages_sort_by_source_and_may_use_threads() -> None:
    """No runs needed: the compiled loop releases the GIL for any segments."""
    n, page = 256, 4 << 10
    rng = np.random.default_rng(4)
    so = rng.choice(4 * n, n, replace=False).astype(np.int64) * page
    do = rng.choice(4 * n, n, replace=False).astype(np.int64) * page
    s2, d2, l2, runs = _copy.by_source(so, do, np.full(n, page, np.int64))
    assert runs and (np.diff(s2) > 0).all()
    assert sorted(zip(s2.tolist(), d2.tolist())) == sorted(zip(so.tolist(), do.tolist()))
