"""The connector's worker halves without vLLM: KV buffers shaped like vLLM's CPU cache
(layers as views of one buffer), grants, and a prefill side in its own process.

As a program (``python tests/helpers/vllm_kv.py --transports shm,tcp``) it is a prefill
worker that holds requests ``warm`` (block 3) and ``late`` (blocks 1 and 2), every value 7.0:
it prints their ``kv_transfer_params`` as one JSON line and serves pulls until stdin closes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from tensorfabric.vllm._settings import ConnectorSettings
from tensorfabric.vllm._tokens import grant
from tensorfabric.vllm._worker import WorkerSide

LAYERS, BLOCKS, SHAPE, BS = 4, 16, (3, 32, 64), 8   # small stand-in for [182, 3, 128, 128]


def kv_caches(buf: Any, blocks: int = BLOCKS) -> dict[str, Any]:
    """Per-layer views of one int8 buffer, as vllm.v1.worker.utils.allocate_kv_cache makes."""
    per = blocks * int(torch.tensor(SHAPE).prod()) * 4
    return {f"model.layers.{i}.self_attn.attn":
            buf[i * per:(i + 1) * per].view(torch.float32).view(blocks, *SHAPE)
            for i in range(LAYERS)}


def side(role: str, blocks: int = BLOCKS, **kw: Any) -> tuple[WorkerSide, dict[str, Any]]:
    s = ConnectorSettings.from_extra({"secret": "unit", "hold_s": 5, "timeout": 5,
                                      "heartbeat_s": 0.1, **kw})
    w = WorkerSide(s, BS, role)
    ctx = w.allocation_context()
    nbytes = LAYERS * blocks * int(torch.tensor(SHAPE).prod()) * 4
    if ctx is None:
        buf = torch.zeros(nbytes, dtype=torch.int8)
    else:
        with ctx:
            buf = torch.zeros(nbytes, dtype=torch.int8)
    caches = kv_caches(buf, blocks)
    w.register(caches)
    return w, caches


def params_for(p: WorkerSide, req: str, blocks: list[int], tokens: int,
               expiry: float | None = None) -> dict[str, Any]:
    hs = p.handshake()
    expiry = round(time.time() + 5 if expiry is None else expiry, 3)
    p.hold({req: expiry})
    return {"do_remote_prefill": True, "remote_block_ids": blocks, "remote_num_tokens": tokens,
            "tf_engine": hs["address"], "tf_layout": hs["layout"],
            "tf_grant": {"req": req, "blocks": blocks, "expiry": expiry,
                         "token": grant(bytes.fromhex(hs["key"]), req, blocks, expiry)}}


def wait_recv(d: WorkerSide, timeout: float = 10) -> tuple[set[str], set[str], set[int]]:
    deadline = time.monotonic() + timeout
    done: set[str] = set()
    failed: set[str] = set()
    bad: set[int] = set()
    while time.monotonic() < deadline and not done:
        a, b, c = d.finished_recving()
        done |= a
        failed |= b
        bad |= c
        time.sleep(0.02)
    return done, failed, bad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--transports", default="shm,tcp")
    ap.add_argument("--secret", default="unit")
    ap.add_argument("--hold", type=float, default=20.0)
    args = ap.parse_args()
    p, pc = side("kv_producer", secret=args.secret, transports=args.transports.split(","),
                 hold_s=args.hold, heartbeat_s=0.3)
    for t in pc.values():
        t.fill_(7.0)
    expiry = time.time() + args.hold
    params = {"warm": params_for(p, "warm", [3], BS, expiry=expiry),
              "late": params_for(p, "late", [1, 2], 2 * BS, expiry=expiry)}
    print(json.dumps(params), flush=True)
    sys.stdin.read()   # serve pulls until the test closes our stdin
    p.close()


if __name__ == "__main__":
    main()
