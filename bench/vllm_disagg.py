"""vLLM disaggregated prefill/decode over tensorfabric against single-instance vLLM, and
against vLLM's own ExampleConnector, on this machine, in one run.

    PYTHONPATH=src python bench/vllm_disagg.py [--modes single,tensorfabric,example] \
        [--concurrency 1,8,32] [--lengths 128,512,2048] [--max-tokens 16] [--json out.json]

Modes (each started, measured over the whole grid, and stopped before the next one):

* ``single``: one vLLM server, its worker bound to CPU 0, no connector (the baseline).
* ``tensorfabric``: a prefill server (CPU 0) and a decode server (CPU 1) with the
  tensorfabric connector (KV cache in the engine's shared memory, one write_pages per request)
  behind ``tensorfabric.vllm``'s proxy.
* ``example``: the same pair with vLLM's in-tree ``ExampleConnector`` (KV saved per layer to
  safetensors files under /dev/shm, read back by the decode server), behind the same proxy.

Every request has its own random prompt of exactly the given number of tokens (no prefix
cache hits) and asks for ``--max-tokens`` greedy tokens, streamed. TTFT is measured by the
client (request sent -> first streamed token); throughput is output tokens over the wall time
of the whole batch. For ``tensorfabric`` the connector's stats file gives the KV bytes moved
per request and the transfer time (decode server: pull sent -> last byte landed), reported
as a share of TTFT.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tensorfabric.vllm import kv_transfer_config
from tensorfabric.vllm._launch import VllmServer
from tensorfabric.vllm._model import hf_folder
from tensorfabric.vllm._proxy import DisaggProxy

MAX_LEN = 2304  # room for a 2048-token prompt and its answer
STORE_PREFIX = "tf-bench-kv-"   # ExampleConnector stores: /dev/shm/tf-bench-kv-<pid>-*
_stores: list[Path] = []


def example_store() -> Path:
    """A fresh ExampleConnector store under /dev/shm, removed when this program exits (normal
    exit, exception, SIGTERM, SIGINT); stores left by earlier runs that were SIGKILLed (their
    pid is gone) are removed first."""
    for old in Path("/dev/shm").glob(STORE_PREFIX + "*"):
        pid = old.name[len(STORE_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    store = Path(tempfile.mkdtemp(prefix=f"{STORE_PREFIX}{os.getpid()}-", dir="/dev/shm"))
    _stores.append(store)
    return store


def remove_stores() -> None:
    while _stores:
        shutil.rmtree(_stores.pop(), ignore_errors=True)


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)   # unwinds: servers stopped, stores removed


atexit.register(remove_stores)


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1000, 40000, length).tolist() for _ in range(n)]


async def one(session: Any, url: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    body = {"model": "default", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    ttft = None
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            return {"ok": False, "error": await r.text()}
        async for line in r.content:
            if line.startswith(b"data: ") and b'"text"' in line and ttft is None:
                ttft = time.perf_counter() - t0
    return {"ok": True, "ttft": ttft, "total": time.perf_counter() - t0}


async def batch(url: str, ps: list[list[int]], max_tokens: int) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800),
                                     connector=aiohttp.TCPConnector(limit=0)) as s:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(s, url, p, max_tokens) for p in ps))
        wall = time.perf_counter() - t0
    ok = [r for r in res if r["ok"]]
    if len(ok) != len(res):
        print("  failed:", [r["error"][:200] for r in res if not r["ok"]][:2], file=sys.stderr)
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    return {"ok": len(ok), "n": len(res), "wall_s": wall,
            "ttft_p50": statistics.median(ttfts) if ttfts else None,
            "ttft_mean": statistics.fmean(ttfts) if ttfts else None,
            "tok_s": len(ok) * max_tokens / wall}


def start_mode(mode: str, folder: str, work: Path, kv_gib: int) -> tuple[list[VllmServer], str, Any]:
    common: dict[str, Any] = dict(kv_space_gib=kv_gib, max_model_len=MAX_LEN)
    if mode == "single":
        s = VllmServer(folder, cpus="0", log_path=work / "single.log", **common)
        s.start().wait_ready(900)
        return [s], s.url, None
    if mode == "tensorfabric":
        stats = work / "events.jsonl"
        env = {"TENSORFABRIC_SECRET": os.urandom(16).hex()}
        cfgs = {r: kv_transfer_config(r, stats_file=str(stats)) for r in ("prefill", "decode")}
    elif mode == "example":
        store = example_store()
        env = {}
        cfgs = {r: {"kv_connector": "ExampleConnector",
                    "kv_role": "kv_producer" if r == "prefill" else "kv_consumer",
                    "kv_connector_extra_config": {"shared_storage_path": str(store)}}
                for r in ("prefill", "decode")}
    else:
        raise SystemExit(f"unknown mode {mode}")
    p = VllmServer(folder, cpus="0", kv_transfer_config=cfgs["prefill"], env=env,
                   log_path=work / f"{mode}-prefill.log", **common)
    d = VllmServer(folder, cpus="1", kv_transfer_config=cfgs["decode"], env=env,
                   log_path=work / f"{mode}-decode.log", **common)
    p.start()
    d.start()
    p.wait_ready(900)
    d.wait_ready(900)
    proxy = DisaggProxy([p.url], [d.url]).start()
    return [p, d], proxy.url, proxy


def interleaved(args: Any, folder: str, work: Path, conc: list[int], lengths: list[int],
                results: list[dict[str, Any]]) -> None:
    t0 = time.perf_counter()
    started = {m: start_mode(m, folder, work, args.kv_space) for m in ("tensorfabric", "example")}
    urls = {"single": started["tensorfabric"][0][1].url,
            "tensorfabric": started["tensorfabric"][1], "example": started["example"][1]}
    print(f"# both pairs ready in {time.perf_counter() - t0:.0f} s", flush=True)
    try:
        for url in urls.values():
            asyncio.run(batch(url, prompts(1, 64, 0), 4))   # warm up
        order = ["single", "tensorfabric", "example"]
        for length in lengths:
            for c in conc:
                runs: dict[str, list[dict[str, Any]]] = {m: [] for m in order}
                for rep in range(args.reps):
                    for mode in order[rep % 3:] + order[:rep % 3]:
                        since = time.time()
                        # its own prompts per mode: single runs on the tf decode server, whose prefix
                        # cache would otherwise already hold the tf requests' prompts
                        seed = 7 * rep + c + length + 100003 * order.index(mode)
                        r = asyncio.run(batch(urls[mode], prompts(c, length, seed),
                                              args.max_tokens))
                        r.update(mode=mode, length=length, concurrency=c, load=os.getloadavg()[0])
                        if mode == "tensorfabric":
                            r.update(transfer_stats(work / "events.jsonl", since))
                        print(json.dumps(r), flush=True)
                        runs[mode].append(r)
                for mode, rs in runs.items():
                    best = dict(rs[0])
                    for key in ("ttft_p50", "ttft_mean", "tok_s", "xfer_s", "kv_bytes"):
                        vals = [x[key] for x in rs if x.get(key) is not None]
                        if vals:
                            best[key] = statistics.median(vals)
                    results.append(best)
    finally:
        for servers, _, proxy in started.values():
            proxy.close()
            for s in servers:
                s.stop()
        remove_stores()


def transfer_stats(path: Path, since: float) -> dict[str, Any]:
    try:
        ev = [json.loads(x) for x in path.read_text().splitlines() if x]
    except FileNotFoundError:
        return {}
    loads = [e for e in ev if e["event"] == "loaded" and e["time"] >= since]
    if not loads:
        return {}
    return {"kv_bytes": statistics.median(e["bytes"] for e in loads),
            "xfer_s": statistics.fmean(e["seconds"] for e in loads), "loads": len(loads)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="single,tensorfabric,example")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--lengths", default="128,512,2048")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--kv-space", type=int, default=2, help="GiB of KV cache per server")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--interleave", action="store_true",
                    help="start the tensorfabric and example pairs together and run the modes "
                         "in turn at every point (same machine load for all three); single is "
                         "then the tensorfabric pair's decode server answering on its own")
    ap.add_argument("--reps", type=int, default=1, help="rounds per point with --interleave")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _exit_on_signal)
    conc = [int(x) for x in args.concurrency.split(",")]
    lengths = [int(x) for x in args.lengths.split(",")]
    folder = str(hf_folder())
    work = Path(tempfile.mkdtemp(prefix="tf-vllm-bench-"))
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.node()} {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}; logs in {work}", flush=True)
    results: list[dict[str, Any]] = []
    if args.interleave:
        interleaved(args, folder, work, conc, lengths, results)
        table(results)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        return
    for mode in args.modes.split(","):
        t0 = time.perf_counter()
        servers, url, proxy = start_mode(mode, folder, work, args.kv_space)
        print(f"# {mode}: ready in {time.perf_counter() - t0:.0f} s", flush=True)
        try:
            asyncio.run(batch(url, prompts(1, 64, 0), 4))   # warm up
            for length in lengths:
                for c in conc:
                    since = time.time()
                    r = asyncio.run(batch(url, prompts(c, length, hash((mode, length, c)) & 0xFFFF),
                                          args.max_tokens))
                    r.update(mode=mode, length=length, concurrency=c,
                             load=os.getloadavg()[0])
                    if mode == "tensorfabric":
                        r.update(transfer_stats(work / "events.jsonl", since))
                    results.append(r)
                    print(json.dumps(r), flush=True)
        finally:
            if proxy is not None:
                proxy.close()
            for s in servers:
                s.stop()
            remove_stores()   # the servers are gone: nothing reads the store any more
    table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)


def table(results: list[dict[str, Any]]) -> None:
    by = {(r["mode"], r["length"], r["concurrency"]): r for r in results}
    print("\n| prompt | conc | single TTFT | tf TTFT | example TTFT | tf/single tok/s | "
          "example/single tok/s | tf KV/request | transfer share of tf TTFT |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (mode, length, c), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        if mode != "single":
            continue
        tf, ex = by.get(("tensorfabric", length, c), {}), by.get(("example", length, c), {})

        def ttft(x: dict[str, Any]) -> str:
            return f"{x['ttft_p50']:.2f} s" if x.get("ttft_p50") else "-"

        def ratio(x: dict[str, Any]) -> str:
            return f"{x['tok_s'] / r['tok_s']:.2f}x" if x.get("tok_s") else "-"

        kv = f"{tf['kv_bytes'] / 2**20:.1f} MiB" if tf.get("kv_bytes") else "-"
        share = (f"{100 * tf['xfer_s'] / tf['ttft_mean']:.1f}%"
                 if tf.get("xfer_s") and tf.get("ttft_mean") else "-")
        print(f"| {length} | {c} | {ttft(r)} | {ttft(tf)} | {ttft(ex)} | {ratio(tf)} | "
              f"{ratio(ex)} | {kv} | {share} |")


if __name__ == "__main__":
    main()
