"""Multi-link transfers between two engines over emulated links (network namespaces).

The peer (``python -m tensorfabric.bench._peer --link-addrs B0,B1,...``) runs in namespace b;
:func:`drive` runs in namespace a (``python -m tensorfabric.bench._multilink``), writes
``nbytes`` of a random pattern into the peer's region with one striped ``write`` carrying an
immediate, and reports the time, the peer's CRC of what landed and whether the immediate was
counted exactly once. One JSON line per transfer goes to stdout; a line ``STARTED <i>`` is
printed as each timed transfer begins, so a test can take a link down in the middle of it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from typing import Any

import numpy as np

from ._engine import engine_from_options

IMM_BASE = 0x4D4C0000


def drive(peer: bytes, link_addrs: list[str], nbytes: int, reps: int = 1,
          timeout: float = 60.0, warmup: int = 8 << 20,
          link_timeout: float | None = None) -> list[dict[str, Any]]:
    """Time ``reps`` writes of ``nbytes`` to ``peer`` over ``len(link_addrs)`` links."""
    from ._runner import BenchConfig, Session

    eng = engine_from_options(host=link_addrs[0], links=len(link_addrs), link_addrs=link_addrs,
                              name="multilink", timeout=timeout, link_timeout=link_timeout)
    out = []
    with eng:
        s = Session(eng, peer, BenchConfig(timeout=timeout), "tcp")
        rid, desc = s.remote_region(nbytes)
        src = eng.register(np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8))
        want = zlib.crc32(memoryview(src.array))
        # Warm up: opens every link and lets TCP leave slow start before the clock starts.
        eng.write(src, desc, nbytes=min(warmup, nbytes)).wait(timeout)
        for i in range(reps):
            imm = IMM_BASE + i
            s.ctrl("expect", wait=False, imm=imm, count=1, timeout=timeout)
            print(f"STARTED {i}", flush=True)
            t0 = time.perf_counter()
            eng.write(src, desc, nbytes=nbytes, imm=imm).wait(timeout)
            secs = time.perf_counter() - t0
            counted = s.reply()["done"]
            # A second count of the same immediate would mean a resent chunk counted twice.
            extra = s.ctrl("expect", imm=imm, count=1, timeout=0.5)["done"]
            crc = s.ctrl("checksum", id=rid, offset=0, nbytes=nbytes)["crc32"]
            out.append({"rep": i, "nbytes": nbytes, "seconds": secs,
                        "bytes_per_s": nbytes / secs, "crc_ok": crc == want,
                        "imm_counted": counted, "imm_extra": extra,
                        "links": len(link_addrs)})
            print(json.dumps(out[-1]), flush=True)
        s.ctrl("free", id=rid)
        s.ctrl("quit")
    return out


def run_over_netns(net: Any, nbytes: int, reps: int = 1, links: list[int] | None = None,
                   on_started: Any = None, timeout: float = 60.0,
                   env: dict[str, str] | None = None,
                   link_timeout: float | None = None) -> list[dict[str, Any]]:
    """Peer in namespace b, :func:`drive` in namespace a, over the links of ``net``
    (a :class:`tensorfabric.testing.netns.NetnsLinks`; ``links`` picks some by index).

    ``on_started(rep)`` is called as each timed transfer begins (from this process).
    """
    import subprocess
    import tempfile

    from ._peer import ADDRESS_LINE

    chosen = [net.links[i] for i in (links if links is not None else range(len(net.links)))]
    peer = net.popen("b", [sys.executable, "-c", "from tensorfabric.bench._peer import main; main()",
                           "--host", chosen[0].addr_b, "--links", str(len(chosen)),
                           "--link-addrs", ",".join(link.addr_b for link in chosen),
                           "--idle-timeout", str(timeout),
                           "--link-timeout", str(link_timeout or 0)],
                     stdout=subprocess.PIPE, text=True, env=env)
    assert peer.stdout is not None
    line = peer.stdout.readline().split()
    if len(line) != 2 or line[0] != ADDRESS_LINE:
        raise RuntimeError(f"multilink peer failed to start (exit {peer.wait(10)})")
    errors = tempfile.TemporaryFile(mode="w+")
    driver = net.popen("a", [sys.executable, "-c", "from tensorfabric.bench._multilink import main; main()",
                             "--peer", line[1], "--nbytes", str(nbytes), "--reps", str(reps),
                             "--timeout", str(timeout), "--link-timeout", str(link_timeout or 0),
                             "--link-addrs", ",".join(link.addr_a for link in chosen)],
                       stdout=subprocess.PIPE, stderr=errors, text=True, env=env)
    assert driver.stdout is not None
    results = []
    for text in driver.stdout:
        if text.startswith("STARTED") and on_started is not None:
            on_started(int(text.split()[1]))
        elif text.startswith("{"):
            results.append(json.loads(text))
    rc, hung = _reap(driver, timeout), []
    if rc is None:
        hung.append("the driver")
    if _reap(peer, timeout) is None:
        hung.append("the peer")  # it serves until told to quit, or idle for ``timeout``
    errors.seek(0)
    err_text = errors.read()[-3000:]
    errors.close()
    if rc != 0 or len(results) != reps or hung:
        stuck = f"; {' and '.join(hung)} did not exit within {timeout} s (killed)" if hung else ""
        raise RuntimeError(f"multilink driver exited {rc} after {len(results)} of {reps} "
                           f"transfers{stuck}; the driver's stderr:\n{err_text}")
    return results


def _reap(proc: Any, timeout: float) -> int | None:
    """``proc``'s exit status, or None if it ran past ``timeout`` (it is killed then)."""
    import subprocess

    try:
        return int(proc.wait(timeout))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tensorfabric.bench._multilink")
    parser.add_argument("--peer", required=True, help="the peer engine's address (hex)")
    parser.add_argument("--link-addrs", required=True, help="local link addresses, comma list")
    parser.add_argument("--nbytes", type=int, required=True)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--link-timeout", type=float, default=0.0)
    args = parser.parse_args(argv)
    if os.environ.get("TENSORFABRIC_BENCH_LOG"):
        import logging

        logging.basicConfig(level=os.environ["TENSORFABRIC_BENCH_LOG"].upper(),
                            format="driver %(asctime)s %(name)s %(message)s")
    drive(bytes.fromhex(args.peer), args.link_addrs.split(","), args.nbytes, args.reps,
          args.timeout, link_timeout=args.link_timeout or None)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
