"""Routing plans: which token rows go to which rank, and where the answers come back.

No fabric: the sender's :func:`plan_dispatch` and the receiver's :func:`plan_experts` are
the two halves of the dispatch/combine bookkeeping (:func:`plan_arrivals` is the receiver's
half read straight from its receive region, every source's header checked first). Each runs
in the compiled kernels
(``tensorfabric._native``: two passes of a counting sort, a few microseconds at 128 tokens)
where they are built, else in numpy (a dozen array calls, ~120 us at 128 tokens); the two give
the same arrays.

A token goes to a rank once, however many of its top-k experts live there (pplx-garden style);
with it travels a small table saying which local expert each of its k slots picks (-1: another
rank's). The experts' outputs come back once per (token, slot) pair (DeepEP style), so the
weighted sum is made where the token lives, in slot order. They come back in the experts'
order (local expert, then token, then slot): a source's rows sit in one run per local expert
of the batches, so each rank's answer is a handful of contiguous pieces, not a row at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _compiled
from .._errors import ConfigError, ProtocolError

#: bytes before a dispatch message's rows: step, rows, answer base, pairs (u64 each), padding
HEADER = 64


@dataclass
class DispatchPlan:
    """The sender's side of one step."""

    rows: list[np.ndarray]   # per destination rank: token indices sent there, ascending
    meta: list[np.ndarray]   # per destination rank: [n, K] int16 local expert per slot or -1
    pairs: np.ndarray        # per destination rank: (token, slot) pairs it answers
    base: np.ndarray         # per destination rank: first answer row in our combine region
    pos: np.ndarray          # [T, K] int64: answer row of each (token, slot); masked -> zero row
    # (a rank's answers start at its base, in (local expert, token, slot) order)


