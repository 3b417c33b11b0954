"""Races the engine must win: concurrent first contact, replies at close, finished transfers,
callers reading their own replies beside the receive thread."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import numpy as np
import pytest

import tensorfabric as tf
from tensorfabric import _compiled


def test_concurrent_first_sends_share_one_link_and_deliver_once() -> None:
    for _ in range(5):
        with tf.Engine("s", transports=("tcp",)) as a, tf.Engine("s", transports=("tcp",)) as b:
            start = threading.Barrier(8)

            def go(i: int) -> None:
                start.wait()
                a.send(b.address, b"m%d" % i, tag=2).wait(10)

            threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            got = sorted(b.recv(tag=2, timeout=5).data for _ in range(8))
            assert got == sorted(b"m%d" % i for i in range(8))
            links = a._tcp.peer_links(a._peer(b.address))
            assert links.failures == 0, "a first link was replaced while in use"
            try:
                extra = b.recv(tag=2, timeout=0.2)
            except tf.TransferTimeout:
                extra = None
            assert extra is None, f"message delivered twice: {extra}"


def test_reply_then_close_still_acknowledges() -> None:
    for _ in range(10):
        a = tf.Engine("s", transports=("tcp",))
        b = tf.Engine("s", transports=("tcp",))
        try:
            t = a.send(b.address, b"last words", tag=1)
            assert b.recv(tag=1, timeout=10).data == b"last words"
            b.close()  # queued acknowledgements go out before the sockets close
            t.wait(10)
        finally:
            a.close()
            b.close()


def test_finished_transfers_are_not_kept_alive() -> None:
    with tf.Engine("s") as a, tf.Engine("s") as b:
        region = b.register(np.zeros(16, np.uint8))
        t = a.write(b"x", region.descriptor(), timeout=600)
        t.wait(10)
        ref = weakref.ref(t)
        del t
        # the thread that completed it may still be on its way out of the completion (its
        # frames hold the transfer for a moment after the waiter is let go): give it time,
        # far less than the 600 s deadline the engine must not keep it for
        deadline = time.monotonic() + 20
        while True:
            gc.collect()
            if ref() is None or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert ref() is None, "the engine keeps a finished transfer until its deadline"


def test_immediate_counters_do_not_grow_per_value() -> None:
    with tf.Engine("s") as a, tf.Engine("s") as b:
        region = b.register(np.zeros(16, np.uint8))
        for imm in range(1000, 1200):  # e.g. one immediate per request
            a.write(b"x", region.descriptor(), imm=imm).wait(10)
            b.expect(imm).wait(10)
        assert b.stats()["imm"] == {}


def test_callers_reading_their_replies_share_the_link_with_the_receive_thread() -> None:
    """Waiters read their own acknowledgements (the small-op path) while other ops on the same
    link complete only through callbacks (the receive thread): every op completes once, with
    its bytes in place, however the two kinds interleave."""
    with tf.Engine("s", transports=("tcp",)) as a, tf.Engine("s", transports=("tcp",)) as b:
        dst = b.register(np.zeros(64 * 4096, np.uint8))
        desc = dst.descriptor()
        src = np.arange(64 * 4096, dtype=np.uint64).astype(np.uint8)
        done = threading.Semaphore(0)

        def waiter(i: int) -> None:
            for k in range(20):
                off = ((i * 20 + k) % 64) * 4096
                a.write(src, desc, src_offset=off, dst_offset=off, nbytes=4096).wait(20)

        def unwatched() -> None:
            for k in range(40):
                off = (k % 64) * 4096
                t = a.write(src, desc, src_offset=off, dst_offset=off, nbytes=4096)
                t.add_done_callback(lambda t: done.release() if t.exception() is None else None)

        threads = [threading.Thread(target=waiter, args=(i,)) for i in range(4)]
        threads.append(threading.Thread(target=unwatched))
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(done.acquire(timeout=20) for _ in range(40))
        assert bytes(dst.array) == src.tobytes()
        assert a._tcp.peer_links(a._peer(b.address)).failures == 0


def test_a_caller_reading_its_reply_keeps_its_timeout_and_cancel(monkeypatch) -> None:
    """A waiter reading the link itself still times out and can be cancelled while the peer
    holds its acknowledgement; the late acknowledgement then completes the next wait. (The
    fault is injected in the owner's Python check, so the owner's compiled loop, which takes
    small writes without it, is off here.)"""
    monkeypatch.setattr(_compiled, "native", None)
    with tf.Engine("s", transports=("tcp",)) as a, tf.Engine("s", transports=("tcp",)) as b:
        desc = b.register(np.zeros(4096, np.uint8)).descriptor()
        a.write(b"warm", desc).wait(10)  # the link is up and idle
        hold = threading.Event()
        resolve = b.resolve

        def slow_resolve(*args):  # fault injector: the owner sits on the frame it checks
            hold.wait(30)
            return resolve(*args)

        b.resolve = slow_resolve
        try:
            t = a.write(b"late", desc)
            assert t._reader is not None  # sent inline: its waiter reads the link itself
            with pytest.raises(tf.TransferTimeout):
                t.wait(0.3)
            cancelled = a.write(b"gone", desc, dst_offset=8)
            assert cancelled.cancel() and cancelled.cancelled()
        finally:
            hold.set()
        t.wait(10)  # the acknowledgement that came late completes it
        a.write(b"next", desc, dst_offset=16).wait(10)
