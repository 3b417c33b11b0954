"""The shared poller of accepted tcp links (``transports/_poller.py``): the caller waiting in
``recv`` / ``expect`` reads and delivers the frame itself; links leave it when they close."""

from __future__ import annotations

import select
import threading
import time

import numpy as np
import pytest

from tensorfabric import ClosedError, Engine, gather
from tensorfabric._inbound import Inbound
from tensorfabric.transports import _poller

SECRET = "poller-secret"


def _pair() -> tuple[Engine, Engine]:
    return Engine(SECRET, transports=("tcp",), name="a"), Engine(SECRET, transports=("tcp",),
                                                                   name="b")


def _spy(monkeypatch, name: str) -> list[str]:
    """Record the thread that runs Inbound.<name> (deliver / landed)."""
    seen: list[str] = []
    orig = getattr(Inbound, name)

    def spy(self, *a, **k):
        seen.append(threading.current_thread().name)
        return orig(self, *a, **k)

    monkeypatch.setattr(Inbound, name, spy)
    return seen


def _later(delay: float, fn) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        fn()

    th = threading.Thread(target=run, name="sender")
    th.start()
    return th


def test_recv_caller_delivers_its_own_message(monkeypatch) -> None:
    a, b = _pair()
    with a, b:
        a.send(b.address, b"warm", tag=1).wait(10)  # b accepts a's link
        assert b.recv(tag=1, timeout=10).data == b"warm"
        seen = _spy(monkeypatch, "deliver")
        me = threading.current_thread().name
        for i in range(5):  # the message arrives while b's caller waits in recv
            th = _later(0.2, lambda i=i: a.send(b.address, b"m%d" % i, tag=1).wait(10))
            assert b.recv(tag=1, timeout=10).data == b"m%d" % i
            th.join()
        assert seen == [me] * 5, seen


def test_expect_caller_counts_its_own_immediate(monkeypatch) -> None:
    a, b = _pair()
    with a, b:
        region = b.register(np.zeros(4096, np.uint8))
        a.write(np.ones(4096, np.uint8), region.descriptor(), imm=7).wait(10)
        b.expect(7, 1, timeout=10).wait(10)
        seen = _spy(monkeypatch, "landed")
        th = _later(0.2, lambda: a.write(np.full(4096, 2, np.uint8), region.descriptor(),
                                         imm=7).wait(10))
        b.expect(7, 1, timeout=10).wait(10)
        th.join()
        assert seen == [threading.current_thread().name]
        assert (region.array == 2).all()


def test_message_for_another_waiter_is_handed_over() -> None:
    """Two threads in recv on different tags: one polls, the other waits on its transfer;
    both get their message whichever thread reads it."""
    a, b = _pair()
    with a, b:
        a.send(b.address, b"warm", tag=1).wait(10)
        b.recv(tag=1, timeout=10)
        got: dict[int, bytes] = {}
        threads = [threading.Thread(target=lambda t=t: got.__setitem__(
            t, b.recv(tag=t, timeout=10).data)) for t in (2, 3)]
        for th in threads:
            th.start()
        time.sleep(0.2)
        a.send(b.address, b"three", tag=3).wait(10)
        a.send(b.address, b"two", tag=2).wait(10)
        for th in threads:
            th.join(15)
        assert got == {2: b"two", 3: b"three"}


def test_closed_links_leave_the_poller() -> None:
    a, b = _pair()
    with b:
        with a:
            a.send(b.address, b"x", tag=1).wait(10)
            b.recv(tag=1, timeout=10)
            poller = b._tcp.poller
            assert poller is not None and len(poller.conns) == 1
        deadline = time.monotonic() + 10
        while poller.conns and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not poller.conns


def _holding(poller, ident: int, limit: float = 10.0) -> None:
    """Wait until thread ``ident`` polls ``poller`` (it waits in recv with nothing come)."""
    deadline = time.monotonic() + limit
    while poller._holder != ident:
        assert time.monotonic() < deadline, "the waiting thread never polled"
        time.sleep(0.001)


ROUNDS = 100  # runs of 40 failed 5 times in 6 on the first version of the poller


def test_close_while_a_caller_polls_fails_it_with_closed_error() -> None:
    """Engine.close() while a thread waits in recv, polling the accepted links itself: close
    kicks the poller's eventfd and then closes the fds, so the woken caller races the closing
    thread to its read of the eventfd (it raised EBADF there, or could read a reused fd). The
    waiter must get the engine's ClosedError, every time."""
    errors: list[BaseException] = []
    for _ in range(ROUNDS):
        a, b = _pair()
        with a:
            a.send(b.address, b"warm", tag=1).wait(10)
            b.recv(tag=1, timeout=10)
            poller = b._tcp.poller
            assert poller is not None
            ident: list[int] = []

            def wait(b: Engine = b, ident: list[int] = ident) -> None:
                ident.append(threading.get_ident())
                try:
                    b.recv(tag=2, timeout=30)
                except BaseException as exc:  # noqa: BLE001 - recorded and checked below
                    errors.append(exc)

            th = threading.Thread(target=wait, name="waiter")
            th.start()
            while not ident:
                time.sleep(0.001)
            _holding(poller, ident[0])
            b.close()
            th.join(15)
            assert not th.is_alive(), "the caller was not woken by close"
    assert all(isinstance(e, ClosedError) for e in errors), [repr(e) for e in errors]
    assert len(errors) == ROUNDS


