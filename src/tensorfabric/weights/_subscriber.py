"""The replica side: receive slots, verification, atomic swap, relaying to children."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import tensorfabric as tf
from tensorfabric.weights import _protocol as proto
from tensorfabric.weights._errors import UpdateRejected
from tensorfabric.weights._layout import Layout
from tensorfabric.weights._plan import (DEFAULT_CHECKSUM, KEYED_CHECKSUMS, checksum, checksum_available,
                                       chunk_key)
from tensorfabric.weights._slots import SlotSet, Snapshot

log = logging.getLogger("tensorfabric.weights")

Binder = Callable[[int, dict[str, Any]], Any]


class _Update:
    """State of one incoming version: its slot, chunk table, route and the commit message."""

    def __init__(self, version: int, rnd: int, slot: int, chunks: list[list[int]], deadline: float) -> None:
        self.version, self.round, self.slot = version, rnd, slot
        self.chunks, self.deadline = chunks, deadline
        self.route = threading.Event()
        self.children: list[tuple[bytes, Any]] = []
        self.commit = threading.Event()
        self.crcs: list[int] = []
        self.aborted = threading.Event()
        self.checksum = DEFAULT_CHECKSUM
        self.session = b""
        self.thread: threading.Thread | None = None


class Subscriber:
    """A replica: holds two slots of ``layout``, serves one version, swaps in verified updates.

    ``engine`` is this process's Engine; ``publisher`` the publisher engine's address. ``bind``
    (optional) is called once per slot with the slot's numpy views and may return an object
    built over them (a torch model, see ``tensorfabric.weights.bind_torch``); a lease's
    ``Snapshot.extra`` is that object. ``timeout`` bounds every wait of an update.

    ``key`` (``weights_key(secret)``): require keyed checksums (an update with an unkeyed one
    is refused, so a relay cannot downgrade it). ``single_slot``: one buffer instead of two,
    for a consumer that copies each verified version elsewhere (vLLM): while an update is
    written no version can be leased (see ``SlotSet``).
    """

    def __init__(self, engine: Any, publisher: bytes, layout: Layout, *, name: str = "replica",
                 timeout: float = 30.0, bind: Binder | None = None, key: bytes | None = None,
                 single_slot: bool = False) -> None:
        self.engine, self.publisher, self.layout = engine, bytes(publisher), layout
        self.name, self.timeout, self.key = name, timeout, key
        n = 1 if single_slot else 2
        self.regions = [engine.alloc(max(layout.nbytes, 1), access=tf.Access.READ_WRITE) for _ in range(n)]
        self.slots = SlotSet(layout, [r.array for r in self.regions])
        if bind is not None:
            for i in range(n):
                self.slots.extras[i] = bind(i, self.slots.views[i])
        self.rejected: list[tuple[int, str]] = []  # (version, reason) of refused updates
        self._update: _Update | None = None
        self._seen: collections.deque[int] = collections.deque(maxlen=256)  # rounds prepared
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._welcome = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"weights-sub-{name}", daemon=True)
        self._hello = proto.encode("hello", name=name, fingerprint=layout.fingerprint(),
                                   slots=[self.regions[i % n].descriptor().to_bytes().hex() for i in range(2)])
        self._thread.start()

    # -- reading -----------------------------------------------------------------------------
    @contextmanager
    def acquire(self) -> Iterator[Snapshot]:
        """Lease the current version (tensors and ``extra``) for the ``with`` block."""
        with self.slots.acquire() as snap:
            yield snap

    @property
    def version(self) -> int:
        return self.slots.version

    def wait_version(self, version: int, timeout: float | None = None) -> int:
        return self.slots.wait_version(version, self.timeout if timeout is None else timeout)

    def wait_joined(self, timeout: float | None = None) -> None:
        if not self._welcome.wait(self.timeout if timeout is None else timeout):
            raise tf.TransferTimeout(f"{self.name}: the publisher did not answer hello in time")

    def close(self) -> None:
        self._closed.set()
        if self._update is not None:
            self._update.aborted.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- control ------------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        timeout = self.timeout if self._welcome.is_set() else min(self.timeout, 2.0)
        try:
            self.engine.send(self.publisher, data, tag=proto.TAG_PUBLISHER, timeout=timeout).wait(timeout)
        except tf.TensorFabricError as exc:
            log.warning("%s: cannot reach the publisher: %s", self.name, exc)

    def _serve(self) -> None:
        next_hello = 0.0
        while not self._closed.is_set():
            if not self._welcome.is_set() and time.monotonic() >= next_hello:
                self._send(self._hello)  # repeated until answered: the publisher may start later
                next_hello = time.monotonic() + 1.0
            msg = proto.poll(self.engine, proto.TAG_REPLICA, self._closed)
            if msg is None:
                continue
            try:
                self._handle(proto.decode(msg.data))
            except Exception:  # a bad message must not kill the replica's control loop
                log.exception("%s: bad control message", self.name)

    def _handle(self, msg: dict[str, Any]) -> None:
        kind, version, rnd = msg["kind"], msg.get("v", 0), msg.get("r", 0)
        if kind == "welcome":
            self._welcome.set()
        elif kind == "error":
            log.error("%s: publisher refused this replica: %s", self.name, msg.get("reason"))
            self.rejected.append((0, str(msg.get("reason"))))
            self._welcome.set()
        elif kind == "prepare":
            if rnd in self._seen:
                return  # a duplicate delivery of a prepare we already acted on
            self._seen.append(rnd)
            self._prepare(version, rnd, msg["chunks"], float(msg.get("timeout", self.timeout)),
                          str(msg.get("checksum", "crc32")), bytes.fromhex(str(msg.get("session", ""))))
        elif kind in ("go", "commit", "abort"):
            up = self._update
            if up is None or up.round != rnd:
                return  # a stale round
            if kind == "go":
                up.children = [(bytes.fromhex(a), tf.RegionDescriptor.from_bytes(bytes.fromhex(d)))
                               for a, d in msg["children"]]
                up.route.set()
            elif kind == "commit":
                up.crcs = list(msg["crcs"])
                up.commit.set()
            else:
                up.aborted.set()

    def _prepare(self, version: int, rnd: int, chunks: list[list[int]], timeout: float,
                 kind: str, session: bytes = b"") -> None:
        log.debug("%s: prepare version %d round %d", self.name, version, rnd)
        old = self._update
        if old is not None:
            old.aborted.set()  # a newer round supersedes an unfinished one; let it give up
            if old.thread is not None:  # its slot first, so the two never share a reservation
                old.thread.join(timeout=self.timeout)
        why = checksum_available(kind)
        if why is None and self.key is not None and kind not in KEYED_CHECKSUMS:
            why = f"this replica requires a keyed checksum ({KEYED_CHECKSUMS}), not {kind!r}"
        elif why is None and kind in KEYED_CHECKSUMS and not (self.key and len(session) == 16):
            why = f"checksum {kind!r} is keyed: give the replica key=weights_key(secret)"
        if why is not None:  # refuse before taking a slot: nothing to undo
            why = f"unsupported: {why}"
            self.rejected.append((version, why))
            self._send(proto.encode("done", name=self.name, v=version, r=rnd, ok=False, reason=why))
            return
        deadline = time.monotonic() + timeout
        try:
            slot = self.slots.reserve(timeout=min(timeout, self.timeout))
        except tf.TransferTimeout as exc:
            self._send(proto.encode("done", name=self.name, v=version, r=rnd, ok=False, reason=str(exc)))
            return
        up = _Update(version, rnd, slot, chunks, deadline)
        up.checksum, up.session = kind, session
        self._update = up
        up.thread = threading.Thread(target=self._receive, args=(up,), name=f"weights-rx-{version}",
                                     daemon=True)
        up.thread.start()
        self._send(proto.encode("ready", name=self.name, v=version, r=rnd, slot=slot))

    # -- data ----------------------------------------------------------------------------------
    def _receive(self, up: _Update) -> None:
        t0 = time.monotonic()
        try:
            self._receive_chunks(up)
            ok, reason = True, ""
        except UpdateRejected as exc:
            ok, reason = False, exc.reason
        if ok:
            self.slots.commit(up.slot, up.version)
        else:
            self.slots.abort(up.slot)
            self.rejected.append((up.version, reason))
            log.warning("%s: rejected version %d (%s); still serving %d", self.name, up.version,
                        reason, self.slots.version)
        if self._update is up:
            self._update = None
        self._send(proto.encode("done", name=self.name, v=up.version, r=up.round, ok=ok, reason=reason,
                                seconds=time.monotonic() - t0))

    def _left(self, up: _Update, what: str) -> float:
        if up.aborted.is_set():
            raise UpdateRejected(f"version {up.version} aborted", version=up.version,
                                 replica=self.name, reason="aborted")
        left = up.deadline - time.monotonic()
        if left <= 0:
            raise UpdateRejected(f"version {up.version} incomplete", version=up.version,
                                 replica=self.name, reason=f"incomplete: timed out waiting for {what}")
        return min(left, 0.25)

    def _wait(self, up: _Update, transfer: Any, what: str) -> None:
        while True:
            try:
                transfer.wait(self._left(up, what))
                return
            except tf.TransferTimeout:
                continue
            except UpdateRejected:
                transfer.cancel()
                raise

    def _receive_chunks(self, up: _Update) -> None:
        region = self.regions[up.slot]
        arr = region.array
        waits = [self.engine.expect(proto.imm(up.round, i), 1) for i in range(len(up.chunks))]
        forwards: list[Any] = []
        crcs = []
        try:
            while not up.route.wait(self._left(up, "the route")):
                pass
            for i, (off, n) in enumerate(up.chunks):
                self._wait(up, waits[i], f"chunk {i}/{len(up.chunks)}")
                for addr, desc in up.children:
                    forwards.append(self.engine.write(region, desc, src_offset=off, dst_offset=off,
                                                      nbytes=n, imm=proto.imm(up.round, i)))
                key = (chunk_key(self.key, up.session, up.version, i)
                       if up.checksum in KEYED_CHECKSUMS and self.key else None)
                crcs.append(checksum(arr[off : off + n], up.checksum, key=key))
            while not up.commit.wait(self._left(up, "the commit")):
                pass
        finally:
            for w in waits:
                if not w.done():
                    w.cancel()
        bad = [i for i, (a, b) in enumerate(zip(crcs, up.crcs)) if a != b]
        self._finish_forwards(up, forwards)
        if bad or len(up.crcs) != len(crcs):
            raise UpdateRejected(f"version {up.version} corrupt", version=up.version, replica=self.name,
                                 reason=f"corrupt: checksum mismatch in chunk(s) {bad[:8]}")

    def _finish_forwards(self, up: _Update, forwards: list[Any]) -> None:
        for t in forwards:  # a dead child must not fail this replica's own update
            try:
                t.wait(max(0.01, up.deadline - time.monotonic()))
            except tf.TensorFabricError as exc:
                log.warning("%s: forwarding version %d failed: %s", self.name, up.version, exc)
