"""ExpertParallel: MoE dispatch and combine between the ranks of a group, over the engine."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from .._address import EngineAddress
from .._engine import Engine
from .._engine_ops import ScatterDest
from .._errors import (BrokenError, ClosedError, ConfigError, ProtocolError, TensorFabricError,
                       TransferTimeout)
from .._region import Access, RegionDescriptor
from .._transfer import Transfer
from . import _tensors as tx
from ._exchange import Exchange
from ._plan import (HEADER, DispatchPlan, ExpertPlan, SlotLayout, check_ids, plan_arrivals,
                    plan_dispatch)

_ALIGN = 64
_IMM_BASE = 0x4D6F4500_00000000  # "MoE\0" in the high bytes; + 4 * group + phase
_ROWS_DIRECT = 1 << 20  # rows to one rank from this size on are written from the tokens
_MAX_LOCAL = 32767  # local experts per rank (int16 slot tables)
_CLOSE_WAIT_S = 5.0  # how long close waits for the other ranks to release their regions


def _up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass
class DispatchResult:
    """What :meth:`ExpertParallel.dispatch` hands the local experts.

    Expanded (``dispatch(..., expand=True)``, the default): ``batches[e]`` is the [n_e, H]
    batch of local expert ``experts[e]`` (views into ``tokens``, the [sum n_e, H] rows of every
    batch back to back); rows are ordered by source rank, then token, so a batch lists its
    tokens in the group's (rank, token) order. Valid until the next dispatch; write the
    outputs anywhere (in place is fine) and pass them to combine.

    Compact (``expand=False``): every token that came here is in ``rows`` once, however many
    local experts it picked; ``order`` lists the rows of every expert's batch back to back
    (``counts[e]`` of them for expert ``e``: ``rows[order]`` equals the expanded ``tokens``, the
    form a grouped GEMM takes), and ``index[e]`` is expert ``e``'s piece of it (``rows[index[e]]``
    equals the expanded ``batches[e]``; cut from ``order`` when first read). ``batches`` and
    ``tokens`` are None. ``rows`` is a view of this rank's receive region (rows no index names
    are unspecified): read it before ``combine``, after which the next step's tokens land
    there. Combine takes the outputs in the same order as for the expanded layout.
    """

    batches: list[Any] | None
    tokens: Any | None
    counts: np.ndarray
    experts: range
    step: int
    rows: Any | None = None
    order: Any | None = None
    _index: list[Any] | None = field(default=None, init=False, repr=False)

    @property
    def index(self) -> list[Any] | None:
        """Compact: per local expert, the rows of ``rows`` that make its batch (None when
        expanded)."""
        if self._index is None and self.order is not None:
            self._index = tx.split_rows(self.order, self.counts, tx.Kind(
                not isinstance(self.order, np.ndarray), "int64"))
        return self._index


@dataclass
class _Pending:
    plan: DispatchPlan
    experts: ExpertPlan
    weights: np.ndarray
    kind: tx.Kind
    bases: list[int]


class ExpertParallel:
    """Expert-parallel dispatch and combine for one rank of a group of ``world`` ranks.

    Rank ``r`` holds experts ``[r * L, (r + 1) * L)`` with ``L = num_experts // world``.
    Every rank builds one (all with the same sizes) and calls ``dispatch`` then ``combine``
    once per MoE layer forward, in step with the others::

        ep = ExpertParallel(engine, rank=r, world=n, num_experts=64, hidden=2048, topk=8,
                            max_tokens=128, exchange=FileExchange(path, r, n))
        got = ep.dispatch(x, topk_ids, topk_weights)        # x [T, H]
        outs = [mlp[e](b) for e, b in zip(got.experts, got.batches)]
        y = ep.combine(outs)                                 # [T, H], x's order and type

    The receive regions are allocated once, for ``max_tokens`` tokens per rank (worst case:
    every token of every rank comes here), and reused every step. A step moves one write per
    (source, destination) pair each way, each carrying the immediate of its phase, so each
    rank waits on one counter per phase (``world - 1`` arrivals), however the engine stripes
    the writes. ``exchange`` is an all-gather of small blobs (see ``_exchange``).

    A rank that dies makes every other rank's current or next step raise ``BrokenError``
    within ``timeout``; after any failure the object stays broken (build a new group).
    """

    def __init__(self, engine: Engine, *, rank: int, world: int, num_experts: int,
                 hidden: int, topk: int, max_tokens: int, exchange: Exchange,
                 dtype: Any = "float32", timeout: float | None = None, group: int = 0,
                 probe_interval: float = 0.25) -> None:
        for name, v in (("world", world), ("num_experts", num_experts), ("hidden", hidden),
                        ("topk", topk), ("max_tokens", max_tokens)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(rank, int) or not 0 <= rank < world:
            raise ConfigError(f"rank must be an int in [0, {world}), got {rank!r}")
        if num_experts % world:
            raise ConfigError(f"num_experts {num_experts} is not a multiple of world {world}")
        if num_experts // world > _MAX_LOCAL:  # a slot table names a local expert in 16 bits
            raise ConfigError(f"{num_experts // world} experts per rank; at most {_MAX_LOCAL} "
                              "(use more ranks)")
        if not isinstance(group, int) or not 0 <= group < 1 << 24:
            raise ConfigError(f"group must be an int in [0, 2**24), got {group!r}")
        self.engine, self.rank, self.world = engine, rank, world
        self.num_experts, self.hidden, self.topk = num_experts, hidden, topk
        self.max_tokens = max_tokens
        self.dtype = tx.dtype_name(dtype)
        self.local = num_experts // world
        self.timeout = float(timeout or engine.timeout)
        self.probe_interval = probe_interval
        self._npdtype = tx.numpy_dtype(self.dtype)
        self.row_bytes = hidden * tx.DTYPES[self.dtype]
        self.slot_bytes = _up(HEADER + max_tokens * (self.row_bytes + 2 * topk), self.row_bytes)
        self._slot_rows = self.slot_bytes // self.row_bytes
        self._answers = max_tokens * topk  # answer rows; one more stays zero (masked slots)
        self._imm = [_IMM_BASE + 4 * group + i for i in range(4)]  # dispatch, combine, probe, close
        # read-write, so that same-host ranks write them by shm: the shm transport maps a
        # region whole, so it maps only what a peer may also read (a write-only region goes
        # over tcp). The descriptors go only to the group's ranks, which run one model on
        # one batch: reading what other ranks sent this one exposes nothing outside it.
        self._recv = engine.alloc(world * self.slot_bytes + HEADER, access=Access.READ_WRITE)
        self._comb = engine.alloc((self._answers + 1) * self.row_bytes, access=Access.READ_WRITE)
        self._recv_rows = np.ndarray((world * self._slot_rows, self.row_bytes), np.uint8,
                                     buffer=self._recv.view, offset=HEADER)
        comb = np.ndarray((self._answers + 1, self.row_bytes), np.uint8, buffer=self._comb.view)
        self._comb_typed = comb.view(self._npdtype)
        self._rows_typed: dict[tx.Kind, Any] = {}  # the receive rows as numpy / torch
        self._layout = SlotLayout(world, self.slot_bytes, self.row_bytes, topk, max_tokens,
                                  self._answers, self.local)
        self._send = np.empty(0, np.uint8)  # grows to the largest step, then reused
        self._xbuf = np.empty((0, self.row_bytes), np.uint8)
        self._obuf = np.empty((0, self.row_bytes), np.uint8)
        self._step = 0
        #: seconds the last step spent: packing, waiting on the fabric, unpacking/reducing
        self.timings: dict[str, float] = {}
        self._pending: _Pending | None = None
        self._broken: BaseException | None = None
        self._closed = False
        try:
            self._rendezvous(exchange)
        except BaseException:
            self.close()
            raise

    # -- setup ----------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {"world": self.world, "experts": self.num_experts, "hidden": self.hidden,
                "topk": self.topk, "max_tokens": self.max_tokens, "dtype": self.dtype}

    def _rendezvous(self, exchange: Exchange) -> None:
        mine = dict(self._config(), rank=self.rank, address=self.engine.address.hex(),
                    dispatch=self._recv.descriptor().to_bytes().hex(),
                    combine=self._comb.descriptor().to_bytes().hex())
        blobs = exchange(json.dumps(mine).encode())
        if len(blobs) != self.world:
            raise ConfigError(f"rendezvous returned {len(blobs)} blobs for {self.world} ranks")
        self._peers: list[bytes] = []
        self._dispatch_to: list[RegionDescriptor] = []
        self._combine_to: list[RegionDescriptor] = []
        for r, blob in enumerate(blobs):
            info = json.loads(blob)
            theirs = {k: info.get(k) for k in self._config()}
            if info.get("rank") != r or theirs != self._config():
                raise ConfigError(f"rank {r} was built with {theirs} (rank {info.get('rank')}); "
                                  f"this rank with {self._config()}: every rank needs the same")
            self._peers.append(bytes.fromhex(info["address"]))
            self._dispatch_to.append(RegionDescriptor.from_bytes(bytes.fromhex(info["dispatch"])))
            self._combine_to.append(RegionDescriptor.from_bytes(bytes.fromhex(info["combine"])))
        self._names = {str(EngineAddress.from_bytes(a)): r for r, a in enumerate(self._peers)}
        self._others = [self._peers[r] for r in self._order()]
        for peer in self._others:
            self.engine.connect(peer, timeout=self.timeout)

    def _order(self) -> list[int]:
        """The other ranks, starting after this one (so ranks do not all hit rank 0 first)."""
        return [(self.rank + i) % self.world for i in range(1, self.world)]

    # -- dispatch -------------------------------------------------------------------------

    def dispatch(self, tokens: Any, topk_ids: Any, topk_weights: Any, *,
                 expand: bool = True) -> DispatchResult:
        """Send each token row to the ranks holding its top-k experts; return this rank's
        expert batches. ``tokens`` [T, H] (T <= max_tokens), ``topk_ids`` [T, K] expert ids
        (-1: none), ``topk_weights`` [T, K]; numpy arrays or CPU torch tensors.

        ``expand=False`` skips laying out one batch per expert (a token picked by several
        local experts would be copied once per expert): the result has each arrived token
        once and per-expert row indices, for experts that gather their own inputs (a grouped
        GEMM does) -- see :class:`DispatchResult`."""
        self._check_ready(dispatching=True)
        x, kind = tx.rows(tokens, "tokens", self.hidden)
        if kind.dtype != self.dtype:
            raise ConfigError(f"tokens are {kind.dtype}; this group was built for {self.dtype}")
        T = x.shape[0]
        if T > self.max_tokens:
            raise ConfigError(f"{T} tokens exceed max_tokens={self.max_tokens}")
        ids = check_ids(tx.plain(topk_ids, "topk_ids"), T, self.num_experts)
        if ids.shape[1] != self.topk:
            raise ConfigError(f"topk_ids has {ids.shape[1]} slots; this group uses {self.topk}")
        weights = tx.plain(topk_weights, "topk_weights")
        if weights.shape != ids.shape:
            raise ConfigError(f"topk_weights must have shape {ids.shape}, got {weights.shape}")
        t0 = time.perf_counter()
        plan = plan_dispatch(ids, self.world, self.local, self._answers)
        self._step += 1
        xb = x.view(np.uint8).reshape(T, self.row_bytes)
        sizes = [HEADER + len(plan.rows[d]) * (self.row_bytes + 2 * self.topk)
                 for d in range(self.world)]
        self._reserve(sum(_up(sizes[d], _ALIGN) for d in self._order()))
        writes: list[Transfer] = []
        off, rb, at = 0, self.row_bytes, self.rank * self.slot_bytes
        direct: list[tuple[int, Transfer]] = []
        with self._issuing(writes, "dispatch"):
            for d in self._order():
                n, to = len(plan.rows[d]), self._dispatch_to[d]
                if n * rb < _ROWS_DIRECT:  # one message: header, rows, slot table
                    self._pack(self._send[off:], plan, d, xb)
                    writes.append(self.engine.write(
                        self._send, to, src_offset=off, dst_offset=at, nbytes=sizes[d],
                        imm=self._imm[0], timeout=self.timeout))
                else:  # header and slot table first; the rows then go from the tokens
                    self._pack(self._send[off:], plan, d, xb, rows=False)
                    tail = HEADER + n * rb
                    direct.append((d, self.engine.scatter(self._send, [
                        ScatterDest(to, off, at, HEADER),
                        ScatterDest(to, off + tail, at + tail, sizes[d] - tail)],
                        timeout=self.timeout)))
                off += _up(sizes[d], _ALIGN)
            for d, head in direct:  # landed before the rows' immediate can be counted
                writes.append(head)
                head.wait(self.timeout)
                writes.append(self.engine.write_pages(
                    xb, self._dispatch_to[d], src_pages=plan.rows[d],
                    dst_pages=np.arange(len(plan.rows[d])), page_size=rb, dst_offset=at + HEADER,
                    imm=self._imm[0], timeout=self.timeout))
        # our own slot gets its header and slot table; expanded, its rows stay in ``tokens``
        # (the gather below reads them there), compact, they are copied in beside the others'
        self._pack(self._recv.array[self.rank * self.slot_bytes:], plan, self.rank, xb,
                   rows=not expand)
        t1 = time.perf_counter()
        self._await(self._imm[0], writes, "dispatch")
        t2 = time.perf_counter()
        try:
            eplan, bases = plan_arrivals(self._recv.array, self._layout, self._step)
        except ProtocolError as exc:
            raise self._fail(exc) from None
        self._pending = _Pending(plan, eplan, weights, kind, bases.tolist())
        first = self.rank * self.local
        experts = range(first, first + self.local)
        if expand:
            R = len(eplan.gather)
            if len(self._xbuf) < R:
                self._xbuf = np.empty((_up(R + R // 4, 64), self.row_bytes), np.uint8)
            own = (self.rank * self._slot_rows, xb, plan.rows[self.rank])
            tx.gather(self._xbuf, self._recv_rows, eplan.gather, alias=own)
            typed = tx.wrap(self._xbuf[:R].view(self._npdtype), kind)
            got = DispatchResult(tx.split_rows(typed, eplan.counts, kind), typed, eplan.counts,
                                 experts, self._step)
        else:
            rows = self._rows_typed.get(kind)
            if rows is None:  # the same region every step: wrapped once per caller type
                rows = self._rows_typed[kind] = tx.wrap(self._recv_rows.view(self._npdtype), kind)
            got = DispatchResult(None, None, eplan.counts, experts, self._step, rows,
                                 tx.as_index(eplan.gather, kind))
        self.timings = {"dispatch_pack": t1 - t0, "dispatch_wait": t2 - t1,
                        "dispatch_unpack": time.perf_counter() - t2}
        return got

    def _pack(self, dst: np.ndarray, plan: DispatchPlan, d: int, xb: np.ndarray, *,
              rows: bool = True) -> None:
        """Lay out the message for rank ``d``: header, token rows (unless ``rows`` is false),
        slot table."""
        meta = plan.meta[d]
        n, rb = len(plan.rows[d]), self.row_bytes
        head = np.array([self._step, n, plan.base[d], plan.pairs[d]], np.uint64)
        dst[:32] = head.view(np.uint8)
        if rows:  # the compiled gather where built (GIL released: the shm copies run on)
            tx.gather(dst[HEADER:HEADER + n * rb].reshape(n, rb), xb, plan.rows[d])
        dst[HEADER + n * rb:HEADER + n * (rb + 2 * self.topk)] = meta.view(np.uint8).ravel()

    # -- combine --------------------------------------------------------------------------

    def combine(self, expert_outputs: Any) -> Any:
        """Send the experts' outputs back and return [T, H]: for each token, the sum over its
        k slots (in slot order, in float32) of weight times expert output, in the order and
        type of the dispatched tokens. ``expert_outputs`` is one array per local expert
        (shaped like the batches) or one [sum n_e, H] array (like ``DispatchResult.tokens``)."""
        self._check_ready(dispatching=False)
        p = self._pending
        assert p is not None
        R = len(p.experts.gather)
        t0 = time.perf_counter()
        ob = self._outputs(expert_outputs, p, R)
        rb = self.row_bytes
        writes: list[Transfer] = []
        with self._issuing(writes, "combine"):
            for s in self._order():  # rows go straight from the outputs to the source's region
                idx = p.experts.replies[s]
                if len(idx):
                    writes.append(self.engine.write_pages(
                        ob, self._combine_to[s], src_pages=idx, dst_pages=np.arange(len(idx)),
                        page_size=rb, dst_offset=p.bases[s] * rb, imm=self._imm[1],
                        timeout=self.timeout))
                else:
                    writes.append(self.engine.write(ob, self._combine_to[s], nbytes=0,
                                                    imm=self._imm[1], timeout=self.timeout))
        t1 = time.perf_counter()
        self._await(self._imm[1], writes, "combine")
        t2 = time.perf_counter()
        self._pending = None
        # this rank's own answers are read from the outputs where they are (rows [base, base
        # + n) of the combine region stand for them), not copied there first
        mine = (p.bases[self.rank], ob, p.experts.replies[self.rank])
        y = tx.weighted_sum(self._comb_typed, p.plan.pos, p.weights, p.kind, alias=mine)
        self.timings.update(combine_pack=t1 - t0, combine_wait=t2 - t1,
                            combine_reduce=time.perf_counter() - t2)
        return y

    def _outputs(self, outs: Any, p: _Pending, R: int) -> np.ndarray:
        """The experts' outputs as [R, row_bytes] bytes (one copy if given as a list)."""
        counts = [int(c) for c in p.experts.counts]
        if isinstance(outs, (list, tuple)):
            if len(outs) != self.local:
                raise ConfigError(f"combine needs {self.local} expert outputs, got {len(outs)}")
            if len(self._obuf) < R:
                self._obuf = np.empty((_up(R + R // 4, 64), self.row_bytes), np.uint8)
            at = 0
            for e, o in enumerate(outs):
                arr = self._typed(o, f"expert_outputs[{e}]", p)
                if len(arr) != counts[e]:
                    raise ConfigError(f"expert_outputs[{e}] has {len(arr)} rows; its batch had "
                                      f"{counts[e]}")
                self._obuf[at:at + counts[e]] = arr.view(np.uint8).reshape(-1, self.row_bytes)
                at += counts[e]
            return self._obuf[:R]
        arr = self._typed(outs, "expert_outputs", p)
        if len(arr) != R:
            raise ConfigError(f"expert_outputs has {len(arr)} rows; the batches had {R}")
        return arr.view(np.uint8).reshape(R, self.row_bytes)

    def _typed(self, x: Any, what: str, p: _Pending) -> np.ndarray:
        arr, kind = tx.rows(x, what, self.hidden)
        if kind.dtype != self.dtype:
            raise ConfigError(f"{what} is {kind.dtype}; this group moves {self.dtype}")
        return arr

    # -- waiting, failure -----------------------------------------------------------------

    def _reserve(self, nbytes: int) -> None:
        if len(self._send) < nbytes:
            self._send = np.empty(_up(nbytes + nbytes // 4, 1 << 20), np.uint8)

    def _await(self, imm: int, writes: Sequence[Transfer], phase: str) -> None:
        """Wait for the other ranks' ``world - 1`` writes and for ours, probing the ranks
        every ``probe_interval`` while we wait, so a dead one turns into BrokenError."""
        deadline = time.monotonic() + self.timeout
        arrivals = self.engine.expect(imm, self.world - 1, timeout=self.timeout) \
            if self.world > 1 else None
        probe: Transfer | None = None
        next_probe = time.monotonic() + self.probe_interval
        try:
            for t in [arrivals, *writes]:
                while t is not None and not t.done():
                    now = time.monotonic()
                    if now >= deadline:
                        raise TransferTimeout(f"MoE {phase} step {self._step} not done after "
                                              f"{self.timeout} s")
                    if now >= next_probe and (probe is None or probe.done()):
                        self._check_probe(probe)
                        probe = self.engine.barrier(self._others, self._imm[2],
                                                    timeout=self.timeout)
                        next_probe = now + self.probe_interval
                    self._check_probe(probe)
                    try:
                        t.wait(min(deadline, next_probe) - now)
                    except TransferTimeout:
                        pass
                if t is not None:
                    t.wait(0)
            self._check_probe(probe)
        except TensorFabricError as exc:
            for t in [arrivals, *writes]:
                if t is not None:
                    t.cancel()
            new = self._fail(exc, phase)
            if new is exc:
                raise
            raise new from exc

    @contextlib.contextmanager
    def _issuing(self, writes: list[Transfer], phase: str) -> Iterator[None]:
        """A write that fails as it is issued (a peer already gone) breaks the group too."""
        try:
            yield
        except TensorFabricError as exc:
            for t in writes:
                t.cancel()
            new = self._fail(exc, phase)
            if new is exc:
                raise
            raise new from exc

    def _check_probe(self, probe: Transfer | None) -> None:
        if probe is not None and probe.done():
            err = probe.exception()
            if isinstance(err, BrokenError):  # a timed-out probe only means a busy peer
                raise err

    def _fail(self, exc: BaseException, phase: str = "dispatch") -> BaseException:
        if isinstance(exc, (BrokenError, TransferTimeout, ProtocolError)) and \
                self._broken is None:
            rank = self._names.get(getattr(exc, "peer", None) or "", None) \
                if hasattr(self, "_names") else None
            who = f"rank {rank}" if rank is not None else "a peer"
            if isinstance(exc, BrokenError):
                exc = BrokenError(f"MoE {phase} step {self._step} on rank {self.rank}: {who} "
                                  f"failed ({exc})", peer=exc.peer)
            self._broken = exc
        return exc

    def _check_ready(self, *, dispatching: bool) -> None:
        if self._closed:
            raise ClosedError("ExpertParallel is closed")
        if self._broken is not None:
            raise BrokenError(f"this MoE group is broken ({self._broken}); build a new one") \
                from self._broken
        if dispatching and self._pending is not None:
            raise ConfigError("dispatch called twice: combine the previous step first")
        if not dispatching and self._pending is None:
            raise ConfigError("combine called without a dispatch")

    def close(self) -> None:
        """Release the receive regions (the engine stays open).

        Collective, like a step: call it on every rank. Releasing a region that same-host
        ranks mapped waits for them to confirm they dropped it, which their engines answer;
        so a healthy group's ``close`` returns once every rank has released its regions (or
        after 5 s), and no rank closes its engine while another still waits on it. A broken
        group's ranks do not wait for each other."""
        if self._closed:
            return
        self._closed = True
        if self.engine.closed:
            return
        for region in (self._recv, self._comb):
            self.engine.unregister(region)
        if self._broken is not None or self.world == 1 or not hasattr(self, "_others"):
            return
        wait = min(self.timeout, _CLOSE_WAIT_S)
        with contextlib.suppress(TensorFabricError):
            released = self.engine.expect(self._imm[3], self.world - 1, timeout=wait)
            self.engine.barrier(self._others, self._imm[3], timeout=wait).wait(wait)
            released.wait(wait)

    def __enter__(self) -> ExpertParallel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
