"""The vectorized frame planner (engine perf): same pieces, in order, as the per-page loop."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorfabric._ops import MAX_SEGS_PER_CHUNK, plan_pieces


def _reference(src_off, dst_off, lengths, chunk_bytes):  # type: ignore[no-untyped-def]
    """The straightforward loop: fill each frame up to chunk_bytes / MAX_SEGS_PER_CHUNK."""
    out, cur, cur_bytes = [], [], 0
    for s, d, n in zip(src_off.tolist(), dst_off.tolist(), lengths.tolist()):
        while n > 0:
            take = min(n, chunk_bytes - cur_bytes)
            cur.append((s, d, take))
            cur_bytes, s, d, n = cur_bytes + take, s + take, d + take, n - take
            if cur_bytes >= chunk_bytes or len(cur) >= MAX_SEGS_PER_CHUNK:
                out.append(cur)
                cur, cur_bytes = [], 0
    if cur or not out:
        out.append(cur)
    return out


@settings(max_examples=100, deadline=None)
@given(segs=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 10**9),
                               st.integers(0, 50_000)), max_size=80),
       chunk=st.integers(1, 100_000))
def test_plan_matches_the_loop(segs: list[tuple[int, int, int]], chunk: int) -> None:
    so, do, ln = (np.array([x[i] for x in segs], dtype=np.uint64) for i in range(3))
    ps, pd, pl, bounds = plan_pieces(so, do, ln, chunk)
    frames = [list(zip(ps[a:b].tolist(), pd[a:b].tolist(), pl[a:b].tolist()))
              for a, b in zip(bounds[:-1], bounds[1:])]
    assert frames == _reference(so, do, ln, chunk)


def test_plan_caps_segments_per_frame() -> None:
    n = 3 * MAX_SEGS_PER_CHUNK + 5
    off = np.arange(n, dtype=np.uint64) * 1024
    ps, pd, pl, bounds = plan_pieces(off, off[::-1].copy(), np.full(n, 1024, np.uint64), 64 << 20)
    sizes = np.diff(bounds)
    assert sizes.max() <= MAX_SEGS_PER_CHUNK and sizes.sum() == n and int(pl.sum()) == n * 1024


@settings(deadline=None, max_examples=60)
@given(total=st.integers(1, 1 << 34), chunk=st.sampled_from([4096, 1 << 20, 4 << 20]),
       links=st.integers(1, 8))
def test_frame_starts_cover_the_op_in_bounded_frames(total: int, chunk: int, links: int) -> None:
    from tensorfabric._ops import frame_starts

    starts = frame_starts(total, chunk, links)
    sizes = np.diff(starts)
    assert starts[0] == 0 and starts[-1] == total
    assert (sizes > 0).all() and (sizes <= chunk).all()
    if links > 1 and total > 16 * chunk:
        # the tail shrinks: the last frame is at most a small slice of the op
        assert sizes[-1] <= max(256 << 10, chunk // 4)