def test_a_slow_caller_does_not_keep_other_links_unread() -> None:
    """One thread waits in recv, polling every accepted link, and is slow to get through the
    frames it reads (each message it delivers runs a done-callback that takes a while, as a
    thread short of the GIL on a busy machine would). Frames wait on many other links, the
    last of them a heartbeat. The links it leaves waiting must be taken over by the parked
    receive threads: the heartbeat is delivered while the caller still works through the
    backlog, not after it has delivered every message itself (it then starved them: the
    edge heard nothing from the cloud for too long)."""
    n = 16
    b = Engine(SECRET, transports=("tcp",), name="b")
    peers = [Engine(SECRET, transports=("tcp",), name=f"p{i}") for i in range(n + 1)]
    try:
        for p in peers:  # n + 1 accepted links at b, each with its receive thread
            p.send(b.address, b"warm", tag=1).wait(10)
            b.recv(tag=1, timeout=10)
        poller = b._tcp.poller
        assert poller is not None and len(poller.conns) == n + 1
        caller: list[int] = []
        started: list[int] = []
        by_caller: list[int] = []
        at_heartbeat: list[int] = []
        heartbeat = threading.Event()

        def slow(_: object) -> None:
            started.append(1)
            if threading.get_ident() == caller[0]:
                by_caller.append(1)
            heartbeat.wait(0.06)  # shorter than a "stuck in one frame" bound would catch

        def beat(_: object) -> None:
            at_heartbeat.append(len(by_caller))
            heartbeat.set()

        slow_recvs = [b.recv_async(tag=2, timeout=60) for _ in range(n)]
        for t in slow_recvs:
            t.add_done_callback(slow)
        beat_recv = b.recv_async(tag=3, timeout=60)
        beat_recv.add_done_callback(beat)

        def wait() -> None:
            caller.append(threading.get_ident())
            b.recv(tag=4, timeout=60)

        th = threading.Thread(target=wait, name="caller")
        th.start()
        while not caller:
            time.sleep(0.001)
        _holding(poller, caller[0])
        deadline = time.monotonic() + 10  # the receive threads' polls end, they park
        while poller._parked < n:
            assert time.monotonic() < deadline, "the receive thread never parked"
            time.sleep(0.005)
        sends = [p.send(b.address, b"slow", tag=2) for p in peers[:n]]
        # the heartbeat comes last: once every other message is delivered or waits in its
        # socket (else it may be read first, and nothing is left waiting behind the caller)
        socks = [c.sock for c in list(b._tcp._accepted)]
        deadline = time.monotonic() + 20
        while len(started) + len(select.select(socks, [], [], 0)[0]) < n:
            assert time.monotonic() < deadline, "the messages never arrived"
            time.sleep(0.002)
        sends.append(peers[n].send(b.address, b"beat", tag=3))
        beat_recv.wait(30)
        for t in slow_recvs:
            t.wait(30)
        peers[0].send(b.address, b"end", tag=4).wait(10)
        th.join(10)
        for s in sends:
            s.wait(10)
        # serially the caller delivers them all (one receive thread may be between its
        # polls when they come and take one); taken over, it delivers one or two
        assert at_heartbeat and at_heartbeat[0] <= n // 2, (
            f"the caller delivered {at_heartbeat[0]} of the {n} messages before the "
            "heartbeat on another link was read")
    finally:
        for e in (*peers, b):
            e.close()


def test_recv_or_expect_registered_after_close_fails_at_once() -> None:
    """A recv or expect that passed the open check just before another thread closed the
    engine registers its waiter after close() failed the others: it must fail with ClosedError
    at once, not wait out its timeout (its timer thread is gone too). The race window is
    widened by letting the check pass on the closed engine."""
    e = Engine(SECRET, transports=("tcp",), name="late")
    e.close()
    e._check_open = lambda: None  # type: ignore[method-assign] - the window: checked, then closed
    for t in (e.recv_async(tag=7, timeout=30), e.expect(123, timeout=30)):
        # already failed when returned (the old code: TransferTimeout after this wait)
        assert t.done(), t
        with pytest.raises(ClosedError):
            t.wait(5)
    assert not e._inbox_waiters and not e._imm_waiters


def _pumps(monkeypatch, engine: Engine) -> list[str]:
    """Record the thread that reads each batch of frames on ``engine``'s tcp links."""
    from tensorfabric.transports._link import Conn

    seen: list[str] = []
    orig = Conn._pump

    def spy(self: Conn) -> None:
        if self.t is engine._tcp:
            seen.append(("dial " if self.dialer else "accept ") + threading.current_thread().name)
        orig(self)

    monkeypatch.setattr(Conn, "_pump", spy)
    return seen


