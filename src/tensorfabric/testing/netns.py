"""Emulated networks from network namespaces: multi-NIC links between two hosts
(:class:`NetnsLinks`) and a switched fabric of many hosts (:class:`NetnsHosts`).

Real kernel interfaces, real TCP, real queueing: each link is a veth pair whose two ends live in
two private network namespaces (``a`` and ``b``), with a ``tc qdisc tbf`` on both ends that caps
its rate. Tests and benchmarks run engines inside the namespaces and can take a link down and up
while a transfer is running::

    from tensorfabric.testing.netns import LinkSpec, NetnsLinks, netns_unavailable_reason

    with NetnsLinks([LinkSpec("200mbit"), LinkSpec("600mbit")]) as net:
        server = net.popen("b", [sys.executable, "server.py", net.links[0].addr_b])
        net.run("a", ["ping", "-c1", net.links[1].addr_b])
        net.set_link(0, up=False)   # NIC 0 fails
        net.set_link(0, up=True)    # and comes back

:class:`NetnsHosts` is the other shape: ``n`` hosts, each one namespace with one NIC (a veth
capped by tbf in both directions: its upload and its download) plugged into a bridge in a
switch namespace, so every host reaches every other at its NIC's rate, as on a non-blocking
switch::

    with NetnsHosts(5, rate="2gbit") as fab:
        fab.popen(1, [sys.executable, "replica.py", fab.addr(1)])
        fab.run(0, [sys.executable, "trainer.py", fab.addr(0)])

Everything lives inside the namespaces (addresses in ``10.213.0.0/16`` by default, never
visible to the host); closing the context (also on an exception or Ctrl-C, and at interpreter
exit) kills the processes started here and deletes both namespaces, which deletes the veths.
Namespaces left behind by a process that died without cleaning up (SIGKILL) are removed the
next time a :class:`NetnsLinks` is built.

Needs root (CAP_NET_ADMIN) and iproute2 (``ip``, ``tc``); :func:`netns_unavailable_reason`
says why not, and :func:`skip_unless_netns` turns that into a pytest skip.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import shutil
import subprocess
import sys
import uuid
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Self

__all__ = [
    "Link",
    "LinkSpec",
    "NetnsError",
    "NetnsHosts",
    "NetnsLinks",
    "cleanup_stale",
    "measure_raw_throughput",
    "netns_unavailable_reason",
    "parse_rate",
    "skip_unless_netns",
]

PREFIX = "tfnet-"
_CLONE_NEWNET = 0x40000000
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)-([0-9a-f]+)-([a-z0-9]+)$")
_RATE_RE = re.compile(r"^\s*([0-9.]+)\s*([kmg]?)(bit|bps)?\s*$", re.IGNORECASE)
_live: weakref.WeakSet[_Namespaces] = weakref.WeakSet()


class NetnsError(RuntimeError):
    """Building, changing or tearing down the namespaces failed (the command's stderr inside)."""


def parse_rate(rate: str | float) -> float:
    """A tc-style rate (``"200mbit"``, ``"1gbit"``, ``"50mbps"``, or bits/s as a number) in bits/s.

    ``bit`` suffixes are bits per second; ``bps`` suffixes are bytes per second (tc's meaning).
    """
    if isinstance(rate, (int, float)):
        return float(rate)
    m = _RATE_RE.match(rate)
    if not m:
        raise ValueError(f"cannot parse rate {rate!r}: use e.g. '200mbit', '1gbit' or bits/s")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]
    return value * 8 if (m.group(3) or "").lower() == "bps" else value


@dataclass(frozen=True)
class LinkSpec:
    """One emulated link: a rate cap (tc syntax or bits/s), the tbf bucket and queue latency.

    ``burst`` defaults to 10 ms of the rate (at least 64 KiB, so GSO-sized packets pass
    unsplit); ``latency`` bounds how long a packet may wait in the tbf queue: 200 ms, so a
    receiver the scheduler leaves off-CPU for a while on a loaded machine costs queueing, not
    drops (at 50 ms a raw stream fell to 0.79 of the rate at load average 19 on 2 cores).
    """

    rate: str | float = "200mbit"
    burst: int | None = None
    latency: str = "200ms"

    @property
    def bits_per_s(self) -> float:
        return parse_rate(self.rate)

    @property
    def bytes_per_s(self) -> float:
        return self.bits_per_s / 8

    def burst_bytes(self) -> int:
        return self.burst if self.burst is not None else max(64 * 1024, int(self.bytes_per_s / 100))


