"""The trainer side: membership, the per-version round, the pipelined chunk writes."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import tensorfabric as tf
from tensorfabric.weights import _protocol as proto
from tensorfabric.weights._errors import WeightsError
from tensorfabric.weights._plan import (DEFAULT_CHECKSUM, KEYED_CHECKSUMS, WeightPlan, checksum,
                                       checksum_available, chunk_key, fanout)

log = logging.getLogger("tensorfabric.weights")
_GRACE = 1.0  # extra seconds to wait for a replica's own verdict after the round's deadline


@dataclass
class Replica:
    name: str
    address: bytes
    slots: list[Any]  # two RegionDescriptors
    version: int = 0


@dataclass
class PublishResult:
    """Outcome of one ``publish``: who has the version now and who does not, and why."""

    version: int
    updated: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    nbytes: int = 0  # bytes of one replica's copy
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass
class Faults:
    """Fault injection for tests and drills: bytes of ``corrupt`` chunks are flipped after their
    checksum was taken; ``drop`` chunks are never written."""

    corrupt: set[int] = field(default_factory=set)
    drop: set[int] = field(default_factory=set)


class Publisher:
    """Publishes versions of the trainer's weights to every replica that said hello.

    ``plan`` maps the trainer's tensors to the replicas' layout; it is computed once. Chunks
    that need a conversion or a fusion are prepared into a staging region (one copy of the
    replica layout); with ``zero_copy`` (default) the others (``Chunk.source`` set: a
    contiguous, unconverted range of one trainer tensor) are written straight from the
    trainer's memory, which must not change while ``publish`` runs.

    Late joiners and replicas that missed a round catch up from staging. After a zero-copy
    publish staging lacks the zero-copy chunks, so a catch-up first re-stages them from the
    tensors last published and checks them against that version's checksums: if the trainer
    has changed them since, the catch-up is skipped and the replica gets the next ``publish``.

    ``key`` (``weights_key(secret)``) makes the checksums keyed (``poly1305`` by default then):
    a relay without the secret can neither change a chunk nor recompute its checksum.
    """

    def __init__(self, engine: Any, plan: WeightPlan, *, fanout: str = "tree", degree: int = 2,
                 roots: int = 1, window: int = 4, timeout: float = 30.0,
                 checksum: str | None = None, faults: Faults | None = None,
                 zero_copy: bool = True, key: bytes | None = None) -> None:
        if len(plan.chunks) >= proto.MAX_CHUNKS:
            raise WeightsError(f"plan has {len(plan.chunks)} chunks; raise chunk_bytes")
        self.engine, self.plan, self.timeout = engine, plan, timeout
        self.fanout, self.degree, self.roots, self.window = fanout, degree, roots, window
        self.faults = faults or Faults()
        if checksum is None:
            checksum = "poly1305" if key is not None else DEFAULT_CHECKSUM
        why = checksum_available(checksum)
        if why is not None:
            raise WeightsError(why)
        if checksum in KEYED_CHECKSUMS and not key:
            raise WeightsError(f"checksum {checksum!r} is keyed: pass key=weights_key(secret)")
        self.checksum, self.key = checksum, key
        self.session = secrets.token_bytes(16)  # one-time MAC keys differ across publishers
        self.zero_copy = zero_copy
        self._staged = True  # staging holds every chunk of ``version``
        self._last: Mapping[str, Any] | None = None  # sources of the last zero-copy publish
        self.version = 0
        self._rounds = 0
        self.crcs: list[int] = []
        self.staging = engine.alloc(max(plan.nbytes, 1), access=tf.Access.READ_WRITE)
        self._arr: np.ndarray = self.staging.array
        self._replicas: dict[str, Replica] = {}
        self._mail: dict[tuple[str, str, int], dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._round = threading.Lock()  # one round at a time (publish or catch-up)
        self._joiners: list[str] = []
        self._closed = threading.Event()
        self._threads = [threading.Thread(target=self._serve, name="weights-pub", daemon=True),
                         threading.Thread(target=self._catch_up_loop, name="weights-catchup", daemon=True)]
        for t in self._threads:
            t.start()

    # -- membership --------------------------------------------------------------------------
    @property
    def replicas(self) -> list[str]:
        with self._cond:
            return list(self._replicas)

    def wait_replicas(self, n: int, timeout: float | None = None) -> list[str]:
        """Block until ``n`` replicas have joined."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._cond:
            while len(self._replicas) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise tf.TransferTimeout(f"{len(self._replicas)} of {n} replicas joined in time")
                self._cond.wait(left)
            return list(self._replicas)

    def wait_member(self, name: str, address: bytes, timeout: float | None = None) -> None:
        """Block until replica ``name`` has said hello from the engine at ``address`` (a replica
        that re-joined from a new engine is not sent anything before that)."""
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        with self._cond:
            while True:
                rep = self._replicas.get(name)
                if rep is not None and rep.address == bytes(address):
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise tf.TransferTimeout(f"replica {name} did not say hello from its new "
                                             f"engine within {wait:.0f} s")
                self._cond.wait(left)

    def catch_up(self, names: list[str]) -> None:
        """Send the current version again to ``names`` (replicas that missed it), in the
        background, as for late joiners."""
        with self._cond:
            self._joiners.extend(n for n in names if n in self._replicas)
            self._cond.notify_all()

    def replica_versions(self) -> dict[str, int]:
        with self._cond:
            return {r.name: r.version for r in self._replicas.values()}

    def _serve(self) -> None:
        while not self._closed.is_set():
            msg = proto.poll(self.engine, proto.TAG_PUBLISHER, self._closed)
            if msg is None:
                continue
            try:
                self._handle(msg.peer, proto.decode(msg.data))
            except Exception:
                log.exception("publisher: bad control message")

    def _handle(self, peer: bytes, msg: dict[str, Any]) -> None:
        if msg["kind"] != "hello":
            with self._cond:
                self._mail[(msg["kind"], str(msg.get("name", self._name_of(peer))), int(msg["r"]))] = msg
                self._cond.notify_all()
            return
        name = str(msg["name"])
        if msg["fingerprint"] != self.plan.layout.fingerprint():
            reason = (f"layout fingerprint {msg['fingerprint']} differs from the plan's "
                      f"{self.plan.layout.fingerprint()}: build the replica from the same layout")
            self._tell(peer, proto.encode("error", reason=reason))
            return
        slots = [tf.RegionDescriptor.from_bytes(bytes.fromhex(h)) for h in msg["slots"]]
        with self._cond:
            old = self._replicas.get(name)
            if old is None or old.address != bytes(peer) or old.slots != slots:  # new or restarted
                self._replicas[name] = Replica(name, bytes(peer), slots)
                self._joiners.append(name)
            self._cond.notify_all()
        self._tell(peer, proto.encode("welcome", v=self.version))

    def _name_of(self, peer: bytes) -> str:
        for r in self._replicas.values():
            if r.address == bytes(peer):
                return r.name
        return "?"

    def _tell(self, address: bytes, data: bytes) -> bool:
        try:
            self.engine.send(address, data, tag=proto.TAG_REPLICA, timeout=self.timeout).wait(self.timeout)
            return True
        except tf.TensorFabricError as exc:
            log.warning("publisher: cannot reach a replica: %s", exc)
            return False

    def _drop(self, rep: Replica, reason: str) -> None:
        """Forget ``rep``: only that registration (if the replica said hello again from a new
        engine while a round to its old one failed, the new one stays)."""
        with self._cond:
            if self._replicas.get(rep.name) is rep:
                del self._replicas[rep.name]
        log.warning("publisher: dropped replica %s: %s", rep.name, reason)

    def _catch_up_loop(self) -> None:
        while not self._closed.is_set():
            with self._cond:
                self._cond.wait_for(lambda: bool(self._joiners) or self._closed.is_set(), timeout=0.5)
                names, self._joiners = self._joiners, []
            # only a version this publisher has published (a new one may start its numbering
            # after what replicas serve, with nothing to send yet)
            if names and self.version > 0 and self.crcs and not self._closed.is_set():
                with self._round:
                    behind = [n for n in names if n in self._replicas
                              and self._replicas[n].version < self.version]
                    if behind and self._restage():
                        self._run_round(self.version, behind, prepare=None, result=PublishResult(self.version))

    def _restage(self) -> bool:
        """Make staging hold every chunk of ``version`` (after a zero-copy publish it lacks the
        zero-copy ones): copy them from the tensors last published and check each against the
        version's checksum. False when the trainer has changed them since."""
        if self._staged:
            return True
        if self._last is None:
            return False
        for c in self.plan.chunks:
            if c.source is None:
                continue
            self.plan.prepare(c.index, self._last, self._arr)
            if self._sum(self._arr[c.offset : c.offset + c.nbytes], c.index) != self.crcs[c.index]:
                log.info("publisher: version %d changed in the trainer's memory since it was "
                         "published; late joiners get the next publish", self.version)
                return False
        self._staged, self._last = True, None
        return True

    # -- publishing ---------------------------------------------------------------------------
    def publish(self, tensors: Mapping[str, Any], *, timeout: float | None = None) -> PublishResult:
        """Send ``tensors`` (the trainer's current weights) to every replica as a new version.

        Returns once every replica has verified and swapped it in, rejected it, or timed out;
        the result says which. A replica that dies is dropped without stalling the others.
        """
        sources = self.plan.check_sources(tensors)
        with self._round:
            self.version += 1
            result = PublishResult(self.version, nbytes=self.plan.nbytes)
            t0 = time.perf_counter()
            members = self.replicas
            if members:
                self._run_round(self.version, members, prepare=sources, result=result,
                                timeout=timeout)
            else:  # nobody to send to: still prepare, so late joiners get this version
                self._prepare_all(sources)
                self._staged, self._last = True, None
            retry = [n for n, why in result.failed.items() if n in self._replicas
                     and not why.startswith(("dead", "corrupt", "unsupported"))]
            if retry:  # e.g. a relay died mid-round: its subtree gets the version directly
                for n in retry:
                    result.failed.pop(n)
                self._run_round(self.version, retry, prepare=None, result=result, direct=True,
                                timeout=timeout, sources=sources)
            result.seconds = time.perf_counter() - t0
            return result

    def _prepare_all(self, sources: Mapping[str, Any]) -> None:
        self.crcs = []
        for c in self.plan.chunks:
            self.plan.prepare(c.index, sources, self._arr)
            self.crcs.append(self._sum(self._arr[c.offset : c.offset + c.nbytes], c.index))

    def _sum(self, buf: np.ndarray, index: int) -> int:
        key = (chunk_key(self.key, self.session, self.version, index)
               if self.checksum in KEYED_CHECKSUMS and self.key else None)
        return checksum(buf, self.checksum, key=key)

    def _await(self, kind: str, names: list[str], rnd: int, deadline: float) -> dict[str, dict[str, Any]]:
        got: dict[str, dict[str, Any]] = {}
        with self._cond:
            while True:
                for n in names:
                    if n not in got and (kind, n, rnd) in self._mail:
                        got[n] = self._mail.pop((kind, n, rnd))
                    elif n not in got and kind == "ready" and ("done", n, rnd) in self._mail:
                        got[n] = self._mail.pop(("done", n, rnd))  # refused before ready
                left = deadline - time.monotonic()
                if len(got) == len(names) or left <= 0:
                    return got
                self._cond.wait(min(left, 0.25))

    def _run_round(self, version: int, names: list[str], *, prepare: Mapping[str, Any] | None,
                   result: PublishResult, direct: bool = False, timeout: float | None = None,
                   sources: Mapping[str, Any] | None = None) -> None:
        """One round of ``version`` to ``names``. ``prepare``: the trainer's tensors, to stage
        and checksum afresh; else the chunks of ``self.crcs`` are resent, the zero-copy ones
        from ``sources`` if given (the same tensors, still unchanged), else from staging."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        chunks = [[c.offset, c.nbytes] for c in self.plan.chunks]
        self._rounds += 1
        rnd = self._rounds
        with self._cond:
            reps = {n: self._replicas[n] for n in names if n in self._replicas}
        log.debug("publisher: round %d of version %d to %s", rnd, version, names)
        told = [n for n, r in reps.items()
                if self._tell(r.address, proto.encode("prepare", v=version, r=rnd, chunks=chunks, timeout=timeout,
                                                  checksum=self.checksum, session=self.session.hex()))
                or self._fail(result, n, "dead: unreachable", drop=r)]
        t_ready = time.perf_counter()
        ready = self._await("ready", told, rnd, deadline)
        result.stages["ready"] = result.stages.get("ready", 0.0) + time.perf_counter() - t_ready
        for n in told:
            msg = ready.get(n)
            if msg is None or msg["kind"] != "ready":
                self._fail(result, n, msg["reason"] if msg else "no answer to prepare in time")
        live = [n for n in told if n in ready and ready[n]["kind"] == "ready"]
        parents = fanout(len(live), "direct" if direct else self.fanout, degree=self.degree, roots=self.roots)
        desc = {n: reps[n].slots[int(ready[n]["slot"])] for n in live}
        for i, n in enumerate(live):
            kids = [[reps[live[j]].address.hex(), desc[live[j]].to_bytes().hex()]
                    for j, p in enumerate(parents) if p == i]
            self._tell(reps[n].address, proto.encode("go", v=version, r=rnd, children=kids))
        roots = [n for i, n in enumerate(live) if parents[i] < 0]
        t0 = time.perf_counter()
        self._write_chunks(rnd, {n: reps[n] for n in roots}, desc, prepare, result, deadline,
                           sources=prepare if prepare is not None else sources)
        result.stages["write"] = result.stages.get("write", 0.0) + time.perf_counter() - t0
        for n in live:
            self._tell(reps[n].address, proto.encode("commit", v=version, r=rnd, crcs=self.crcs))
        t_commit = time.perf_counter()
        done = self._await("done", live, rnd, deadline + _GRACE)  # replicas time out first
        result.stages["commit"] = result.stages.get("commit", 0.0) + time.perf_counter() - t_commit
        for n in live:
            msg = done.get(n)
            if msg is not None and msg["ok"]:
                result.updated.append(n)
                with self._cond:
                    if self._replicas.get(n) is reps[n]:  # not a registration made since
                        reps[n].version = version
            elif n not in result.failed:
                self._fail(result, n, msg["reason"] if msg else "incomplete: no verdict in time")
                if msg is None:
                    self._tell(reps[n].address, proto.encode("abort", v=version, r=rnd))

    def _fail(self, result: PublishResult, name: str, reason: str, *,
              drop: Replica | None = None) -> bool:
        result.failed[name] = reason
        if drop is not None:
            self._drop(drop, reason)
        return False

    def _write_chunks(self, rnd: int, roots: dict[str, Replica], desc: dict[str, Any],
                      prepare: Mapping[str, Any] | None, result: PublishResult, deadline: float,
                      sources: Mapping[str, Any] | None = None) -> None:
        inflight: list[tuple[Replica, Any]] = []
        dead: set[str] = set()
        zero_copy = self.zero_copy and sources is not None and (prepare is not None or not self._staged)
        if prepare is not None:
            self.crcs = []
            self._staged = True
        clock = time.perf_counter
        spent = {"prepare": 0.0, "checksum": 0.0, "drain": 0.0}
        flipped: list[np.ndarray] = []  # fault injection: bytes to flip back after the round
        for c in self.plan.chunks:
            direct = self.plan.source_bytes(c.index, sources) if zero_copy and sources else None
            src: Any = self.staging if direct is None else direct
            src_off = c.offset if direct is None else 0
            if prepare is not None:
                t0 = clock()
                if direct is None:
                    self.plan.prepare(c.index, prepare, self._arr)
                else:
                    self._staged = False  # staging lacks this chunk of this version
                t1 = clock()
                body = self._arr[c.offset : c.offset + c.nbytes] if direct is None else direct
                self.crcs.append(self._sum(body, c.index))
                spent["prepare"] += t1 - t0
                spent["checksum"] += clock() - t1
            if c.index in self.faults.corrupt:  # after the checksum: the replica must notice
                body = self._arr[c.offset : c.offset + 1] if direct is None else direct[:1]
                if body.flags.writeable:
                    body ^= 0xFF
                    flipped.append(body)
            if c.index in self.faults.drop:
                continue
            for n, rep in roots.items():
                if n in dead:
                    continue
                t = self.engine.write(src, desc[n], src_offset=src_off, dst_offset=c.offset,
                                      nbytes=c.nbytes, imm=proto.imm(rnd, c.index))
                inflight.append((rep, t))
            while len(inflight) > self.window * max(1, len(roots)):
                self._reap(inflight.pop(0), dead, result, deadline)
        t0 = clock()
        while inflight:
            self._reap(inflight.pop(0), dead, result, deadline)
        spent["drain"] += clock() - t0
        for k, v in spent.items():
            result.stages[k] = result.stages.get(k, 0.0) + v
        for body in flipped:  # restore staging (later catch-ups) and the trainer's tensors
            body ^= 0xFF
        if prepare is not None and not self._staged:
            self._last = prepare

    def _reap(self, item: tuple[Replica, Any], dead: set[str], result: PublishResult,
              deadline: float) -> None:
        rep, t = item
        name = rep.name
        try:
            t.wait(max(0.01, deadline - time.monotonic()))
        except (tf.BrokenError, tf.ClosedError) as exc:
            if name not in dead:
                dead.add(name)
                self._fail(result, name, f"dead: {exc}", drop=rep)
        except tf.TensorFabricError as exc:
            if name not in dead:
                dead.add(name)
                self._fail(result, name, f"write failed: {exc}")

    def close(self) -> None:
        self._closed.set()
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
