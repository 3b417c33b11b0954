"""Baselines measured in the same run as the engine: what this machine does without us.

- :class:`RawSocketPeer`: a raw Python socket pair on loopback (or any address) between this
  process and a child process: ``sendall`` of chunk-sized pieces on the sending side,
  ``recv_into`` straight into a pre-faulted buffer on the receiving side, the same chunking as
  the engine's tcp transport, one stream per link. Gives write (sink), read (source) and
  ping-pong (echo) figures.
- :func:`memcpy_seconds`: a single-threaded numpy copy into a pre-faulted buffer, the ceiling
  for a shared-memory write.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

from ._stats import MiB, Timing, repeat, window_for

_HDR = struct.Struct("!BQI")  # cmd, size, count
_SINK, _SOURCE, _ECHO, _QUIT = 1, 2, 3, 0


def _split(size: int, parts: int, chunk: int) -> list[tuple[int, int]]:
    """Contiguous (offset, length) per stream, chunk-aligned, as even as the chunks allow."""
    nchunks = max(1, -(-size // chunk))
    parts = max(1, min(parts, nchunks))
    per = -(-nchunks // parts)
    out = []
    for i in range(parts):
        start = i * per * chunk
        end = min(size, (i + 1) * per * chunk)
        if end > start:
            out.append((start, end - start))
    return out


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    while view:
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionError("raw baseline peer closed the connection")
        view = view[n:]


def _send_chunked(sock: socket.socket, view: memoryview, chunk: int) -> None:
    for off in range(0, len(view), chunk):
        sock.sendall(view[off:off + chunk])


def _recv_chunked(sock: socket.socket, view: memoryview, chunk: int) -> None:
    for off in range(0, len(view), chunk):
        _recv_exact(sock, view[off:off + chunk])


def _fan_out(socks: list[socket.socket], jobs: list[tuple[int, int]],
             work: Callable[[socket.socket, int, int], None]) -> None:
    """Run ``work(sock, off, n)`` per stream; inline when one stream does it all."""
    if len(jobs) == 1:
        work(socks[0], *jobs[0])
        return
    threads = [threading.Thread(target=work, args=(socks[i], off, n))
               for i, (off, n) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def child_env() -> dict[str, str]:
    """This environment with the directory holding this ``tensorfabric`` first on PYTHONPATH,
    so bench children import the same code as this process (a checkout or an install)."""
    import tensorfabric

    root = os.path.dirname(os.path.dirname(os.path.abspath(tensorfabric.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def pin_cpus(pin: str | None) -> tuple[set[int], set[int]] | None:
    """CPUs for (this process, the peer processes) under ``--pin``: ``same`` puts every
    process on the first CPU this process may use, ``split`` this one there and the peers on
    the second; None: no pinning.

    A wake-up that crosses to another CPU costs far more than one on the same CPU in a VM
    (here: a raw ping-pong took 15-19 us on one vCPU, 56-73 us across two), so latency ratios
    are only comparable under the same placement for engine and baseline.
    """
    if pin is None:
        return None
    if pin not in ("same", "split"):
        raise ValueError(f"unknown pin {pin!r}: use same or split")
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("--pin needs Linux (sched_setaffinity)")
    cpus = sorted(os.sched_getaffinity(0))
    if pin == "split" and len(cpus) < 2:
        raise ValueError("--pin split needs two CPUs")
    return {cpus[0]}, {cpus[0] if pin == "same" else cpus[1]}


def on_cpus(cpus: set[int] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that pins a child process to ``cpus`` (None: no pinning)."""
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


_SERVE_CMD = "from tensorfabric.bench._baselines import _serve_main; _serve_main()"


def _serve_main() -> None:
    """Child process entry (``python -c _SERVE_CMD HOST STREAMS BUFSIZE CHUNK``)."""
    host, streams, bufsize, chunk = sys.argv[1], *map(int, sys.argv[2:5])
    srv = socket.create_server((host, 0))
    print(srv.getsockname()[1], flush=True)
    _serve_socket(srv, streams, bufsize, chunk)


def _serve_socket(srv: socket.socket, streams: int, bufsize: int, chunk: int) -> None:
    """Accept ``streams`` connections on ``srv`` and answer baseline commands until quit."""
    srv.settimeout(60)
    socks = []
    for _ in range(streams):
        s, _ = srv.accept()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(s)
    srv.close()
    buf = np.ones(bufsize, dtype=np.uint8)  # pre-faulted: every page touched
    view = buf.data  # a writable memoryview of the array
    hdr = bytearray(_HDR.size)
    ctl = socks[0]
    while True:
        _recv_exact(ctl, memoryview(hdr))
        cmd, size, count = _HDR.unpack(hdr)
        if cmd == _QUIT:
            break
        if cmd == _SINK:
            for _ in range(count):
                _fan_out(socks, _split(size, streams, chunk),
                         lambda s, off, n: _recv_chunked(s, view[off:off + n], chunk))
            ctl.sendall(b"k")
        elif cmd == _SOURCE:
            _fan_out(socks, _split(size, streams, chunk),
                     lambda s, off, n: _send_chunked(s, view[off:off + n], chunk))
        elif cmd == _ECHO:
            for _ in range(count):
                _recv_exact(ctl, view[:size])
                ctl.sendall(view[:size])
    for s in socks:
        s.close()