def plan_dispatch(ids: np.ndarray, world: int, local: int, zero_row: int) -> DispatchPlan:
    """Plan a step for top-k expert ids ``ids`` [T, K] (-1: no expert) over ``world`` ranks
    holding ``local`` consecutive experts each; ``zero_row`` is an answer row that stays 0."""
    nat = _compiled.native
    if nat is not None and local <= np.iinfo(np.int16).max and world <= 1 << 20:
        return _plan_dispatch_native(nat, ids, world, local, zero_row)
    T, K = ids.shape
    valid = ids >= 0
    rank_of = np.where(valid, ids // local, world)
    rows, meta = [], []
    for d in range(world):
        hit = rank_of == d
        t_d = np.flatnonzero(hit.any(axis=1))
        rows.append(t_d)
        m = np.where(hit[t_d], ids[t_d] - d * local, -1).astype(np.int16)
        meta.append(np.ascontiguousarray(m))
    # answer rows by rank, then local expert; (token, slot) order within (a stable sort: on
    # 16-bit keys numpy's is a radix sort, 2-3x faster than on int64 at 32k pairs)
    key = np.where(valid, ids, world * local).astype(_keys(world * local + 1)).ravel()
    order = np.argsort(key, kind="stable")
    pairs = np.bincount(rank_of.ravel(), minlength=world + 1)[:world]
    base = np.zeros(world, np.int64)
    np.cumsum(pairs[:-1], out=base[1:])
    nvalid = int(pairs.sum())
    pos = np.full(T * K, zero_row, np.int64)
    pos[order[:nvalid]] = np.arange(nvalid)
    return DispatchPlan(rows, meta, pairs.astype(np.int64), base, pos.reshape(T, K))


def _plan_dispatch_native(nat: Any, ids: np.ndarray, world: int, local: int,
                          zero_row: int) -> DispatchPlan:
    T, K = ids.shape
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    rows = np.empty(world * T, np.int64)
    meta = np.empty((world * T, K), np.int16)
    ntok, pairs = np.empty(world, np.int64), np.empty(world, np.int64)
    pos = np.empty((T, K), np.int64)
    bad = nat.plan_dispatch(ids, world, local, zero_row, rows, meta, ntok, pairs, pos)
    if bad >= 0:  # check_ids stops these first
        raise ConfigError(f"topk_ids must lie in [-1, {world * local}) (-1: no expert); "
                          f"slot {bad} holds {int(ids.ravel()[bad])}")
    n = ntok.tolist()
    base = np.zeros(world, np.int64)
    np.cumsum(pairs[:-1], out=base[1:])
    return DispatchPlan([rows[d * T:d * T + n[d]] for d in range(world)],
                        [meta[d * T:d * T + n[d]] for d in range(world)], pairs, base, pos)


@dataclass
class ExpertPlan:
    """The receiver's side of one step: local expert batches and the answers' order."""

    gather: np.ndarray       # [R] source row (in the receive region's row view) of batch row r
    counts: np.ndarray       # [L] rows per local expert
    replies: list[np.ndarray]  # per source rank: batch rows to send back, in (token, slot) order


def plan_experts(metas: list[np.ndarray], slot_rows: int, local: int) -> ExpertPlan:
    """Group the (token, slot) pairs that sources sent into per-local-expert batches.

    ``metas[s]`` is source ``s``'s [n, K] table; batch rows are ordered by expert, then source,
    then token, then slot, so a batch lists its tokens in the global (rank, token) order.
    ``replies[s]`` lists source ``s``'s batch rows in ascending order, which is the order
    ``plan_dispatch`` expects its answers in (local expert, token, slot).
    """
    nat = _compiled.native
    if nat is not None and metas and all(m.ndim == 2 for m in metas) \
            and len({m.shape[1] for m in metas}) == 1 and metas[0].shape[1] > 0:
        return _plan_experts_native(nat, metas, slot_rows, local)
    experts, src_rows, per_source = [], [], []
    for s, m in enumerate(metas):
        sel = m >= 0
        i, _ = np.nonzero(sel)
        e = m[sel]
        if len(e) and (int(e.max()) >= local):
            raise ProtocolError(f"rank {s} routed a token to local expert {int(e.max())}; "
                                f"this rank holds {local}")
        experts.append(e)
        src_rows.append(i.astype(np.int64) + s * slot_rows)
        per_source.append(len(e))
    kd = _keys(max(local, len(metas)) + 1)
    e_all = np.concatenate(experts).astype(kd) if experts else np.zeros(0, kd)
    r_all = np.concatenate(src_rows) if src_rows else np.zeros(0, np.int64)
    order = np.argsort(e_all, kind="stable")  # batch row -> pair (radix sort, as above)
    # each source's batch rows, ascending: batch rows sorted (stably) by their source
    src_of = np.repeat(np.arange(len(metas), dtype=kd), per_source)[order]
    back = np.argsort(src_of, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(per_source)])
    replies = [back[bounds[s]:bounds[s + 1]] for s in range(len(metas))]
    return ExpertPlan(r_all[order], np.bincount(e_all, minlength=local).astype(np.int64),
                      replies)


def _plan_experts_native(nat: Any, metas: list[np.ndarray], slot_rows: int,
                         local: int) -> ExpertPlan:
    K = metas[0].shape[1]
    tables = [np.ascontiguousarray(m, dtype=np.int16) for m in metas]
    room = sum(m.size for m in tables)
    gather, replies = np.empty(room, np.int64), np.empty(room, np.int64)
    counts, per = np.empty(local, np.int64), np.empty(len(tables), np.int64)
    bad = nat.plan_experts(tables, K, slot_rows, local, gather, counts, replies, per)
    if bad is not None:
        s, e = bad
        raise ProtocolError(f"rank {s} routed a token to local expert {e}; this rank holds "
                            f"{local}")
    bounds = np.concatenate([[0], np.cumsum(per)]).tolist()
    return ExpertPlan(gather[:bounds[-1]], counts,
                      [replies[bounds[s]:bounds[s + 1]] for s in range(len(tables))])


@dataclass(frozen=True)
class SlotLayout:
    """Where each source's dispatch message lies in a receive region: source ``s``'s slot
    starts at ``s * slot_bytes`` with a 64-byte header (u64 step, rows n, answer base,
    pairs), then n rows of ``row_bytes`` from byte 64, then its [n, topk] int16 slot table."""

    sources: int
    slot_bytes: int
    row_bytes: int
    topk: int
    max_tokens: int
    answers: int   # answer rows a source's (base, pairs) must fall inside
    local: int     # experts this rank holds

    @property
    def slot_rows(self) -> int:
        return self.slot_bytes // self.row_bytes


