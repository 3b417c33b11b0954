"""Races the engine must win: concurrent first contact, replies at close, finished transfers."""

from __future__ import annotations

import gc
import threading
import weakref

import numpy as np

import tensorfabric as tf


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
        gc.collect()
        assert ref() is None, "the engine keeps a finished transfer until its deadline"


def test_immediate_counters_do_not_grow_per_value() -> None:
    with tf.Engine("s") as a, tf.Engine("s") as b:
        region = b.register(np.zeros(16, np.uint8))
        for imm in range(1000, 1200):  # e.g. one immediate per request
            a.write(b"x", region.descriptor(), imm=imm).wait(10)
            b.expect(imm).wait(10)
        assert b.stats()["imm"] == {}
