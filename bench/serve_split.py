"""Benchmark ``tensorfabric serve`` against plain ``vllm serve`` of the same model, same run.

Modes (every request streamed, greedy, the same ``--max-tokens``):
  plain   ``vllm serve`` of the default model (float32, eager, same KV space)   the baseline
          (vLLM's CPU default, its worker in a process of its own; ``--plain-worker in-process``
          runs it as the cloud tier runs vLLM)
  cloud   ``tensorfabric serve``, model ``tensorfabric-cloud`` (vLLM cloud tier over the tier link)
  edge    ``tensorfabric serve``, model ``tensorfabric-edge`` (the edge runtime alone)
  routed  ``tensorfabric serve``, model ``tensorfabric`` (the router decides)
Per mode and client count (``--clients 1,8,50``): requests/s, output tokens/s, p50/p99 latency
and p50 TTFT; each ratio is to plain vLLM at the same client count. Degraded answers and HTTP
errors are counted. The edge and cloud answers are compared prompt by prompt (routing quality).

    PYTHONPATH=src python bench/serve_split.py [--max-tokens 16] [--clients 1,8,50]
        [--repeat 2]   # every point twice, modes interleaved (plain, cloud, ..., plain, cloud, ...)

Two vLLM instances run at once (the plain one and the cloud tier's); the edge runs on the edge
runtime the config names (``--edge-config`` adds YAML keys under ``edge:``). With
``--placement split`` plain vLLM and the cloud tier get the first CPU and the edge the second
(``cloud.cpus`` / ``edge.cpus``): the routed mode then has the edge's CPU on top of the cloud's,
as an edge device beside a cloud host would, and plain vLLM the cloud host's alone.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPTS = [
    "What is the capital of France?",
    "How many days are in a week?",
    "What color is the sky on a clear day?",
    "Translate 'thank you' into Spanish.",
    "What is 12 times 12?",
    "Name the largest planet in our solar system.",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "Give me a synonym for 'happy'.",
    "What is the chemical symbol for gold?",
    "Explain the significance of the Treaty of Westphalia for modern diplomacy.",
    "Write a haiku about autumn leaves.",
    "Summarize the plot of Moby Dick in two sentences.",
    "What are the main differences between TCP and UDP?",
    "Suggest a name for a bakery that sells only croissants.",
    "Why do cats purr?",
    "Describe how a rainbow forms.",
    "What should I pack for a weekend hiking trip?",
    "Write a polite email declining a meeting invitation. My address is sam.lee@example.com.",
    "My card 4111 1111 1111 1111 was charged twice; what should I do?",
    "Explain recursion to a five-year-old.",
    "What is the difference between weather and climate?",
    "Give three tips for learning a new language.",
    "Is a tomato a fruit or a vegetable? Explain briefly.",
]


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))] if s else float("nan")


def one(url: str, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One streamed chat request: latency, TTFT, tokens, text, tier."""
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    ttft, parts, tokens, tf = None, [], 0, None
    with httpx.Client(timeout=900) as c, c.stream("POST", url + "/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": r.status_code, "lat": time.perf_counter() - t0}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                return {"error": "stream", "lat": time.perf_counter() - t0}
            for ch in ev.get("choices") or []:
                text = (ch.get("delta") or {}).get("content")
                if text:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    parts.append(text)
            if ev.get("usage"):
                tokens = int(ev["usage"]["completion_tokens"])
            if ev.get("tensorfabric"):
                tf = ev["tensorfabric"]
    lat = time.perf_counter() - t0
    return {"lat": lat, "ttft": ttft if ttft is not None else lat, "tokens": tokens,
            "text": "".join(parts), "tier": (tf or {}).get("tier", "vllm"),
            "degraded": bool((tf or {}).get("degraded"))}  # fmt: skip


