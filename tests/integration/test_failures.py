"""Peers that die, links that break, and clean teardown."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time

import numpy as np
import pytest
from helpers.procs import PeerProcess

import tensorfabric as tf

SECRET = "peer-secret"


def test_peer_sigkilled_mid_transfer_fails_promptly() -> None:
    n = 512 << 20
    with tf.Engine(SECRET, transports=("tcp",)) as eng, PeerProcess(n) as child:
        eng.write(b"warm", child.desc).wait(30)  # connected
        src = np.ones(n, np.uint8)
        t = eng.write(src, child.desc, timeout=120)
        time.sleep(0.05)
        os.kill(child.proc.pid, signal.SIGKILL)
        child.proc.wait(10)
        t0 = time.monotonic()
        with pytest.raises(tf.BrokenError) as info:
            t.wait(60)
        assert time.monotonic() - t0 < 10, "a dead peer must fail transfers in seconds"
        assert info.value.peer is not None
        # new ops to the dead peer fail at once, and the engine keeps serving others
        with pytest.raises(tf.BrokenError):
            eng.write(b"x", child.desc, timeout=30).wait()
        with tf.Engine(SECRET) as other:
            region = other.register(np.zeros(4, np.uint8))
            eng.write(b"live", region.descriptor()).wait(10)
            assert bytes(region.array) == b"live"


def test_link_reset_mid_transfer_is_resent_on_other_links() -> None:
    n = 256 << 20
    with tf.Engine(SECRET, transports=("tcp",), links=3, chunk_bytes=1 << 20) as a, \
            tf.Engine(SECRET, transports=("tcp",)) as b:
        dst = b.register(np.zeros(n, np.uint8))
        src = np.random.default_rng(3).integers(0, 256, n, dtype=np.uint8)
        a.write(b"warm", dst.descriptor()).wait(10)
        links = a._tcp.peer_links(a._peer(b.address))
        deadline = time.monotonic() + 10
        while len(links.live()) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(links.live()) == 3
        t = a.write(src, dst.descriptor(), imm=8, timeout=120)
        victim = links.live()[1]

        def cut() -> None:
            end = time.monotonic() + 30
            while not victim.inflight and time.monotonic() < end:
                time.sleep(0.0005)
            victim.sock.shutdown(2)  # a reset while the link has chunks in flight

        threading.Thread(target=cut).start()
        t.wait(120)
        assert links.failures >= 1 and links.requeued >= 1, "the cut must hit chunks in flight"
        b.expect(8).wait(10)
        with pytest.raises(tf.TransferTimeout):
            b.expect(8, timeout=0.3).wait()  # counted exactly once
        assert np.array_equal(dst.array, src)
        # the link comes back
        deadline = time.monotonic() + 10
        while len(links.live()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(links.live()) == 3


def test_stopped_peer_is_waited_for_not_cut_off() -> None:
    """A peer process that does not read (stopped here; starved on a loaded machine alike)
    still has its kernel acknowledge: its link must stay up, not be closed as stalled after
    ``link_timeout`` and its chunks resent (the 3 s false positive under load)."""
    n = 128 << 20
    with tf.Engine(SECRET, transports=("tcp",), link_timeout=0.5) as a, PeerProcess(n) as child:
        a.write(b"warm", child.desc).wait(30)
        links = a._tcp.peer_links(a._peer(child.address))
        src = np.random.default_rng(5).integers(0, 256, n, dtype=np.uint8)
        os.kill(child.proc.pid, signal.SIGSTOP)
        try:
            t = a.write(src, child.desc, timeout=120)
            time.sleep(3.0)  # six link timeouts without a byte read
            assert not t.done(), "the write must still be in flight while the peer is stopped"
            assert links.failures == 0 and links.live(), "a slow peer's link was closed"
        finally:
            os.kill(child.proc.pid, signal.SIGCONT)
        t.wait(120)
        assert links.failures == 0
        assert child.call(cmd="sha", n=n)["sha"] == hashlib.sha256(src).hexdigest()


def _shm_files() -> set[str]:
    """/dev/shm's files, less Python multiprocessing's own (``psm_*`` segments, ``sem.*``
    semaphores) that other processes on the machine (vLLM, the other test worker) come and go
    with: tensorfabric's regions are memfds and never create either."""
    return {n for n in os.listdir("/dev/shm") if not n.startswith(("psm_", "sem."))}


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_close_releases_threads_sockets_and_memory() -> None:
    shm_before = _shm_files()
    threads_before = threading.active_count()
    fds_before = _fds()
    for _ in range(3):
        with tf.Engine(SECRET, links=2) as a, tf.Engine(SECRET) as b:
            r = b.alloc(1 << 20)
            a.write(np.ones(1 << 20, np.uint8), r.descriptor()).wait(10)
            a.write(b"x", b.register(bytearray(4)).descriptor()).wait(10)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (threading.active_count() > threads_before
                                           or _fds() > fds_before):
        time.sleep(0.05)
    assert threading.active_count() <= threads_before
    assert _fds() <= fds_before
    assert _shm_files() == shm_before


def test_sigkilled_owner_leaks_no_shared_memory() -> None:
    shm_before = _shm_files()
    with tf.Engine(SECRET) as eng:
        child = PeerProcess(64 << 20, shm=True)
        eng.write(np.ones(64 << 20, np.uint8), child.desc).wait(30)
        os.kill(child.proc.pid, signal.SIGKILL)
        child.proc.wait(10)
    assert _shm_files() == shm_before
