"""What a vLLM server costs to start on CPU, with its model worker in a process of its own
(vLLM's CPU default) or inside the engine-core process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
what ``VllmServer`` and the vLLM tiers now set), and what it then serves; same run, same model.

Per mode and repetition: wall time to ready, CPU seconds of the server's processes until
ready (API server, engine core, worker: every byte of vLLM and torch is imported once per
process), decode tokens/s of one greedy stream (64 tokens) and of 8 at once, and the greedy
token ids (both modes must give the same). Modes alternate so that a machine's drift hits both.

    PYTHONPATH=src python bench/vllm_start.py [--reps 2] [--cpus 0] [--out results.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from tensorfabric.vllm._launch import VllmServer  # noqa: E402
from tensorfabric.vllm._model import hf_folder  # noqa: E402

MODES = {"worker process": "1", "in-process worker": "0"}
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and every live descendant (and the children
    they already reaped)."""
    total = 0.0
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return total


def complete(url: str, max_tokens: int) -> list[int]:
    body = {"model": "default", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return list(json.loads(r.read())["choices"][0]["token_ids"])


def one(mode: str, cpus: str | None, tokens: int) -> dict[str, Any]:
    server = VllmServer(hf_folder(), cpus=cpus, kv_space_gib=1,
                        env={"VLLM_ENABLE_V1_MULTIPROCESSING": MODES[mode]})
    t0 = time.monotonic()
    server.start()
    assert server.proc is not None
    try:
        server.wait_ready(900)
        ready_s = time.monotonic() - t0
        cpu_s = tree_cpu(server.proc.pid)
        nprocs = 1 + len(psutil.Process(server.proc.pid).children(recursive=True))
        complete(server.url, 4)  # warm
        t1 = time.monotonic()
        ids = complete(server.url, tokens)
        one_tps = len(ids) / (time.monotonic() - t1)
        t2 = time.monotonic()
        with cf.ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda _: complete(server.url, tokens), range(8)))
        eight_tps = sum(len(o) for o in outs) / (time.monotonic() - t2)
    finally:
        server.stop(grace=10)
    return {"mode": mode, "ready_s": ready_s, "start_cpu_s": cpu_s, "processes": nprocs,
            "one_stream_tok_s": one_tps, "eight_streams_tok_s": eight_tps, "ids": ids}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--cpus", default="0", help="VLLM_CPU_OMP_THREADS_BIND (one core, as the tests)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    runs = []
    for rep in range(args.reps):
        order = list(MODES) if rep % 2 == 0 else list(reversed(MODES))
        for mode in order:
            r = one(mode, args.cpus, args.tokens)
            runs.append(r)
            print(f"{mode:18s} ready {r['ready_s']:6.1f} s  start CPU {r['start_cpu_s']:6.1f} s  "
                  f"{r['processes']} processes  1 stream {r['one_stream_tok_s']:5.1f} tok/s  "
                  f"8 streams {r['eight_streams_tok_s']:5.1f} tok/s", flush=True)
    summary: dict[str, Any] = {}
    for mode in MODES:
        rs = [r for r in runs if r["mode"] == mode]
        summary[mode] = {k: statistics.median(r[k] for r in rs)
                         for k in ("ready_s", "start_cpu_s", "one_stream_tok_s", "eight_streams_tok_s")}
    base, new = summary["worker process"], summary["in-process worker"]
    same = len({tuple(r["ids"]) for r in runs}) == 1
    print(f"\nin-process / worker process (medians): start CPU {new['start_cpu_s'] / base['start_cpu_s']:.2f}, "
          f"ready {new['ready_s'] / base['ready_s']:.2f}, 1 stream {new['one_stream_tok_s'] / base['one_stream_tok_s']:.2f}, "
          f"8 streams {new['eight_streams_tok_s'] / base['eight_streams_tok_s']:.2f}; "
          f"greedy tokens identical in every run: {same}")
    if args.out:
        args.out.write_text(json.dumps({"runs": runs, "summary": summary, "same_tokens": same}, indent=1))


if __name__ == "__main__":
    main()
