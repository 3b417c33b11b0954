"""MoE bookkeeping without a fabric: what each rank sends, how batches form, where answers go.

Every test runs the numpy plans and, where ``tensorfabric._native`` is built, the compiled
ones; one more checks that the two give the same arrays on many routings."""

from __future__ import annotations

import numpy as np
import pytest

from tensorfabric import ConfigError, ProtocolError, _compiled
from tensorfabric.moe import _plan
from tensorfabric.moe._plan import check_ids, plan_dispatch, plan_experts

NATIVE = _compiled.native
PATHS = ["numpy", pytest.param("native", marks=pytest.mark.skipif(
    NATIVE is None, reason="tensorfabric._native is not built (no C compiler at install)"))]


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(_compiled, "native", NATIVE if request.param == "native" else None)
    return str(request.param)


def _route(rng: np.random.Generator, T: int, E: int, K: int) -> np.ndarray:
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(T)]) if T else \
        np.zeros((0, K), np.int64)
    ids[rng.random(ids.shape) < 0.2] = -1
    return ids


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("world,E,K", [(1, 4, 2), (3, 12, 3), (4, 8, 8)])
def test_round_trip_through_plans(world: int, E: int, K: int) -> None:
    """Simulate a step: every answer row a source reads back is its own (token, expert)."""
    rng = np.random.default_rng(world)
    local, T = E // world, [9, 0, 1, 17][:world]
    ids = [_route(rng, T[s], E, K) for s in range(world)]
    zero = 64 * K
    plans = [plan_dispatch(ids[s], world, local, zero) for s in range(world)]
    slot_rows = 64
    answers = [np.full((zero + 1, 2), -1) for _ in range(world)]  # (token, expert) per row
    for d in range(world):
        ep = plan_experts([plans[s].meta[d] for s in range(world)], slot_rows, local)
        assert ep.counts.sum() == len(ep.gather) == sum(int(p.pairs[d]) for p in plans)
        src, tok = ep.gather // slot_rows, ep.gather % slot_rows
        expert = np.repeat(np.arange(local), ep.counts) + d * local
        batch_rows = np.stack([np.array([plans[s].rows[d][i] for s, i in zip(src, tok)],
                                        dtype=np.int64).reshape(-1), expert], axis=1) \
            if len(src) else np.zeros((0, 2), np.int64)
        for e in range(local):  # a batch lists its tokens in (rank, token) order
            sel = expert == e + d * local
            keys = list(zip(src[sel], batch_rows[sel, 0]))
            assert keys == sorted(keys)
        for s in range(world):
            rows = ep.replies[s]
            assert len(rows) == plans[s].pairs[d]
            # a source's answers are one run of batch rows per local expert at most (the
            # combine write is a few pieces, not a row at a time)
            assert len(rows) == 0 or int((np.diff(rows) != 1).sum()) + 1 <= local
            answers[s][plans[s].base[d]:plans[s].base[d] + len(rows)] = batch_rows[rows]
    for s in range(world):
        for t in range(T[s]):
            for k in range(K):
                got = answers[s][plans[s].pos[t, k]]
                if ids[s][t, k] < 0:
                    assert plans[s].pos[t, k] == zero and got[0] == -1
                else:
                    assert (got[0], got[1]) == (t, ids[s][t, k])


@pytest.mark.usefixtures("path")
def test_a_token_goes_to_a_rank_once() -> None:
    ids = np.array([[0, 1, 2, 5], [4, 5, 6, 7]])
    p = plan_dispatch(ids, 2, 4, 99)
    assert p.rows[0].tolist() == [0] and p.rows[1].tolist() == [0, 1]
    assert p.meta[0].tolist() == [[0, 1, 2, -1]]
    assert p.pairs.tolist() == [3, 5] and p.base.tolist() == [0, 3]


@pytest.mark.usefixtures("path")
def test_bad_ids_and_hostile_tables() -> None:
    with pytest.raises(ConfigError):
        check_ids(np.array([[0, 8]]), 1, 8)
    with pytest.raises(ConfigError):
        check_ids(np.array([[0.5, 1]]), 1, 8)
    with pytest.raises(ConfigError):
        check_ids(np.zeros((2, 2), np.int64), 3, 8)
    with pytest.raises(ProtocolError):
        plan_experts([np.array([[0, 9]], np.int16)], 4, 4)


