"""MoE bookkeeping without a fabric: what each rank sends, how batches form, where answers go."""

from __future__ import annotations

import numpy as np
import pytest

from tensorfabric import ConfigError, ProtocolError
from tensorfabric.moe._plan import check_ids, plan_dispatch, plan_experts


def _route(rng: np.random.Generator, T: int, E: int, K: int) -> np.ndarray:
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(T)]) if T else \
        np.zeros((0, K), np.int64)
    ids[rng.random(ids.shape) < 0.2] = -1
    return ids


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


def test_a_token_goes_to_a_rank_once() -> None:
    ids = np.array([[0, 1, 2, 5], [4, 5, 6, 7]])
    p = plan_dispatch(ids, 2, 4, 99)
    assert p.rows[0].tolist() == [0] and p.rows[1].tolist() == [0, 1]
    assert p.meta[0].tolist() == [[0, 1, 2, -1]]
    assert p.pairs.tolist() == [3, 5] and p.base.tolist() == [0, 3]


def test_bad_ids_and_hostile_tables() -> None:
    with pytest.raises(ConfigError):
        check_ids(np.array([[0, 8]]), 1, 8)
    with pytest.raises(ConfigError):
        check_ids(np.array([[0.5, 1]]), 1, 8)
    with pytest.raises(ConfigError):
        check_ids(np.zeros((2, 2), np.int64), 3, 8)
    with pytest.raises(ProtocolError):
        plan_experts([np.array([[0, 9]], np.int16)], 4, 4)