def plan_arrivals(buf: np.ndarray, layout: SlotLayout, step: int) -> tuple[ExpertPlan, np.ndarray]:
    """The receiver's plan for a step from the receive region ``buf`` (uint8) itself, and each
    source's answer base.

    Each source's header must name this ``step``, at most ``max_tokens`` rows, at most
    ``topk`` pairs per row, answers inside ``[0, answers)`` and a table inside its slot; its
    table must name experts below ``local`` and hold as many pairs as its header says. Else
    ProtocolError naming the source. The tables are copied out before they are planned (a
    source may write the region while we read it)."""
    L = layout
    nat = _compiled.native
    if nat is not None:
        room = L.sources * L.max_tokens * L.topk
        gather, replies = np.empty(room, np.int64), np.empty(room, np.int64)
        counts, per = np.empty(L.local, np.int64), np.empty(L.sources, np.int64)
        bases = np.empty(L.sources, np.int64)
        bad = nat.plan_arrivals(buf, L.sources, L.slot_bytes, L.row_bytes, L.topk, step,
                                L.max_tokens, L.answers, L.slot_rows, L.local, gather, counts,
                                replies, per, bases)
        if bad is not None:
            raise _arrival_error(bad, step, L.local)
        bounds = [0, *np.cumsum(per).tolist()]
        return (ExpertPlan(gather[:bounds[-1]], counts,
                           [replies[bounds[s]:bounds[s + 1]] for s in range(L.sources)]),
                bases)
    metas, base_list, pairs_list = [], [], []
    for s in range(L.sources):
        at = s * L.slot_bytes
        st, n, base, pairs = (int(v) for v in buf[at:at + 32].copy().view(np.uint64))
        if st != step or n > L.max_tokens or pairs > n * L.topk or base + pairs > L.answers \
                or HEADER + n * (L.row_bytes + 2 * L.topk) > L.slot_bytes:
            raise _arrival_error(("header", s, st, n, base, pairs), step, L.local)
        start = at + HEADER + n * L.row_bytes
        metas.append(buf[start:start + n * 2 * L.topk].copy().view(np.int16).reshape(n, L.topk))
        base_list.append(base)
        pairs_list.append(pairs)
    eplan = plan_experts(metas, L.slot_rows, L.local)
    for s in range(L.sources):
        if pairs_list[s] != len(eplan.replies[s]):
            raise _arrival_error(("pairs", s), step, L.local)
    return eplan, np.array(base_list, np.int64)


def _arrival_error(bad: tuple[Any, ...], step: int, local: int) -> ProtocolError:
    kind, s = bad[0], bad[1]
    if kind == "header":
        st, n, base, pairs = bad[2:]
        return ProtocolError(f"rank {s} sent a malformed dispatch header (step {st}, {n} rows, "
                             f"{pairs} pairs at {base}); expected step {step}")
    if kind == "expert":
        return ProtocolError(f"rank {s} routed a token to local expert {bad[2]}; this rank "
                             f"holds {local}")
    return ProtocolError(f"rank {s}'s dispatch header is inconsistent")


def _keys(n: int) -> type[np.signedinteger]:
    """The narrowest sort key for values below ``n`` (numpy radix-sorts 16-bit keys)."""
    return np.int16 if n <= np.iinfo(np.int16).max else np.int64


def check_ids(ids: np.ndarray, tokens: int, experts: int) -> np.ndarray:
    """Validate top-k ids: [tokens, K] integers in [-1, experts)."""
    if ids.ndim != 2 or ids.shape[0] != tokens:
        raise ConfigError(f"topk_ids must have shape [{tokens}, K], got {ids.shape}")
    if ids.size and ids.dtype.kind not in "iu":
        raise ConfigError(f"topk_ids must hold integers, got {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if ids.size and (int(ids.min()) < -1 or int(ids.max()) >= experts):
        raise ConfigError(f"topk_ids must lie in [-1, {experts}) (-1: no expert)")
    return ids