def _skewed(rng: np.random.Generator, T: int, E: int, K: int, kind: str) -> np.ndarray:
    if kind == "random":
        return _route(rng, T, E, K)
    if kind == "one expert":  # every slot of every token to the same expert
        return np.full((T, K), int(rng.integers(E)), np.int64)
    if kind == "empty":
        return np.full((T, K), -1, np.int64)
    ids = rng.integers(0, 2, (T, K)) * (E - 1)  # two experts at the ends: first and last rank
    ids[rng.random(ids.shape) < 0.5] = -1
    return ids


@pytest.mark.skipif(NATIVE is None, reason="tensorfabric._native is not built")
@pytest.mark.parametrize("kind", ["random", "one expert", "empty", "ends"])
def test_compiled_plans_equal_the_numpy_plans(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same arrays from both paths, for world 1-8, T 0-300, K 1-8 (a bug in either the
    counting sort or the per-rank rows shows as a difference here)."""
    rng = np.random.default_rng(len(kind))
    for world, local, K, T in [(1, 4, 2, 5), (2, 32, 8, 128), (3, 4, 3, 17), (4, 2, 8, 300),
                               (8, 32, 8, 64), (2, 8, 1, 1), (4, 16, 8, 0), (5, 1, 1, 40)]:
        E = world * local
        ids = _skewed(rng, T, E, min(K, E) if kind == "random" else K, kind)
        zero = T * ids.shape[1] + 7
        monkeypatch.setattr(_compiled, "native", None)
        want = plan_dispatch(ids, world, local, zero)
        monkeypatch.setattr(_compiled, "native", NATIVE)
        got = plan_dispatch(ids, world, local, zero)
        for a, b in zip(want.rows + want.meta + [want.pairs, want.base, want.pos],
                        got.rows + got.meta + [got.pairs, got.base, got.pos]):
            assert a.dtype == b.dtype and np.array_equal(a, b), (world, local, K, T)
        for d in range(world):
            metas = [want.meta[d], _skewed(rng, int(rng.integers(0, 9)), E, want.meta[d].shape[1],
                                           kind).clip(-1, local - 1).astype(np.int16)]
            monkeypatch.setattr(_compiled, "native", None)
            ew = plan_experts(metas, 512, local)
            monkeypatch.setattr(_compiled, "native", NATIVE)
            eg = plan_experts(metas, 512, local)
            assert np.array_equal(ew.gather, eg.gather) and np.array_equal(ew.counts, eg.counts)
            assert ew.counts.dtype == eg.counts.dtype == np.int64
            assert all(np.array_equal(a, b) for a, b in zip(ew.replies, eg.replies))
            assert len(ew.replies) == len(eg.replies)


@pytest.mark.usefixtures("path")
def test_hostile_tables_name_the_rank_and_expert() -> None:
    """A source's table naming an expert past ``local`` (or ids past the experts) is refused
    by either path, with the largest bad expert named."""
    good = np.array([[0, -1]], np.int16)
    with pytest.raises(ProtocolError, match="rank 1 routed a token to local expert 9"):
        plan_experts([good, np.array([[3, 2], [9, 5]], np.int16)], 4, 4)
    with pytest.raises(ProtocolError, match="rank 0 routed a token to local expert 32767"):
        plan_experts([np.array([[32767, -32768]], np.int16)], 4, 4)
    # negative entries other than -1 mean "not here", as -1 does
    ep = plan_experts([np.array([[-5, 1]], np.int16)], 4, 4)
    assert ep.gather.tolist() == [0] and ep.counts.tolist() == [0, 1, 0, 0]


def _region(layout: _plan.SlotLayout, step: int, plans: list[_plan.DispatchPlan],
            d: int) -> np.ndarray:
    """Rank ``d``'s receive region as the sources' dispatch messages leave it."""
    buf = np.zeros(layout.sources * layout.slot_bytes + 64, np.uint8)
    for s, p in enumerate(plans):
        at, n = s * layout.slot_bytes, len(p.rows[d])
        buf[at:at + 32] = np.array([step, n, p.base[d], p.pairs[d]], np.uint64).view(np.uint8)
        start = at + 64 + n * layout.row_bytes
        buf[start:start + p.meta[d].nbytes] = p.meta[d].view(np.uint8).ravel()
    return buf


def _header(buf: np.ndarray, layout: _plan.SlotLayout, s: int, field: int, value: int) -> None:
    at = s * layout.slot_bytes + 8 * field
    buf[at:at + 8] = np.array([value], np.uint64).view(np.uint8)


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("world,local,K,T", [(2, 32, 8, 128), (3, 4, 3, 17), (1, 4, 2, 0)])
def test_arrivals_plan_from_the_region(world: int, local: int, K: int, T: int) -> None:
    """plan_arrivals reads each source's header and table from the receive region and makes
    the plan plan_experts makes from the tables, with each source's answer base."""
    rng = np.random.default_rng(T)
    E, row = world * local, 32
    ids = [_route(rng, T, E, min(K, E)) for _ in range(world)]
    plans = [plan_dispatch(i, world, local, T * K) for i in ids]
    max_t = max(T, 1)
    slot = -(-(64 + max_t * (row + 2 * K)) // row) * row
    layout = _plan.SlotLayout(world, slot, row, K, max_t, max_t * K, local)
    for d in range(world):
        buf = _region(layout, 7, plans, d)
        ep, bases = _plan.plan_arrivals(buf, layout, 7)
        want = plan_experts([p.meta[d] for p in plans], layout.slot_rows, local)
        assert np.array_equal(ep.gather, want.gather) and np.array_equal(ep.counts, want.counts)
        assert all(np.array_equal(a, b) for a, b in zip(ep.replies, want.replies))
        assert bases.tolist() == [int(p.base[d]) for p in plans]


@pytest.mark.usefixtures("path")
def test_arrivals_refuse_malformed_headers_and_tables() -> None:
    """A source whose header names another step, too many rows, more pairs than its rows
    hold, answers past the region, or a pair count its table does not have, or whose table
    names an expert this rank lacks: ProtocolError naming it, on either path."""
    rng = np.random.default_rng(5)
    world, local, K, T, row = 2, 4, 2, 6, 16
    ids = [_route(rng, T, world * local, K) for _ in range(world)]
    plans = [plan_dispatch(i, world, local, T * K) for i in ids]
    slot = -(-(64 + T * (row + 2 * K)) // row) * row
    layout = _plan.SlotLayout(world, slot, row, K, T, T * K, local)
    good = _region(layout, 3, plans, 1)
    _plan.plan_arrivals(good, layout, 3)
    n1, p1 = len(plans[1].rows[1]), int(plans[1].pairs[1])
    cases = [
        (0, 3, "malformed dispatch header .*expected step 4"),  # (the step checked: 4)
        (1, T + 1, "rank 1 sent a malformed dispatch header"),  # more rows than max_tokens
        (3, n1 * K + 1, "rank 1 sent a malformed"),  # more pairs than its rows hold
        (2, T * K - p1 + 1, "rank 1 sent a malformed"),  # answers past the region
        (2, 2 ** 64 - 1, "rank 1 sent a malformed"),  # base + pairs wraps around
        (3, p1 - 1 if p1 else 1, "rank 1's dispatch header is inconsistent"),
    ]
    for field, value, match in cases:
        buf = good.copy()
        step = 4 if field == 0 else 3
        if field:
            _header(buf, layout, 1, field, value)
        with pytest.raises(ProtocolError, match=match):
            _plan.plan_arrivals(buf, layout, step)
    # a layout whose slots are smaller than max_tokens rows: a header within max_tokens whose
    # rows and table would run past its slot is refused too
    loose = _plan.SlotLayout(world, slot, row, K, 10 * T, 10 * T * K, local)
    buf = good.copy()
    _header(buf, loose, 1, 1, T + 2)
    with pytest.raises(ProtocolError, match="rank 1 sent a malformed"):
        _plan.plan_arrivals(buf, loose, 3)
    buf = good.copy()
    at = slot + 64 + n1 * row
    buf[at:at + 2] = np.array([local + 3], np.int16).view(np.uint8)  # first slot of a row
    with pytest.raises(ProtocolError, match=f"rank 1 routed a token to local expert {local + 3}"):
        _plan.plan_arrivals(buf, layout, 3)


@pytest.mark.skipif(NATIVE is None, reason="tensorfabric._native is not built")
def test_compiled_arrivals_check_their_buffers() -> None:
    """A region shorter than its slots, or out-arrays of the wrong size, are refused before a
    byte is read or written."""
    layout = _plan.SlotLayout(2, 256, 16, 2, 4, 8, 4)
    out = [np.empty(16, np.int64), np.empty(4, np.int64), np.empty(16, np.int64),
           np.empty(2, np.int64), np.empty(2, np.int64)]
    with pytest.raises(ValueError, match="buffer sizes"):
        NATIVE.plan_arrivals(np.zeros(511, np.uint8), 2, 256, 16, 2, 0, 4, 8, 16, 4, *out)
    with pytest.raises(ValueError, match="buffer sizes"):
        NATIVE.plan_arrivals(np.zeros(512, np.uint8), 2, 256, 16, 2, 0, 4, 8, 16, 4,
                             *out[:3], np.empty(3, np.int64), out[4])
    assert layout.slot_rows == 16