def run(url: str, model: str, clients: int, n: int, max_tokens: int) -> dict[str, Any]:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        res = list(pool.map(lambda p: one(url, model, p, max_tokens), prompts))
    wall = time.perf_counter() - t0
    ok = [r for r in res if "error" not in r]
    return {
        "rps": len(ok) / wall, "tps": sum(r["tokens"] for r in ok) / wall,
        "p50": pct([r["lat"] for r in ok], 50), "p99": pct([r["lat"] for r in ok], 99),
        "ttft": pct([r["ttft"] for r in ok], 50), "errors": len(res) - len(ok),
        "degraded": sum(r["degraded"] for r in ok), "edge": sum(r["tier"] == "edge" for r in ok),
        "n": len(res), "texts": [r.get("text") for r in res],
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--clients", default="1,8,50", help="client counts, comma-separated")
    ap.add_argument("--modes", default="plain,cloud,edge,routed")
    ap.add_argument("--requests", type=int, default=0, help="requests per point (default: max(8, 2*clients))")
    ap.add_argument("--edge-config", default="{}", help="JSON merged into the config's edge section")
    ap.add_argument("--routing", default="{}", help="JSON for the config's routing section")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of every point, modes interleaved round by round (one table row each)")
    ap.add_argument("--placement", choices=("shared", "split"), default="shared",
                    help="shared: every server may use every CPU; split: plain vLLM and the cloud "
                         "tier on the first CPU, the edge (serving process) on the second, as an "
                         "edge device beside a cloud host (edge.cpus / cloud.cpus)")
    ap.add_argument("--plain-worker", choices=("process", "in-process"), default="process",
                    help="plain vLLM's model worker: in a process of its own (vLLM's CPU "
                         "default) or inside its engine core (what tensorfabric's tiers run)")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    modes = args.modes.split(",")

    from tensorfabric.serve import ServerProcess
    from tensorfabric.vllm import VllmServer, hf_folder

    cpus = sorted(os.sched_getaffinity(0))
    split = args.placement == "split"
    if split and len(cpus) < 2:
        ap.error("--placement split needs two CPUs")
    load0 = os.getloadavg()
    plain = None
    if "plain" in modes:
        print("starting plain vllm serve ...", file=sys.stderr)
        if split:  # its processes (a restart too) inherit this thread's CPUs; its worker binds there
            os.sched_setaffinity(0, {cpus[0]})
        try:
            # vLLM's own CPU default, as `vllm serve` runs when a user starts it (the worker in
            # a process of its own); `--plain-worker in-process` gives it tensorfabric's setting
            plain = VllmServer(hf_folder(), kv_space_gib=1, cpus=str(cpus[0]) if split else None,
                               env={"VLLM_ENABLE_V1_MULTIPROCESSING":
                                    "0" if args.plain_worker == "in-process" else "1"})
            plain.start().wait_ready(900)
        finally:
            os.sched_setaffinity(0, set(cpus))
    d = Path(tempfile.mkdtemp(prefix="tf-bench-serve-"))
    cfg = {"server": {"port": 0, "max_queue": 256, "request_timeout": 900},
           "cloud": {"engine": "vllm", "kv_space_gib": 1, "max_num_seqs": 64},
           "edge": json.loads(args.edge_config)}  # fmt: skip
    if split:
        cfg["cloud"]["cpus"] = str(cpus[0])
        cfg["edge"]["cpus"] = str(cpus[1])
    routing = json.loads(args.routing)
    if routing:
        cfg["routing"] = routing
    (d / "serve.yaml").write_text(json.dumps(cfg))
    results: dict[tuple[str, int, int], dict[str, Any]] = {}
    srv = None
    try:
        if set(modes) - {"plain"}:
            print("starting tensorfabric serve ...", file=sys.stderr)
            srv = ServerProcess(d / "serve.yaml", timeout=900)
        urls = {"plain": plain.url + "/v1" if plain else "", "cloud": srv.url if srv else "",
                "edge": srv.url if srv else "", "routed": srv.url if srv else ""}  # fmt: skip
        names = {"plain": "default", "cloud": "tensorfabric-cloud", "edge": "tensorfabric-edge",
                 "routed": "tensorfabric"}  # fmt: skip
        for m in modes:  # one warm-up request per mode (first-batch setup is not measured)
            one(urls[m], names[m], "Hi", 2)
        for c in clients:
            n = args.requests or max(8, 2 * c)
            for k in range(args.repeat):
                for m in modes:
                    print(f"{m} x{c} ({n} requests, round {k + 1}) ...", file=sys.stderr)
                    results[(m, c, k)] = run(urls[m], names[m], c, n, args.max_tokens)
    finally:
        if srv is not None:
            srv.stop()
        if plain is not None:
            plain.stop()
    load1 = os.getloadavg()

    print(f"\n# serve_split: max_tokens={args.max_tokens}, greedy, streamed, placement {args.placement}; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{len(cpus)} CPUs; load average {load0[0]:.1f} before, {load1[0]:.1f} after\n")  # fmt: skip
    rounds = " | round" if args.repeat > 1 else ""
    print(f"| mode | clients{rounds} | req/s | tok/s | p50 s | p99 s | TTFT p50 s | req/s vs plain | tok/s vs plain "
          "| p99 vs plain | at edge | degraded | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if rounds else ""))
    for c in clients:
        for k in range(args.repeat):
            base = results.get(("plain", c, k))  # the plain point of the same round
            for m in modes:
                r = results[(m, c, k)]
                rel = (lambda key: f"{r[key] / base[key]:.2f}") if base else (lambda key: "-")
                col = f" | {k + 1}" if rounds else ""
                print(f"| {m} | {c}{col} | {r['rps']:.2f} | {r['tps']:.1f} | {r['p50']:.2f} | {r['p99']:.2f} | "
                      f"{r['ttft']:.2f} | {rel('rps')} | {rel('tps')} | {rel('p99')} | "
                      f"{r['edge']}/{r['n']} | {r['degraded']} | {r['errors']} |")  # fmt: skip
    if "edge" in modes and "cloud" in modes:
        c = clients[0]
        e, cl = results[("edge", c, 0)]["texts"], results[("cloud", c, 0)]["texts"]
        same = sum(a is not None and a.strip() == b.strip() for a, b in zip(e, cl))
        print(f"\nedge answer == cloud answer (greedy, {args.max_tokens} tokens): {same}/{len(e)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
