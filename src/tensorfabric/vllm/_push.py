"""Layer-by-layer push: the prefill instance writes each layer's KV blocks into the decode
instance's blocks while the prompt is still being computed.

The proxy sends a request to the prefill and the decode instance at the same time, with one
fresh random *push id* in both requests' ``kv_transfer_params``. The decode instance's
scheduler allocates blocks for the prompt at once and its worker sends the prefill engine an
``offer`` (the push id, its KV region's descriptor, its block ids and an immediate). The
prefill worker, from vLLM's ``save_kv_layer`` calls, writes every ``push_layers`` layers'
newly computed blocks with one ``write_pages`` as soon as both the offer and the layers are
there (an offer that arrives late first gets everything computed so far in one write), and
when the prompt's last layer is written and every write has landed, sends the offer's
immediate (``barrier``): the decode instance's load is complete.

Only the engine that presents the push id (128 random bits that only the proxy, the prefill
and that decode instance know) is written to, once per push id.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._errors import TensorFabricError
from .._transfer import Transfer
from ._layout import KVLayout

if TYPE_CHECKING:
    from ._worker import WorkerSide

log = logging.getLogger("tensorfabric.vllm")

MAX_OFFERS = 4096   # offers waiting for their prefill request (a peer cannot make us keep more)


@dataclass
class Offer:
    peer: bytes
    imm: int
    first: int              # index of the first prompt block the decode instance wants
    dst_blocks: list[int]   # its blocks for prompt blocks first, first + 1, ...
    dst: bytes              # its KV region's descriptor
    layout: KVLayout
    expiry: float


@dataclass
class Job:
    """One push-mode request on the prefill instance."""

    req: str
    push_id: str
    blocks: list[int] = field(default_factory=list)
    prompt_len: int = 0
    upto: list[int] = field(default_factory=list)   # per layer: tokens whose KV is computed
    full: list[int] = field(default_factory=list)   # per layer: whole blocks already written
    step: tuple[int, int] | None = None            # this step's tokens [start, end)
    group: list[int] = field(default_factory=list)  # layers computed, not written yet
    offer: Offer | None = None
    computed: bool = False    # every layer of the whole prompt is computed
    pending: int = 0          # writes in flight
    writes: int = 0
    early: int = 0            # writes issued during a forward pass (from save_kv_layer)
    nbytes: int = 0
    closing: bool = False     # done or failed: no new writes
    state: str = "open"       # open -> finishing (final immediate) or failing -> reported
    reason: str = ""
    started: float = field(default_factory=time.monotonic)
    computed_at: float = 0.0


class Pusher:
    def __init__(self, owner: WorkerSide) -> None:
        self.w = owner
        self._lock = threading.RLock()
        self._offers: dict[str, Offer] = {}   # push id -> offer not matched yet
        self._jobs: dict[str, Job] = {}       # request -> job
        self._by_push: dict[str, str] = {}    # push id -> request
        self._stepping: list[Job] = []
        self._index: dict[str, int] = {}

    # -- from the model thread ----------------------------------------------------------

    def begin_step(self, push: dict[str, tuple[str, list[int], int, int, int, bool]]) -> None:
        """``push``: request -> (push id, its block ids, first token computed in this step,
        tokens computed after it, prompt length, resumed after a preemption)."""
        assert self.w.layout is not None
        nl = len(self.w.layout.layers)
        if not self._index:
            self._index = {name: i for i, name in enumerate(self.w.layout.layers)}
        writes: list[tuple[Job, list[int], list[int]]] = []
        fails: list[tuple[Job, str]] = []
        with self._lock:
            self._stepping = []
            for req, (pid, blocks, start, end, plen, resumed) in push.items():
                job = self._jobs.get(req)
                if job is None and self.w.spent_push(pid):
                    continue   # failed or freed before (a preempted request resumed)
                if job is not None and resumed:
                    fails.append((job, "the prefill request was preempted"))
                    continue
                new = job is None
                if job is None:
                    # tokens before ``start`` are computed already (the prefix cache)
                    log.debug("push %s: request %s starts at token %d", pid[:8], req, start)
                    job = Job(req, pid, upto=[start] * nl, full=[0] * nl)
                    self._jobs[req] = job
                    self._by_push[pid] = req
                if job.closing:
                    continue
                job.blocks, job.prompt_len = list(blocks), plen
                if new:
                    offer = self._offers.pop(pid, None)
                    if offer is not None:
                        job.offer = offer
                        writes += self._catch_up(job)
                job.step = (start, end)
                job.group = []
                self._stepping.append(job)
        self._issue(writes)
        for job, why in fails:
            self.fail(job, why)

    def save_layer(self, layer_name: str) -> None:
        if not self._stepping:
            return
        layer = self._index.get(layer_name)
        if layer is None:
            log.debug("push: save_kv_layer for unknown layer %r", layer_name)
            return
        last = layer == len(self._index) - 1
        writes = []
        with self._lock:
            for job in self._stepping:
                if job.closing or job.step is None:
                    continue
                job.upto[layer] = max(job.upto[layer], job.step[1])
                job.group.append(layer)
                if job.offer is not None and (last or len(job.group) >= self.w.s.push_layers):
                    writes.append(self._pages(job, job.group))
                    job.group = []
        self._issue([w for w in writes if w[1]], during=True)

    def end_step(self) -> None:
        if not self._stepping:
            return
        writes, finish = [], []
        with self._lock:
            for job in self._stepping:
                if job.closing or job.step is None:
                    continue
                if job.group and job.offer is not None:
                    writes.append(self._pages(job, job.group))
                job.group = []
                if job.step[1] >= job.prompt_len and min(job.upto) >= job.prompt_len:
                    job.computed = True
                    job.computed_at = time.monotonic()
                    finish.append(job)
                log.debug("push %s: step to token %d of %d, computed=%s, offer=%s, writes=%d",
                          job.push_id[:8], job.step[1], job.prompt_len, job.computed,
                          job.offer is not None, job.writes)
                job.step = None
            self._stepping = []
        self._issue([w for w in writes if w[1]])
        for job in finish:
            self._maybe_done(job)

    # -- from the engine's threads --------------------------------------------------------

    def offer(self, peer: bytes, msg: dict[str, Any]) -> str:
        """Take a decode instance's offer; returns why it is refused ('' if taken)."""
        pid = str(msg.get("push", ""))
        if len(pid) < 32:
            return "malformed push id"
        layout = KVLayout.from_json(msg["layout"])
        assert self.w.layout is not None
        self.w.layout.check_compatible(layout, ours="prefill", theirs="decode")
        dst_blocks = [int(b) for b in msg["dst_blocks"]]
        first = int(msg["first"])
        if first < 0 or not dst_blocks or len(dst_blocks) > self.w.layout.num_blocks:
            return "malformed offer"
        o = Offer(peer, int(msg["imm"]), first, dst_blocks, bytes.fromhex(msg["dst"]), layout,
                  time.time() + self.w.s.push_wait_s)
        log.debug("push %s: offer of %d blocks from block %d", pid[:8], len(dst_blocks), first)
        writes: list[tuple[Job, list[int], list[int]]] = []
        finish = None
        with self._lock:
            self._expire_offers()
            req = self._by_push.get(pid)
            if pid in self._offers or (req is not None and self._jobs[req].offer is not None):
                return f"push {pid[:8]}: offered twice"
            if req is None:
                if len(self._offers) >= MAX_OFFERS:
                    return "too many offers waiting"
                if self.w.spent_push(pid):
                    return f"push {pid[:8]}: blocks already freed"
                self._offers[pid] = o
                return ""
            job = self._jobs[req]
            if job.closing:
                return f"request {req}: blocks already freed"
            job.offer = o
            writes = self._catch_up(job)
            if job.computed:
                finish = job
        self._issue(writes)
        if finish is not None:
            self._maybe_done(finish)
        return ""

    def withdraw(self, pid: str, why: str, peer: bytes, imm: Any) -> None:
        """The decode instance gave up (or never needs the blocks): no more writes; it is
        answered once the writes in flight have landed, and the blocks are freed."""
        with self._lock:
            offer = self._offers.get(pid)
            if offer is not None and offer.peer != peer:
                return   # only the engine that offered may withdraw its offer
            self._offers.pop(pid, None)
            req = self._by_push.get(pid)
            job = self._jobs.get(req) if req is not None else None
            if job is None:
                self.w.note_spent_push(pid)   # its request, if it comes, pushes nothing
            elif job.offer is not None and job.offer.peer != peer:
                return
        if job is not None:
            self.fail(job, why)
        elif imm is not None:
            self.w.tell_failed(peer, int(imm), f"push {pid[:8]}: {why}")

    def finished(self, req: str) -> None:
        """vLLM finished ``req``: a push that has not seen every layer computed by now never
        will (its blocks must not wait for it)."""
        with self._lock:
            job = self._jobs.get(req)
            late = job is not None and not job.computed and job.state == "open"
        if late:
            assert job is not None
            self.fail(job, "the prefill request finished before every layer was saved")

    def abort(self, req: str, why: str) -> None:
        with self._lock:
            job = self._jobs.get(req)
        if job is not None:
            self.fail(job, why)

    # -- state ----------------------------------------------------------------------------

    def busy(self, req: str) -> bool:
        """A decode instance has offered for ``req`` and its push is not over."""
        with self._lock:
            job = self._jobs.get(req)
            return job is not None and job.offer is not None and job.state != "reported"

    def has(self, req: str) -> bool:
        with self._lock:
            return req in self._jobs

    def forget(self, req: str) -> None:
        """The blocks of ``req`` are freed: drop its job (a later offer is refused)."""
        with self._lock:
            job = self._jobs.pop(req, None)
            if job is not None:
                job.closing = True
                self._by_push.pop(job.push_id, None)
                self.w.note_spent_push(job.push_id)

    def _expire_offers(self) -> None:   # holding self._lock
        now = time.time()
        for pid in [p for p, o in self._offers.items() if now > o.expiry]:
            del self._offers[pid]

    # -- writes ---------------------------------------------------------------------------

    def _block_range(self, job: Job, layer: int) -> list[tuple[int, int]]:
        """(source block, destination block) pairs of ``layer`` not yet written in full."""
        o = job.offer
        assert o is not None
        bs = self.w.block_size
        lo = max(o.first, job.full[layer])
        hi = min(-(-job.upto[layer] // bs), len(job.blocks), o.first + len(o.dst_blocks))
        job.full[layer] = max(job.full[layer], min(job.upto[layer] // bs, hi))
        return [(job.blocks[i], o.dst_blocks[i - o.first]) for i in range(lo, hi)]

    def _pages(self, job: Job, layers: list[int]) -> tuple[Job, list[int], list[int]]:
        assert self.w.layout is not None and job.offer is not None
        src: list[int] = []
        dst: list[int] = []
        for layer in layers:
            pairs = self._block_range(job, layer)
            src += [self.w.layout.layer_pages[layer] + s for s, _ in pairs]
            dst += [job.offer.layout.layer_pages[layer] + d for _, d in pairs]
        return job, src, dst

    def _catch_up(self, job: Job) -> list[tuple[Job, list[int], list[int]]]:
        job.group = []   # layers saved so far in this step are in this write
        w = self._pages(job, list(range(len(job.upto))))
        return [w] if w[1] else []

    def _issue(self, writes: list[tuple[Job, list[int], list[int]]], during: bool = False) -> None:
        """Start ``writes``; ``during``: issued from ``save_kv_layer``, while the forward pass
        that computes the next layers is still running."""
        assert self.w.layout is not None
        for job, src, dst in writes:
            with self._lock:
                if job.closing or job.offer is None:
                    continue
                job.pending += 1
                job.writes += 1
                job.early += during
                offer = job.offer
            try:
                t = self.w.engine.write_pages(
                    self.w.region, offer.dst, src_pages=src, dst_pages=dst,
                    page_size=self.w.layout.block_bytes, timeout=self.w.s.timeout)
            except TensorFabricError as exc:
                with self._lock:
                    job.pending -= 1
                self.fail(job, f"write failed: {exc}")
                continue
            t.add_done_callback(functools.partial(self._written, job))

    def _written(self, job: Job, t: Transfer) -> None:
        err = t.exception()
        with self._lock:
            job.pending -= 1
            if err is None:
                job.nbytes += t.nbytes
            failing = job.state == "failing"
        if err is not None:
            self.fail(job, f"write failed: {err}")
        elif failing:
            self.fail(job, job.reason)
        else:
            self._maybe_done(job)

    def _maybe_done(self, job: Job) -> None:
        with self._lock:
            if job.state != "open" or not job.computed or job.offer is None or job.pending:
                return
            job.state, job.closing = "finishing", True
            offer = job.offer
        try:
            t = self.w.engine.barrier([offer.peer], offer.imm, timeout=self.w.s.timeout)
        except TensorFabricError as exc:
            self._closed(job, f"final immediate failed: {exc}")
            return
        t.add_done_callback(
            lambda t: self._closed(job, "" if t.exception() is None
                                   else f"final immediate failed: {t.exception()}"))

    def fail(self, job: Job, why: str) -> None:
        """Stop pushing ``job``; once its writes in flight are over, tell the decode instance
        (which then recomputes) and free the blocks."""
        with self._lock:
            if job.state in ("finishing", "reported"):
                return
            if job.state == "open":
                job.state, job.reason = "failing", why
            job.closing = True
            if job.pending:
                return   # the last write's callback comes back here
            job.state = "reported"
            offer, why = job.offer, job.reason
        if offer is not None:
            log.warning("tensorfabric: pushing KV of %s stopped (%s)", job.req, why)
            self.w.tell_failed(offer.peer, offer.imm, f"request {job.req}: {why}")
        self._closed(job, why)

    def _closed(self, job: Job, err: str) -> None:
        with self._lock:
            job.state = "reported"
        now = time.monotonic()
        self.w.pushed(job.req, job.push_id, nbytes=job.nbytes, writes=job.writes,
                      early=job.early, seconds=now - job.started, error=err,
                      offered=job.offer is not None,
                      after_prefill=now - job.computed_at if job.computed_at else None)
