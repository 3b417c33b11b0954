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
