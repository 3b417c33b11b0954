"""The owner's side of shared memory: handing a region's memory to a peer, and taking it back.

A same-host peer that wants to map a region asks over its authenticated tcp link
(``SHM_OPEN`` with the region's key and the access it wants). When the engine has checked key
and permission it issues a one-time *ticket* bound to (peer, region, access) and replies with
it. The peer presents the ticket on this engine's unix socket (abstract namespace, named by the
reply); the owner checks the ticket and its current region table again, and only then sends
the region's file itself (``SCM_RIGHTS``), opened read-write or read-only as granted. Nothing
in a descriptor or address names a process, a file or a file descriptor.

Unregistering a region revokes it: every peer it was handed to is told (``SHM_REVOKE``) and
acknowledges once its in-flight copies into the mapping have finished and the mapping is gone.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Callable

from .. import _wire as w

if TYPE_CHECKING:
    from ._tcp import TcpTransport

log = logging.getLogger("tensorfabric.shm")

TICKET_BYTES = 16
TICKET_TTL = 10.0
MAX_TICKETS = 1024
MAX_CLIENTS = 16  # grant-socket clients served at once
#: SHM_OPEN_RESP ext on success: ticket, region size, then the owner's unix socket name
GRANT = struct.Struct("<16sQ")
_ANSWER = struct.Struct("<BQ")  # status, region size (sent with the file)

#: grant(peer id, region id, writable) -> (file descriptor, nbytes) or None if no longer valid
GrantFn = Callable[[bytes, int, bool], "tuple[int, int] | None"]


class Unanswered(Exception):
    """The owner's grant socket turned the client away unanswered (busy); the ticket is unused."""


class ShmGrants:
    """Tickets, the unix socket that redeems them, and revocation."""

    def __init__(self, tcp: TcpTransport, grant: GrantFn) -> None:
        self.tcp = tcp
        self._grant = grant
        self._lock = threading.Lock()
        self._tickets: dict[bytes, tuple[bytes, int, bool, float]] = {}
        self._revokes: dict[int, threading.Event] = {}
        self.name = b"\0tensorfabric-shm-" + secrets.token_hex(12).encode()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.bind(self.name)
        self._sock.listen(64)
        self._closed = False
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._thread = threading.Thread(target=self._serve, name="tf-shm-grant", daemon=True)
        self._thread.start()

    def issue(self, peer_id: bytes, region: int, writable: bool) -> bytes:
        """A one-time ticket for ``peer_id`` to map ``region``: the SHM_OPEN_RESP ext."""
        ticket = secrets.token_bytes(TICKET_BYTES)
        now = time.monotonic()
        with self._lock:
            for t, (*_, exp) in list(self._tickets.items()):
                if exp < now:
                    del self._tickets[t]
            while len(self._tickets) >= MAX_TICKETS:
                del self._tickets[next(iter(self._tickets))]
            self._tickets[ticket] = (peer_id, region, writable, now + TICKET_TTL)
        return ticket

    def _serve(self) -> None:
        # anyone on the host can connect to an abstract socket: each client gets a thread of
        # its own for at most a second, and at most MAX_CLIENTS at once, so a stalling client
        # cannot hold up the peers that present real tickets
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError as exc:
                if self._closed:
                    return
                log.warning("shared-memory grant socket: %s; retrying", exc)
                time.sleep(0.1)
                continue
            if not self._slots.acquire(blocking=False):
                conn.close()
                continue
            try:
                threading.Thread(target=self._client, args=(conn,), daemon=True,
                                 name="tf-shm-grant-client").start()
            except RuntimeError:
                self._slots.release()
                conn.close()

    def _client(self, conn: socket.socket) -> None:
        try:
            self._answer(conn)
        except OSError:
            pass
        except Exception:  # never let a bug or a hostile client escape the thread
            log.exception("shared-memory grant failed")
        finally:
            conn.close()
            self._slots.release()

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(1.0)
        ticket = b""
        while len(ticket) < TICKET_BYTES:
            got = conn.recv(TICKET_BYTES - len(ticket))
            if not got:
                return
            ticket += got
        with self._lock:
            entry = self._tickets.pop(ticket, None)
        if entry is None or entry[3] < time.monotonic():
            conn.sendall(_ANSWER.pack(w.Status.BAD_KEY, 0))
            return
        peer_id, region, writable, _ = entry
        granted = self._grant(peer_id, region, writable)  # the owner's current table, now
        if granted is None:
            conn.sendall(_ANSWER.pack(w.Status.NO_REGION, 0))
            return
        fd, nbytes = granted
        try:
            socket.send_fds(conn, [_ANSWER.pack(w.Status.OK, nbytes)], [fd])
        finally:
            os.close(fd)

    # -- revocation -------------------------------------------------------------------------

    def revoke(self, region: int, peers: set[bytes], timeout: float) -> list[bytes]:
        """Tell ``peers`` that ``region`` is gone; wait (up to ``timeout``) until each has
        dropped its mapping. Returns the peers that did not confirm (gone or too slow)."""
        waits: list[tuple[bytes, threading.Event, int]] = []
        for peer_id in peers:
            conn = self.tcp.accepted_from(peer_id)
            if conn is None:
                continue  # no link from it: it is gone (its mappings died with it) or redialling
            op_id = next(self.tcp.op_ids)
            ev = threading.Event()
            with self._lock:
                self._revokes[op_id] = ev
            conn.reply([w.pack_header(w.Op.SHM_REVOKE, 0, 0, op_id, region)])
            waits.append((peer_id, ev, op_id))
        deadline = time.monotonic() + timeout
        missing = []
        for peer_id, ev, op_id in waits:
            if not ev.wait(max(0.0, deadline - time.monotonic())):
                missing.append(peer_id)
            with self._lock:
                self._revokes.pop(op_id, None)
        return missing

    def revoked(self, op_id: int) -> None:
        with self._lock:
            ev = self._revokes.get(op_id)
        if ev is not None:
            ev.set()

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=2)


def redeem(name: bytes, ticket: bytes, timeout: float) -> tuple[int, int, int]:
    """The peer's side: present ``ticket`` at the owner's socket ``name``; returns (status,
    nbytes, file descriptor or -1). :class:`Unanswered`: turned away, try again."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(name)  # OSError here: out of reach (e.g. another network namespace)
        try:
            s.sendall(ticket)
            msg, fds, _, _ = socket.recv_fds(s, _ANSWER.size, 1)
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise Unanswered(str(exc)) from exc
        if len(msg) != _ANSWER.size:
            for fd in fds:
                os.close(fd)
            # closed unanswered (the owner was busy with other clients): the ticket is unused
            raise Unanswered("the owner's grant socket closed without an answer")
        status, nbytes = _ANSWER.unpack(msg)
        if status != w.Status.OK or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            return status or w.Status.ERROR, 0, -1
        return status, nbytes, fds[0]


__all__ = ["GRANT", "ShmGrants", "Unanswered", "redeem"]
