"""A replica server process: ``python -m tensorfabric.weights.replica --publisher HEX ...``.

It joins a publisher, receives versions into its slots and answers JSON-line commands on stdin
(one reply line each on stdout). With ``--model-config`` it binds a transformers model to its
slots and can run forward passes on the version it serves; without it, it only holds the bytes.
Used by the integration tests, ``bench/weights_update.py`` and ``examples/weights_update.py``.

Commands: ``{"cmd": "version"}``, ``{"cmd": "wait", "version": v}``, ``{"cmd": "digest"}``,
``{"cmd": "logits", "ids": [...], "out": path}``, ``{"cmd": "loop", "ids": [...], "steps": n,
"out": dir}`` (greedy generations back to back, each under one lease, until ``{"cmd": "stop"}``;
``"until_version": v`` first waits for a run of version >= v),
``{"cmd": "exit"}``. Replies carry the served ``version``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np


def _model_factory(config_path: str, dtype: str) -> Any:
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_path)

    def factory() -> Any:
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))

    return factory


class _Loop:
    """Greedy generations back to back, each under one lease; records every step's logits."""

    def __init__(self, sub: Any, ids: list[int], steps: int, out: Path) -> None:
        self.sub, self.ids, self.steps, self.out = sub, ids, steps, out
        self.runs: list[list[Any]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import torch

        while not self.stop.is_set():
            with self.sub.acquire() as snap, torch.no_grad():
                ids = torch.tensor([self.ids])
                steps = []
                for _ in range(self.steps):
                    logits = snap.extra(ids).logits[0, -1].float()
                    steps.append(logits.numpy())
                    ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
                path = self.out / f"run{len(self.runs)}.npy"
                np.save(path, np.stack(steps))
                self.runs.append([snap.version, str(path)])


def _handle(sub: Any, cmd: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    name = cmd["cmd"]
    if name == "version":
        return {"version": sub.version, "rejected": sub.rejected}
    if name == "wait":
        return {"version": sub.wait_version(int(cmd["version"]), cmd.get("timeout"))}
    if name == "digest":
        with sub.acquire() as snap:
            arr = sub.slots.buffers[snap.slot][: sub.layout.nbytes]
            return {"version": snap.version, "crc": zlib.crc32(arr)}
    if name == "logits":
        import torch

        with sub.acquire() as snap, torch.no_grad():
            logits = snap.extra(torch.tensor([cmd["ids"]])).logits.float().numpy()
        np.save(cmd["out"], logits)
        return {"version": snap.version}
    if name == "loop":
        state["loop"] = _Loop(sub, cmd["ids"], int(cmd.get("steps", 3)), Path(cmd["out"]))
        return {"started": True}
    if name == "stop":  # optionally once a run of version >= until_version was recorded
        loop = state.pop("loop")
        deadline = time.monotonic() + float(cmd.get("timeout", 60))
        until = int(cmd.get("until_version", 0))
        while (not any(v >= until for v, _ in loop.runs) and loop.thread.is_alive()
               and time.monotonic() < deadline):
            time.sleep(0.05)
        loop.stop.set()
        loop.thread.join(timeout=60)
        return {"runs": loop.runs}
    raise ValueError(f"unknown command {name!r}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tensorfabric.weights.replica")
    p.add_argument("--publisher", required=True, help="publisher engine address, hex")
    p.add_argument("--layout", required=True, help="JSON file: the replica layout (Layout.to_json)")
    p.add_argument("--name", default=f"replica-{os.getpid()}")
    p.add_argument("--model-config", help="folder or config.json of a transformers model to bind")
    p.add_argument("--dtype", default="float32", help="model dtype when binding a model")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: reproducible logits)")
    p.add_argument("--engine", default="{}", help="JSON of extra tensorfabric.Engine keyword arguments")
    args = p.parse_args(argv)

    import tensorfabric as tf
    from tensorfabric.weights import Layout, Subscriber, bind_torch

    layout = Layout.from_json(json.loads(Path(args.layout).read_text()))
    bind = None
    if args.model_config:
        import torch

        torch.set_num_threads(args.threads)
        dtypes = {s.name: s.dtype for s in layout.specs}
        bind = bind_torch(_model_factory(args.model_config, args.dtype), dtypes)
    engine_kw = {"host": "127.0.0.1", "port": 0, "name": args.name, "timeout": args.timeout,
                 **json.loads(args.engine)}
    with tf.Engine(**engine_kw) as eng:
        sub = Subscriber(eng, bytes.fromhex(args.publisher), layout, name=args.name,
                         timeout=args.timeout, bind=bind)
        sub.wait_joined()
        print(json.dumps({"ready": True, "name": args.name}), flush=True)
        state: dict[str, Any] = {}
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["cmd"] == "exit":
                break
            try:
                reply = _handle(sub, cmd, state)
            except Exception as exc:  # report, keep serving
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(reply), flush=True)
        sub.close()


if __name__ == "__main__":
    main()