def _echo(peer: Engine, to: Engine, n: int) -> threading.Thread:
    def run() -> None:
        for _ in range(n):
            msg = peer.recv(tag=5, timeout=30)
            peer.send(to.address, msg.data, tag=6).wait(30)

    th = threading.Thread(target=run, name="echo")
    th.start()
    return th


ECHOES = 300


def test_a_request_response_loop_reads_its_acks_and_replies_itself(monkeypatch) -> None:
    """send().wait() then recv() in a loop: the acknowledgement comes on the link this engine
    dialled, the reply on the one it accepted, often while the caller is between its two
    waits. The caller must read both itself (it keeps the links between waits that follow
    each other closely) instead of a receive thread reading the frame, delivering it and
    waking the caller (the old code: the caller read about 60% of the replies under load,
    8-11% idle). The hold is stretched from 2 ms to 250 ms here: a caller descheduled for
    longer than the hold lets the receive threads in, as it should, and on a busy machine
    (load 30, run 58) 2 ms left it 67-76% of the replies. Most, not all, even so: the loop
    runs up to three times and one run must show it (the old code fails all three)."""
    monkeypatch.setattr(_poller, "_LINGER", 0.25)
    a, b = _pair()
    with a, b:
        a.send(b.address, b"warm", tag=5).wait(10)
        b.recv(tag=5, timeout=10)
        b.send(a.address, b"warm", tag=6).wait(10)  # a accepts b's link
        a.recv(tag=6, timeout=10)
        seen = _pumps(monkeypatch, a)
        me = threading.current_thread().name
        runs = []
        for _ in range(3):
            seen.clear()
            th = _echo(b, a, ECHOES)
            for i in range(ECHOES):
                a.send(b.address, b"%d" % i, tag=5).wait(10)
                assert a.recv(tag=6, timeout=10).data == b"%d" % i
            th.join(30)
            shares = {role: (seen.count(f"{role} {me}"), sum(s.startswith(role) for s in seen))
                      for role in ("dial", "accept")}
            runs.append(shares)
            if all(mine >= 0.85 * total for mine, total in shares.values()):
                return
        raise AssertionError(f"the caller read (its batches, all) on each link: {runs}")


def test_a_hold_on_the_links_ends_without_the_caller(monkeypatch) -> None:
    """After a request/response loop the caller keeps the links for a moment; if it does not
    come back, the receive threads must read what comes: a peer's write with an immediate,
    which nobody here waits for, lands and is acknowledged (the peer's wait ends), and a
    message waits in the inbox. A hold that never ended would leave both unread for good."""
    a, b = _pair()
    with a, b:
        region = a.register(np.zeros(4096, np.uint8))
        a.send(b.address, b"warm", tag=5).wait(10)
        b.recv(tag=5, timeout=10)
        b.send(a.address, b"warm", tag=6).wait(10)
        a.recv(tag=6, timeout=10)
        poller = a._tcp.poller
        assert poller is not None and len(poller.conns) == 1  # the link b dialled

        def echo() -> None:
            while True:
                msg = b.recv(tag=5, timeout=30)
                b.send(a.address, msg.data, tag=6).wait(30)
                if msg.data == b"last":
                    return

        th = threading.Thread(target=echo, name="echo")
        th.start()
        deadline = time.monotonic() + 20
        while not poller._sentry:  # its receive thread parks (its poll ends within 1 s)
            a.send(b.address, b"x", tag=5).wait(10)
            a.recv(tag=6, timeout=10)
            assert time.monotonic() < deadline, "the receive thread never parked"
        a.send(b.address, b"last", tag=5).wait(10)
        a.recv(tag=6, timeout=10)
        th.join(30)
        # the caller is gone: no wait of a's from here on until the message is checked
        b.write(np.full(4096, 3, np.uint8), region.descriptor(), imm=9).wait(10)
        assert (region.array == 3).all()
        b.send(a.address, b"later", tag=7).wait(10)
        deadline = time.monotonic() + 10
        while not a._inbox.get(7):
            assert time.monotonic() < deadline, "the message was never read"
            time.sleep(0.01)
        assert a.recv(tag=7, timeout=1).data == b"later"


def test_a_waiter_that_cannot_read_for_itself_ends_a_hold() -> None:
    """A thread blocked on a transfer it cannot poll for (a group of ops) while another
    thread keeps the links between its waits: no hold may begin while it waits, and one
    under way ends when it starts waiting (the receive threads read its frames)."""
    a, b = _pair()
    with a, b:
        region = b.register(np.zeros(1 << 16, np.uint8))
        a.write(np.ones(16, np.uint8), region.descriptor()).wait(10)
        poller = a._tcp.poller
        assert poller is not None
        poller._due = time.monotonic() + 3600  # a hold under way that would never end
        group = gather([a.write(np.full(1 << 15, 2, np.uint8), region.descriptor(),
                                dst_offset=i << 15) for i in range(2)])
        group.wait(10)
        assert poller._due == 0.0
        assert (region.array == 2).all()