@dataclass(frozen=True)
class Link:
    """A built link: device names and addresses on each side (same device name in both)."""

    index: int
    spec: LinkSpec
    dev: str
    addr_a: str
    addr_b: str
    prefix: int

    @property
    def bytes_per_s(self) -> float:
        return self.spec.bytes_per_s


def netns_unavailable_reason() -> str | None:
    """Why namespaces cannot be built here (None when they can)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "building network namespaces needs root (CAP_NET_ADMIN); run the netns tests as root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' not found: install iproute2 (apt-get install iproute2)"
    return None


def skip_unless_netns() -> None:
    """``pytest.skip`` with the reason when namespaces cannot be built here."""
    reason = netns_unavailable_reason()
    if reason is not None:
        import pytest

        pytest.skip(reason)


def _sh(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> list[str]:
    """Delete namespaces made by this module whose creating process is gone. Returns their names."""
    out = _sh(["ip", "netns", "list"], check=False).stdout
    removed = []
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _sh(["ip", "netns", "del", name], check=False)
            removed.append(name)
    return removed


class _Namespaces:
    """Namespaces made by this module (``self.ns``: key -> name), the processes started in
    them, and their teardown. Subclasses build the links."""

    ns: dict[str, str]

    def _make(self, keys: Sequence[str]) -> None:
        tag = uuid.uuid4().hex[:8]
        self.ns = {k: f"{PREFIX}{os.getpid()}-{tag}-{k}" for k in keys}
        self._procs: list[subprocess.Popen[Any]] = []
        self._closed = False
        cleanup_stale()
        _live.add(self)

    def _key(self, side: str | int) -> str:
        return side if isinstance(side, str) else f"h{side}"

    def _ip(self, side: str | int, *args: str) -> None:
        _sh(["ip", "-n", self.ns[self._key(side)], *args])

    def _tbf(self, side: str | int, dev: str, spec: LinkSpec) -> None:
        self.run(side, ["tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                        "rate", f"{int(spec.bits_per_s)}bit", "burst", str(spec.burst_bytes()),
                        "latency", spec.latency], check=True)

    # -- using ------------------------------------------------------------------------------
    def exec_argv(self, side: str | int, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs inside namespace ``side``."""
        return ["ip", "netns", "exec", self.ns[self._key(side)], *argv]

    def run(
        self, side: str | int, argv: Sequence[str], *, check: bool = True, timeout: float = 60,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion inside namespace ``side``; output captured as text."""
        proc = subprocess.run(self.exec_argv(side, argv), capture_output=True, text=True,
                              timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise NetnsError(f"{' '.join(argv)} in {side} failed ({proc.returncode}): "
                             f"{proc.stderr.strip()[-2000:]}")
        return proc

    def popen(self, side: str | int, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process inside namespace ``side``; it is killed when this object closes."""
        proc = subprocess.Popen(self.exec_argv(side, argv), **kwargs)
        self._procs.append(proc)
        return proc

    # -- teardown ---------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - unkillable child
                pass
        for name in self.ns.values():
            # Deleting a namespace deletes the veth ends inside it (and so both ends of a pair).
            _sh(["ip", "netns", "del", name], check=False)
        _live.discard(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - safety net
        try:
            self.close()
        except Exception:
            pass


class NetnsLinks(_Namespaces):
    """Two namespaces ``a`` and ``b`` joined by one veth pair per :class:`LinkSpec`.

    Link ``i`` is device ``tfl<i>`` on both sides with ``<base>.<i>.1`` (side a) and
    ``<base>.<i>.2`` (side b) in its own /24, so each link is its own subnet and a socket bound
    to a side-a address reaches the side-b address of the same link only through that veth.
    Use as a context manager; :meth:`close` is idempotent.
    """

    def __init__(
        self,
        links: Sequence[LinkSpec | str | float] | int = 2,
        *,
        rate: str | float = "200mbit",
        base: str = "10.213",
    ) -> None:
        reason = netns_unavailable_reason()
        if reason is not None:
            raise NetnsError(reason)
        if isinstance(links, int):
            specs = [LinkSpec(rate) for _ in range(links)]
        else:
            specs = [s if isinstance(s, LinkSpec) else LinkSpec(s) for s in links]
        if not 1 <= len(specs) <= 64:
            raise ValueError("between 1 and 64 links")
        self.links = [
            Link(i, spec, f"tfl{i}", f"{base}.{i}.1", f"{base}.{i}.2", 24)
            for i, spec in enumerate(specs)
        ]
        self._make("ab")
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- building ---------------------------------------------------------------------------
    def _build(self) -> None:
        for side in "ab":
            _sh(["ip", "netns", "add", self.ns[side]])
            self._ip(side, "link", "set", "lo", "up")
        for link in self.links:
            # Created directly inside the namespaces: nothing appears in the host namespace.
            _sh(["ip", "link", "add", "name", link.dev, "netns", self.ns["a"], "type", "veth",
                 "peer", "name", link.dev, "netns", self.ns["b"]])
            for side, addr in (("a", link.addr_a), ("b", link.addr_b)):
                self._ip(side, "addr", "add", f"{addr}/{link.prefix}", "dev", link.dev)
                self._ip(side, "link", "set", link.dev, "up")
                self._tbf(side, link.dev, link.spec)

    # -- using ------------------------------------------------------------------------------
    def set_link(self, index: int, up: bool, side: str = "a") -> None:
        """Take link ``index`` down or up (``ip link set dev ... down|up``) on one side.

        Bringing it back up re-applies nothing: addresses and the tbf qdisc survive a down/up.
        """
        self._ip(side, "link", "set", "dev", self.links[index].dev, "up" if up else "down")

    def set_rate(self, index: int, rate: str | float) -> None:
        """Change link ``index``'s rate cap on both sides while it runs."""
        old = self.links[index]
        spec = LinkSpec(rate, old.spec.burst, old.spec.latency)
        self.links[index] = Link(old.index, spec, old.dev, old.addr_a, old.addr_b, old.prefix)
        for side in "ab":
            self._tbf(side, self.links[index].dev, self.links[index].spec)

    @property
    def total_bytes_per_s(self) -> float:
        return sum(link.bytes_per_s for link in self.links)


class NetnsHosts(_Namespaces):
    """``n`` hosts on one switch: namespaces ``h0`` .. ``h<n-1>``, each with one NIC.

    Host ``i``'s NIC is device ``tfnic`` with address ``<base>.0.<i+1>/24``; its peer end is
    port ``tfp<i>`` of bridge ``tfbr`` in the switch namespace ``sw``. tbf caps both ends at the
    host's rate: the host-side end shapes what the host sends, the switch-side end what it
    receives, so each host has its own full-duplex NIC and the switch never is the bottleneck.
    ``rates`` gives each host its own rate (a slow consumer GPU box next to a data-centre one).
    Hosts and namespace keys are ints (``0`` is ``h0``); ``"sw"`` is the switch.
    """

    def __init__(self, n: int, *, rate: str | float = "1gbit",
                 rates: Sequence[LinkSpec | str | float] | None = None, base: str = "10.214") -> None:
        reason = netns_unavailable_reason()
        if reason is not None:
            raise NetnsError(reason)
        if not 2 <= n <= 200:
            raise ValueError("between 2 and 200 hosts")
        if rates is not None and len(rates) != n:
            raise ValueError(f"rates has {len(rates)} entries for {n} hosts")
        raw = list(rates) if rates is not None else [rate] * n
        self.specs = [s if isinstance(s, LinkSpec) else LinkSpec(s) for s in raw]
        self.base = base
        self._make([*(f"h{i}" for i in range(n)), "sw"])
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    @property
    def n(self) -> int:
        return len(self.specs)

    def addr(self, host: int) -> str:
        """Host ``host``'s NIC address."""
        if not 0 <= host < self.n:
            raise IndexError(f"no host {host}: hosts are 0..{self.n - 1}")
        return f"{self.base}.0.{host + 1}"

    def _build(self) -> None:
        for name in self.ns.values():
            _sh(["ip", "netns", "add", name])
        for key in self.ns:
            self._ip(key, "link", "set", "lo", "up")
        self._ip("sw", "link", "add", "tfbr", "type", "bridge")
        self._ip("sw", "link", "set", "tfbr", "up")
        for i, spec in enumerate(self.specs):
            port = f"tfp{i}"
            _sh(["ip", "link", "add", "name", "tfnic", "netns", self.ns[f"h{i}"], "type", "veth",
                 "peer", "name", port, "netns", self.ns["sw"]])
            self._ip("sw", "link", "set", port, "master", "tfbr")
            self._ip("sw", "link", "set", port, "up")
            self._ip(i, "addr", "add", f"{self.addr(i)}/24", "dev", "tfnic")
            self._ip(i, "link", "set", "tfnic", "up")
            self._tbf(i, "tfnic", spec)  # upload
            self._tbf("sw", port, spec)  # download

    @contextlib.contextmanager
    def inside(self, host: int) -> Iterator[None]:
        """Run the calling thread in host ``host``'s namespace for the ``with`` block.

        Sockets made in the block, and threads started in it (an Engine's), stay in that
        namespace for good; keep using such an Engine from inside the block, since a connection
        it opens lazily from a thread outside would be made in the host's root namespace.
        """
        libc = ctypes.CDLL(None, use_errno=True)
        here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        there = os.open(f"/run/netns/{self.ns[self._key(host)]}", os.O_RDONLY)
        try:
            if libc.setns(there, _CLONE_NEWNET) != 0:
                raise NetnsError(f"setns into {self.ns[self._key(host)]}: {os.strerror(ctypes.get_errno())}")
            try:
                yield
            finally:
                if libc.setns(here, _CLONE_NEWNET) != 0:  # pragma: no cover - cannot fail as root
                    raise NetnsError(f"setns back: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(here)
            os.close(there)

    def set_rate(self, host: int, rate: str | float) -> None:
        """Change host ``host``'s NIC rate (both directions) while it runs."""
        old = self.specs[host]
        self.specs[host] = spec = LinkSpec(rate, old.burst, old.latency)
        self._tbf(host, "tfnic", spec)
        self._tbf("sw", f"tfp{host}", spec)

    def nic_bytes(self, host: int) -> tuple[int, int]:
        """Bytes host ``host``'s NIC has sent and received so far (kernel counters)."""
        out = self.run(host, ["cat", "/sys/class/net/tfnic/statistics/tx_bytes",
                              "/sys/class/net/tfnic/statistics/rx_bytes"]).stdout.split()
        return int(out[0]), int(out[1])

    def set_link(self, host: int, up: bool) -> None:
        """Unplug (``up=False``) or plug back host ``host``'s NIC."""
        self._ip(host, "link", "set", "dev", "tfnic", "up" if up else "down")


@atexit.register
def _close_all() -> None:
    for net in list(_live):
        try:
            net.close()
        except Exception:  # pragma: no cover
            pass


_RAW_SERVER = r"""
import socket, sys, time
host, port, nbytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
srv = socket.create_server((host, port))
print("ready", flush=True)
conn, _ = srv.accept()
buf = bytearray(1 << 20); view = memoryview(buf); got = 0; t0 = None
while got < nbytes:
    n = conn.recv_into(view[: min(len(buf), nbytes - got)])
    if not n: break
    if t0 is None: t0 = time.perf_counter()
    got += n
t1 = time.perf_counter()
conn.sendall(b"k")
print(f"{got} {t1 - t0}", flush=True)
"""

_RAW_CLIENT = r"""
import socket, sys
host, port, nbytes, bind = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s = socket.create_connection((host, port), source_address=(bind, 0) if bind else None)
chunk = memoryview(bytes(1 << 20)); left = nbytes
while left:
    n = min(left, len(chunk)); s.sendall(chunk[:n]); left -= n
s.recv(1)
"""


def measure_raw_throughput(
    net: NetnsLinks, index: int, nbytes: int, port: int = 46000, timeout: float = 60
) -> float:
    """Raw Python TCP throughput (bytes/s) from side a to side b over link ``index``.

    One stream, 1 MiB ``sendall`` / ``recv_into``: the baseline the engine's multi-link
    figures are compared with. Timed at the receiver from its first byte to its last.
    """
    link = net.links[index]
    server = net.popen("b", [sys.executable, "-c", _RAW_SERVER, link.addr_b, str(port),
                             str(nbytes)], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    if server.stdout.readline().strip() != "ready":
        raise NetnsError("raw throughput server did not start")
    net.run("a", [sys.executable, "-c", _RAW_CLIENT, link.addr_b, str(port), str(nbytes),
                  link.addr_a], timeout=timeout)
    got, secs = server.stdout.readline().split()
    server.wait(timeout=timeout)
    if int(got) != nbytes:
        raise NetnsError(f"raw throughput: received {got} of {nbytes} bytes")
    return nbytes / float(secs)
