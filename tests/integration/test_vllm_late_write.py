"""A decode-side KV load that gives up must not hand its blocks back to vLLM while the
prefill instance can still write into them: a real prefill worker in its own process,
stalled (SIGSTOP) after the pull was sent and resumed after the decode side's timeout, whose
write then lands late. vLLM reuses blocks reported as failed at once (here: a marker written
into them), so a late write there would corrupt another request's KV."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from conftest import subprocess_env  # noqa: E402
from helpers.vllm_kv import side, wait_recv  # noqa: E402

PRODUCER = Path(__file__).resolve().parent.parent / "helpers" / "vllm_kv.py"
MARKER = -3.0   # what "another request" writes into blocks vLLM got back


def test_a_pull_that_timed_out_keeps_its_blocks_until_no_write_can_land() -> None:
    # shared memory: the prefill process copies straight into the decode side's KV buffer,
    # so nothing on the decode side can stop a late write but the protocol
    transports = "shm,tcp"
    proc = subprocess.Popen([sys.executable, str(PRODUCER), "--transports", transports],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=subprocess_env())
    d = None
    try:
        assert proc.stdout is not None
        params: dict[str, Any] = json.loads(proc.stdout.readline())
        d, dc = side("kv_consumer", transports=transports.split(","), timeout=1.0,
                     heartbeat_s=0.3)
        d.load("warm", [6], 0, params["warm"])   # the engines' links are up
        assert wait_recv(d)[0] == {"warm"}
        os.kill(proc.pid, signal.SIGSTOP)   # stalled: neither answers nor writes
        t0 = time.monotonic()
        d.load("late", [4, 5], 0, params["late"])
        done: set[str] = set()
        failed: set[str] = set()
        reported_at = resumed_at = None
        while time.monotonic() - t0 < 20 and not (done or failed):
            if resumed_at is None and time.monotonic() - t0 > 2.5:   # past timeout=1 s
                os.kill(proc.pid, signal.SIGCONT)   # it serves the pull now: a late write
                resumed_at = time.monotonic()
            a, f, bad = d.finished_recving()
            done |= a - f
            failed |= f
            if f:
                for t in dc.values():   # vLLM gave the blocks to another request
                    t[sorted(bad)].fill_(MARKER)
            if a and reported_at is None:
                reported_at = time.monotonic()
            time.sleep(0.02)
        if resumed_at is None:
            os.kill(proc.pid, signal.SIGCONT)
            resumed_at = time.monotonic()
        assert done or failed, "the load was never reported"
        # a load reported done has its KV (its immediate came after the last byte); one
        # reported failed while the prefill was stalled handed vLLM blocks it could still write
        assert reported_at is not None and (done or reported_at >= resumed_at), \
            "the blocks went back to vLLM while the stalled prefill could still write them"
        time.sleep(1.0)   # anything still on its way lands now
        for t in dc.values():
            want = 7.0 if done else MARKER
            assert bool((t[4:6] == want).all()), f"{'loaded' if done else 'failed'} load: " \
                f"blocks hold {t[4:6].unique().tolist()}"
    finally:
        if d is not None:
            d.close()
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(10)