class RawSocketPeer:
    """A child process holding ``streams`` raw TCP connections to this one.

    ``chunk`` is the size of each ``sendall`` / ``recv_into`` call (use the engine's chunk).
    """

    def __init__(self, streams: int = 1, bufsize: int = 256 * MiB, chunk: int = 1 * MiB,
                 host: str | list[str] = "127.0.0.1", port: int | None = None,
                 bind: list[str] | None = None, cpus: set[int] | None = None) -> None:
        """Spawn the far side locally, or connect to one already served at ``host:port``.

        ``host`` may list one remote address per link and ``bind`` one local address per link
        (stream ``i`` uses entry ``i % len``), like the engine's links.
        """
        hosts = [host] if isinstance(host, str) else list(host)
        self.streams, self.chunk = streams, chunk
        self._proc: subprocess.Popen[str] | None = None
        if port is None:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _SERVE_CMD, hosts[0], str(streams),
                 str(bufsize), str(chunk)], stdout=subprocess.PIPE, text=True, env=child_env(),
                preexec_fn=on_cpus(cpus))
            assert self._proc.stdout is not None
            line = self._proc.stdout.readline().strip()
            if not line.isdigit():
                self._proc.kill()
                raise RuntimeError(f"raw socket baseline peer failed (exit {self._proc.wait()})")
            port = int(line)
        self.socks = []
        for i in range(streams):
            src = (bind[i % len(bind)], 0) if bind else None
            s = socket.create_connection((hosts[i % len(hosts)], port), timeout=60,
                                         source_address=src)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.socks.append(s)
        self.buf = np.ones(bufsize, dtype=np.uint8)
        self.view = self.buf.data
        self._ack = bytearray(1)

    def _cmd(self, cmd: int, size: int, count: int = 1) -> None:
        self.socks[0].sendall(_HDR.pack(cmd, size, count))

    def write(self, size: int, count: int = 1) -> None:
        """Send ``count`` messages of ``size`` bytes; return once the peer has them all."""
        self._cmd(_SINK, size, count)
        chunk, view = self.chunk, self.view
        for _ in range(count):
            _fan_out(self.socks, _split(size, self.streams, chunk),
                     lambda s, off, n: _send_chunked(s, view[off:off + n], chunk))
        _recv_exact(self.socks[0], memoryview(self._ack))

    def read(self, size: int) -> None:
        """Have the peer send ``size`` bytes into this side's buffer."""
        self._cmd(_SOURCE, size)
        chunk, view = self.chunk, self.view
        _fan_out(self.socks, _split(size, self.streams, chunk),
                 lambda s, off, n: _recv_chunked(s, view[off:off + n], chunk))

    def echo(self, size: int, count: int = 1) -> list[float]:
        """``count`` round trips of ``size`` bytes (at least one) on the first stream.

        Returns each round trip's seconds. With ``count == 1`` the command header travels in
        the same ``sendall`` as the payload, so one round trip is one message each way.
        """
        size = max(1, size)
        sock, view, out = self.socks[0], self.view[:size], []
        if count == 1:
            t0 = time.perf_counter()
            sock.sendall(_HDR.pack(_ECHO, size, 1) + view)
            _recv_exact(sock, view)
            return [time.perf_counter() - t0]
        self._cmd(_ECHO, size, count)
        for _ in range(count):
            t0 = time.perf_counter()
            sock.sendall(view)
            _recv_exact(sock, view)
            out.append(time.perf_counter() - t0)
        return out

    def time_write(self, size: int, budget_s: float) -> Timing:
        lat = repeat(lambda: self.write(size), budget_s, 3, 2000)
        window = window_for(size)
        batches = (repeat(lambda: self.write(size, window), budget_s, 3, 2000)
                   if window > 1 else lat)
        return Timing(lat, window, batches)

    def time_read(self, size: int, budget_s: float) -> Timing:
        lat = repeat(lambda: self.read(size), budget_s, 3, 2000)
        return Timing(lat, 1, lat)

    def time_echo(self, size: int, budget_s: float) -> Timing:
        self.echo(size, 10)  # warm-up
        n = max(20, min(5000, int(budget_s / (30e-6 + 2 * size / 2e9))))
        lat = self.echo(size, n)
        return Timing(lat, 1, lat)

    def close(self) -> None:
        try:
            self._cmd(_QUIT, 0)
        except OSError:
            pass
        for s in self.socks:
            s.close()
        if self._proc is not None:
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> RawSocketPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def memcpy_timing(size: int, budget_s: float, dst: np.ndarray | None = None,
                  src: np.ndarray | None = None) -> Timing:
    """A single-threaded numpy copy of ``size`` bytes into a pre-faulted buffer."""
    if src is None:
        src = np.ones(size, dtype=np.uint8)
    if dst is None:
        dst = np.ones(size, dtype=np.uint8)
    s, d = src[:size], dst[:size]
    lat = repeat(lambda: np.copyto(d, s), budget_s, 3, 20000)
    return Timing(lat, 1, lat)
