"""vLLM disaggregated prefill/decode over tensorfabric against single-instance vLLM, and
against vLLM's own ExampleConnector, on this machine, in one run.

    PYTHONPATH=src python bench/vllm_disagg.py [--modes single,push,example] \
        [--concurrency 1,8,32] [--lengths 128,512,2048] [--max-tokens 16] [--json out.json]
    PYTHONPATH=src python bench/vllm_disagg.py --interleave --modes push,pull,single   # 2 servers
    PYTHONPATH=src python bench/vllm_disagg.py --interleave --modes push,example        # 4 servers

Modes:

* ``single``: one vLLM server, its worker bound to CPU 0, no connector (the baseline).
* ``push`` (also ``tensorfabric``): a prefill server (CPU 0) and a decode server (CPU 1) with
  the tensorfabric connector (KV cache in the engine's shared memory) behind
  ``tensorfabric.vllm``'s proxy in push mode: both servers get the request at once and the
  prefill server writes every 4 layers' KV into the decode server's blocks while it computes.
* ``pull``: the same pair behind a proxy in pull mode: the decode server gets the request
  after the prefill and takes the blocks with one write_pages.
* ``example``: the same pair with vLLM's in-tree ``ExampleConnector`` (KV saved per layer to
  safetensors files under /dev/shm, read back by the decode server), behind the same proxy.
* ``nixl``: the same pair with vLLM's ``NixlConnector`` (pull mode, ``kv_buffer_device:
  cpu``, UCX), behind the same proxy in pull mode. vLLM imports ``nixl``; the installed wheel
  is ``nixl_cu13``, so the servers get a two-line ``nixl`` package that re-exports it.

Without ``--interleave`` each mode is started, measured over the whole grid and stopped
before the next one. With it, the servers the modes need are all started first (push, pull
and single share one pair: single is its decode server answering alone) and the modes run in
turn at every point, so they see the same machine load.

Every request has its own random prompt of exactly the given number of tokens (no prefix
cache hits) and asks for ``--max-tokens`` greedy tokens, streamed. TTFT is measured by the
client (request sent -> first streamed token); throughput is output tokens over the wall time
of the whole batch. The connector's stats file gives the KV bytes moved per request, for
pull the transfer time (decode server: pull sent -> last byte landed) and for push the time
from the prompt's last layer computed to the decode server told (what push leaves on TTFT),
each reported as a share of TTFT.
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
from tensorfabric.vllm._launch import VllmServer, free_port
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
    pull = mode == "pull"
    common: dict[str, Any] = dict(kv_space_gib=kv_gib, max_model_len=MAX_LEN)
    if mode == "single":
        s = VllmServer(folder, cpus="0", log_path=work / "single.log", **common)
        s.start().wait_ready(900)
        return [s], s.url, None
    if mode in ("tensorfabric", "push", "pull"):
        mode = "tensorfabric"
        stats = work / "events.jsonl"
        env = {"TENSORFABRIC_SECRET": os.urandom(16).hex()}
        cfgs = {r: kv_transfer_config(r, stats_file=str(stats)) for r in ("prefill", "decode")}
    elif mode == "nixl":
        pull = True
        shim = work / "nixl-shim" / "nixl"
        shim.mkdir(parents=True, exist_ok=True)
        (shim / "__init__.py").write_text(
            "import sys\nimport nixl_cu13, nixl_cu13._api, nixl_cu13._bindings\n"
            "sys.modules['nixl._api'] = nixl_cu13._api\n"
            "sys.modules['nixl._bindings'] = nixl_cu13._bindings\n")
        path = os.pathsep.join([str(shim.parent), os.environ.get("PYTHONPATH", "")])
        env = {"PYTHONPATH": path}
        cfgs = {r: {"kv_connector": "NixlConnector", "kv_role": "kv_both",
                    "kv_buffer_device": "cpu"} for r in ("prefill", "decode")}
    elif mode == "example":
        store = example_store()
        env = {}
        cfgs = {r: {"kv_connector": "ExampleConnector",
                    "kv_role": "kv_producer" if r == "prefill" else "kv_consumer",
                    "kv_connector_extra_config": {"shared_storage_path": str(store)}}
                for r in ("prefill", "decode")}
    else:
        raise SystemExit(f"unknown mode {mode}")
    side = {"prefill": {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())},
            "decode": {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())}} if mode == "nixl" else {}
    p = VllmServer(folder, cpus="0", kv_transfer_config=cfgs["prefill"],
                   env={**env, **side.get("prefill", {})},
                   log_path=work / f"{mode}-prefill.log", **common)
    d = VllmServer(folder, cpus="1", kv_transfer_config=cfgs["decode"],
                   env={**env, **side.get("decode", {})},
                   log_path=work / f"{mode}-decode.log", **common)
    p.start()
    d.start()
    p.wait_ready(900)
    d.wait_ready(900)
    proxy = DisaggProxy([p.url], [d.url], mode="pull" if pull else "push").start()
    return [p, d], proxy.url, proxy


PAIR = {"push": "tensorfabric", "tensorfabric": "tensorfabric", "pull": "tensorfabric",
        "single": "tensorfabric", "example": "example", "nixl": "nixl"}


def interleaved(args: Any, folder: str, work: Path, modes: list[str], conc: list[int],
                lengths: list[int], results: list[dict[str, Any]]) -> None:
    t0 = time.perf_counter()
    started = {m: start_mode(m, folder, work, args.kv_space) for m in sorted({PAIR[m] for m in modes})}
    urls: dict[str, str] = {}
    extra: list[Any] = []
    if "tensorfabric" in started:
        servers, url, proxy = started["tensorfabric"]
        pull = DisaggProxy([servers[0].url], [servers[1].url], mode="pull").start()
        extra.append(pull)
        urls.update(push=url, tensorfabric=url, pull=pull.url, single=servers[1].url)
    for m in ("example", "nixl"):
        if m in started:
            urls[m] = started[m][1]
    print(f"# {len(started)} pair(s) ready in {time.perf_counter() - t0:.0f} s", flush=True)
    try:
        for m in modes:
            for _ in range(2):   # warm up (the push proxy's first request learns the engine)
                asyncio.run(batch(urls[m], prompts(1, 64, 0), 4))
        for length in lengths:
            for c in conc:
                if (length, c) in args.skip_points:
                    continue
                runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
                for rep in range(args.reps):
                    k = rep % len(modes)
                    for mode in modes[k:] + modes[:k]:
                        r = measure(urls[mode], mode, work, length, c, args.max_tokens,
                                    # its own prompts per mode and round: no prefix cache hits
                                    seed=7 * rep + c + length + 100003 * modes.index(mode))
                        runs[mode].append(r)
                for mode, rs in runs.items():
                    best = dict(rs[0])
                    for key in ("ttft_p50", "ttft_mean", "tok_s", "xfer_s", "kv_bytes", "tail_s"):
                        vals = [x[key] for x in rs if x.get(key) is not None]
                        if vals:
                            best[key] = statistics.median(vals)
                    results.append(best)
    finally:
        for p in extra:
            p.close()
        for servers, _, proxy in started.values():
            if proxy is not None:
                proxy.close()
            for s in servers:
                s.stop()
        remove_stores()


def measure(url: str, mode: str, work: Path, length: int, c: int, max_tokens: int,
            seed: int) -> dict[str, Any]:
    since = time.time()
    r = asyncio.run(batch(url, prompts(c, length, seed), max_tokens))
    r.update(mode=mode, length=length, concurrency=c, load=os.getloadavg()[0])
    if mode in ("push", "tensorfabric", "pull"):
        time.sleep(0.5)   # the stats lines of the last transfers
        r.update(transfer_stats(work / "events.jsonl", since))
    print(json.dumps(r), flush=True)
    return r


def transfer_stats(path: Path, since: float) -> dict[str, Any]:
    try:
        ev = [json.loads(x) for x in path.read_text().splitlines() if x]
    except FileNotFoundError:
        return {}
    loads = [e for e in ev if e["event"] == "loaded" and e["time"] >= since]
    pushes = [e for e in ev if e["event"] == "pushed" and e["time"] >= since]
    out: dict[str, Any] = {}
    if loads:
        out.update(kv_bytes=statistics.median(e["bytes"] for e in loads), loads=len(loads),
                   load_modes=sorted({e.get("mode", "pull") for e in loads}))
        pulls = [e for e in loads if e.get("mode", "pull") == "pull"]
        if pulls:
            out["xfer_s"] = statistics.fmean(e["seconds"] for e in pulls)
    tails = [e["after_prefill_s"] for e in pushes if e.get("after_prefill_s") is not None]
    if tails:
        out.update(tail_s=statistics.fmean(tails), pushes=len(pushes),
                   writes=statistics.median(e["writes"] for e in pushes))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="single,push,example",
                    help="comma-separated: single, push (alias tensorfabric), pull, example")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--lengths", default="128,512,2048")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--kv-space", type=int, default=2, help="GiB of KV cache per server")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--interleave", action="store_true",
                    help="start every pair the modes need first and run the modes in turn at "
                         "every point (same machine load); push, pull and single share one "
                         "pair (single: its decode server answering on its own)")
    ap.add_argument("--reps", type=int, default=1, help="rounds per point with --interleave")
    ap.add_argument("--skip", default="", help="points to leave out, e.g. 2048x32,512x32")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _exit_on_signal)
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in PAIR]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}: use {sorted(PAIR)}")
    conc = [int(x) for x in args.concurrency.split(",")]
    lengths = [int(x) for x in args.lengths.split(",")]
    args.skip_points = {tuple(int(v) for v in x.split("x")) for x in args.skip.split(",") if x}
    folder = str(hf_folder())
    work = Path(tempfile.mkdtemp(prefix="tf-vllm-bench-"))
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.node()} {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}; logs in {work}", flush=True)
    results: list[dict[str, Any]] = []
    if args.interleave:
        interleaved(args, folder, work, modes, conc, lengths, results)
        table(results)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        return
    for mode in modes:
        t0 = time.perf_counter()
        servers, url, proxy = start_mode(mode, folder, work, args.kv_space)
        print(f"# {mode}: ready in {time.perf_counter() - t0:.0f} s", flush=True)
        try:
            for _ in range(2):   # warm up (the push proxy's first request learns the engine)
                asyncio.run(batch(url, prompts(1, 64, 0), 4))
            for length in lengths:
                for c in conc:
                    if (length, c) in args.skip_points:
                        continue
                    results.append(measure(url, mode, work, length, c, args.max_tokens,
                                           seed=hash((mode, length, c)) & 0xFFFF))
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
    by = {(r["mode"].replace("tensorfabric", "push"), r["length"], r["concurrency"]): r
          for r in results}
    points = sorted({(k[1], k[2]) for k in by})

    def ttft(x: dict[str, Any]) -> str:
        return f"{x['ttft_p50']:.2f} s" if x.get("ttft_p50") else "-"

    def ratio(x: dict[str, Any], base: dict[str, Any], key: str) -> str:
        return f"{x[key] / base[key]:.2f}" if x.get(key) and base.get(key) else "-"

    print("\n| prompt | conc | single TTFT | push TTFT | pull TTFT | example TTFT | nixl TTFT | "
          "push/pull TTFT | push/example TTFT | push/nixl TTFT | push/single tok/s | KV/request | "
          "pull transfer / TTFT | push after prefill / TTFT |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for length, c in points:
        single, push, pull, ex, nx = (by.get((m, length, c), {})
                                      for m in ("single", "push", "pull", "example", "nixl"))
        kvb = push.get("kv_bytes") or pull.get("kv_bytes")
        kv = f"{kvb / 2**20:.1f} MiB" if kvb else "-"
        share = (f"{100 * pull['xfer_s'] / pull['ttft_mean']:.1f}%"
                 if pull.get("xfer_s") and pull.get("ttft_mean") else "-")
        tail = (f"{100 * push['tail_s'] / push['ttft_mean']:.1f}%"
                if push.get("tail_s") is not None and push.get("ttft_mean") else "-")
        print(f"| {length} | {c} | {ttft(single)} | {ttft(push)} | {ttft(pull)} | {ttft(ex)} | "
              f"{ttft(nx)} | {ratio(push, pull, 'ttft_p50')} | {ratio(push, ex, 'ttft_p50')} | "
              f"{ratio(push, nx, 'ttft_p50')} | "
              f"{ratio(push, single, 'tok_s')} | {kv} | {share} | {tail} |")


if __name__ == "__main__":
    main()
