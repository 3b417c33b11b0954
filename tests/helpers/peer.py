"""A tensorfabric peer in its own OS process, driven by JSON lines on stdin.

Started by tests as ``python tests/helpers/peer.py --size N [--shm] [--links K]``. It prints
``{"address": hex, "desc": hex}`` and then answers one JSON line per command:

- ``{"cmd": "write", "desc": hex, "seed": s, "n": n, "imm": i}``: write n seeded random bytes
  into a peer's region and wait; answers their sha256.
- ``{"cmd": "read", "desc": hex, "n": n}``: read n bytes of a peer's region; answers sha256.
- ``{"cmd": "sha", "n": n}``: sha256 of the first n bytes of our own region.
- ``{"cmd": "expect", "imm": i, "count": c}``: wait for immediates.
- ``{"cmd": "exit"}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import numpy as np

import tensorfabric as tf


def data(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--shm", action="store_true")
    ap.add_argument("--links", type=int, default=1)
    ap.add_argument("--secret", default="peer-secret")
    args = ap.parse_args()
    transports = ("shm", "tcp") if args.shm else ("tcp",)
    with tf.Engine(args.secret, transports=transports, links=args.links, name="child") as eng:
        region = eng.alloc(args.size) if args.shm else eng.register(np.zeros(args.size, np.uint8))
        print(json.dumps({"address": eng.address.hex(), "desc": region.descriptor().to_bytes().hex()}),
              flush=True)
        for line in sys.stdin:
            cmd = json.loads(line)
            op = cmd["cmd"]
            try:
                if op == "write":
                    payload = data(cmd["seed"], cmd["n"])
                    eng.write(payload, bytes.fromhex(cmd["desc"]), imm=cmd.get("imm"),
                              timeout=cmd.get("timeout", 60)).wait()
                    out = {"sha": hashlib.sha256(payload).hexdigest()}
                elif op == "read":
                    buf = np.zeros(cmd["n"], np.uint8)
                    eng.read(bytes.fromhex(cmd["desc"]), buf).wait()
                    out = {"sha": hashlib.sha256(buf).hexdigest()}
                elif op == "sha":
                    out = {"sha": hashlib.sha256(region.array[:cmd["n"]]).hexdigest()}
                elif op == "expect":
                    eng.expect(cmd["imm"], cmd.get("count", 1), timeout=cmd.get("timeout", 60)).wait()
                    out = {"ok": True}
                elif op == "exit":
                    print(json.dumps({"ok": True}), flush=True)
                    return
                else:
                    out = {"error": f"unknown command {op}"}
            except tf.TensorFabricError as exc:
                out = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
