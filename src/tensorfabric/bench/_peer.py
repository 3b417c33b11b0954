"""The far side of ``tensorfabric bench``: an engine that owns target regions and answers.

It runs in a child process (the default, two local engines in two processes) or on another
host (``tensorfabric bench --listen``). The driver controls it with small JSON messages over
the engine's own ``send`` / ``recv`` on :data:`CTRL_TAG`, so the same code runs over any
transport and across hosts::

    python -m tensorfabric.bench._peer --host 127.0.0.1 --links 2
    # prints "TFBENCH-ADDRESS <hex>" once listening
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any

import numpy as np

CTRL_TAG = 0x7B01
REPLY_TAG = 0x7B02
DATA_TAG = 0x7B03
ADDRESS_LINE = "TFBENCH-ADDRESS"


def proc_memory() -> dict[str, int]:
    """This process's resident set and its peak since the last :func:`reset_peak` (bytes)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:  # not Linux
        pass
    return out


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); a no-op elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def new_buffer(nbytes: int) -> np.ndarray:
    """A pre-faulted byte array (every page touched, so timing sees no page faults)."""
    return np.ones(nbytes, dtype=np.uint8)


class Peer:
    """Serves control commands until ``quit`` (or ``idle_timeout`` seconds without one)."""

    def __init__(self, engine: Any, idle_timeout: float = 600.0) -> None:
        self.engine = engine
        self.idle_timeout = idle_timeout
        self.regions: dict[int, Any] = {}
        self._next = 1

    def serve(self) -> None:
        import tensorfabric as tf

        while True:
            try:
                msg = self.engine.recv(tag=CTRL_TAG, timeout=self.idle_timeout)
            except tf.TransferTimeout:
                return
            cmd = json.loads(msg.data)
            try:
                reply = self.handle(cmd, msg.peer)
            except Exception as exc:  # report to the driver, keep serving
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            self.engine.send(msg.peer, json.dumps(reply).encode(), tag=REPLY_TAG).wait(30)
            if cmd["cmd"] == "quit":
                time.sleep(0.2)  # let acknowledgements still queued on the links go out
                return

    def handle(self, cmd: dict[str, Any], peer: bytes) -> dict[str, Any]:
        import tensorfabric as tf

        name = cmd["cmd"]
        eng = self.engine
        if name == "region":
            access = tf.Access.READ_WRITE
            if cmd.get("alloc"):
                region = eng.alloc(cmd["nbytes"], access=access)
                region.array[:] = 1  # pre-fault
            else:
                region = eng.register(new_buffer(cmd["nbytes"]), access=access)
            rid = self._next
            self._next += 1
            self.regions[rid] = region
            return {"id": rid, "desc": region.descriptor().to_bytes().hex()}
        if name == "free":
            eng.unregister(self.regions.pop(cmd["id"]))
            return {}
        if name == "checksum":
            import zlib

            region = self.regions[cmd["id"]]
            arr = np.frombuffer(memoryview(region.array), dtype=np.uint8)
            view = arr[cmd["offset"]:cmd["offset"] + cmd["nbytes"]]
            return {"crc32": zlib.crc32(memoryview(view))}
        if name == "imm_pong":
            timeout = cmd.get("timeout", 30.0)
            for _ in range(cmd["n"]):
                eng.expect(cmd["imm_in"], 1, timeout=timeout).wait(timeout)
                eng.barrier([peer], cmd["imm_out"]).wait(timeout)
            return {}
        if name == "echo":
            timeout = cmd.get("timeout", 30.0)
            for _ in range(cmd["n"]):
                m = eng.recv(tag=DATA_TAG, timeout=timeout)
                eng.send(m.peer, m.data, tag=DATA_TAG).wait(timeout)
            return {}
        if name == "expect":  # {"done": false} when fewer than count arrive within timeout
            try:
                eng.expect(cmd["imm"], cmd["count"], timeout=cmd["timeout"]).wait(cmd["timeout"])
            except tf.TransferTimeout:
                return {"done": False}
            return {"done": True}
        if name == "memory":
            mem = proc_memory()
            if cmd.get("reset"):
                reset_peak()
            return mem
        if name == "raw":
            return {"port": _start_raw(cmd)}
        if name == "quit":
            return {}
        raise ValueError(f"unknown bench command {name!r}")


def _start_raw(cmd: dict[str, Any]) -> int:
    """Serve a raw socket baseline (see ``_baselines``) from this process; returns its port."""
    import socket

    from ._baselines import _serve_socket

    srv = socket.create_server((cmd["host"], 0))
    port = int(srv.getsockname()[1])
    threading.Thread(target=_serve_socket, args=(srv, cmd["streams"], cmd["bufsize"],
                                                 cmd["chunk"]), daemon=True).start()
    return port


def main(argv: list[str] | None = None) -> None:
    from ._engine import engine_from_options

    parser = argparse.ArgumentParser(prog="python -m tensorfabric.bench._peer")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--transport", default="tcp")
    parser.add_argument("--links", type=int, default=1)
    parser.add_argument("--link-addrs", default="")
    parser.add_argument("--idle-timeout", type=float, default=600.0)
    parser.add_argument("--chunk-bytes", type=int, default=0)
    args = parser.parse_args(argv)
    if os.environ.get("TENSORFABRIC_BENCH_LOG"):
        import logging

        logging.basicConfig(level=os.environ["TENSORFABRIC_BENCH_LOG"].upper(),
                            format="peer %(asctime)s %(name)s %(message)s")
    engine = engine_from_options(
        host=args.host, port=args.port, transport=args.transport, links=args.links,
        link_addrs=[a for a in args.link_addrs.split(",") if a], name="bench-peer",
        chunk_bytes=args.chunk_bytes or None,
    )
    with engine:
        print(ADDRESS_LINE, engine.address.hex(), flush=True)
        Peer(engine, args.idle_timeout).serve()
    sys.stdout.flush()
    os._exit(0)  # don't wait on stray non-daemon threads at exit


if __name__ == "__main__":
    main()
