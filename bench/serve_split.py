"""Benchmark the edge/cloud deployment through its HTTP API.

Phases on one fixed prompt set (greedy, same max_tokens):
  edge    every request answered by the edge model (int8)       model tensorfabric-edge
  cloud   every request answered by the cloud tier (full model)  model tensorfabric-cloud
  routed  the confidence policy decides                          model tensorfabric
Per phase: p50/p99 latency, requests/s and tokens/s, with ``--concurrency`` clients. Ratios are
to the cloud phase of the same run. The routed phase reports the share kept at the edge; the
edge and cloud phases give how often the edge answer equals the cloud answer (all prompts, and
the prompts the router kept at the edge).

With root, the cloud tier runs in its own network namespace behind a tbf-limited veth link
(``--rate``); without root, on loopback (the table says which).

    PYTHONPATH=src python bench/serve_split.py [--rate 20mbit] [--max-tokens 32] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import datetime
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
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


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


@contextlib.contextmanager
def rate_limited_netns(rate: str) -> Iterator[dict[str, str] | None]:
    """A namespace for the cloud behind a tbf veth link, or None without root."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        yield None
        return
    tag = str(os.getpid() % 100000)
    ns, hif, nif = f"tfbench{tag}", f"tfbh{tag}", f"tfbc{tag}"
    sub = f"10.{150 + os.getpid() % 50}.{os.getpid() % 250}"
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", hif, "type", "veth", "peer", "name", nif)
        sh("ip", "link", "set", nif, "netns", ns)
        sh("ip", "addr", "add", f"{sub}.1/24", "dev", hif)
        sh("ip", "link", "set", hif, "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{sub}.2/24", "dev", nif)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", nif, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        sh("tc", "qdisc", "add", "dev", hif, "root", "tbf", "rate", rate, "burst", "32kbit", "latency", "100ms")
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", nif, "root", "tbf", "rate", rate,
           "burst", "32kbit", "latency", "100ms")  # fmt: skip
        yield {"ns": ns, "edge_ip": f"{sub}.1", "cloud_ip": f"{sub}.2"}
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        subprocess.run(["ip", "link", "del", hif], capture_output=True, timeout=20)


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def run_phase(url: str, model: str, max_tokens: int, conc: int) -> dict[str, Any]:
    import httpx

    def one(prompt: str) -> tuple[float, dict[str, Any]]:
        t = time.perf_counter()
        with httpx.Client(timeout=600) as c:
            r = c.post(f"{url}/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens})  # fmt: skip
        r.raise_for_status()
        return time.perf_counter() - t, r.json()

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(conc) as pool:
        results = list(pool.map(one, PROMPTS))
    wall = time.perf_counter() - t0
    lat = [r[0] for r in results]
    bodies = [r[1] for r in results]
    tokens = sum(b["usage"]["completion_tokens"] for b in bodies)
    return {
        "p50": pct(lat, 50), "p99": pct(lat, 99), "rps": len(PROMPTS) / wall, "tps": tokens / wall,
        "texts": [b["choices"][0]["message"]["content"] for b in bodies],
        "tiers": [b["tensorfabric"]["tier"] for b in bodies],
        "degraded": sum(b["tensorfabric"]["degraded"] for b in bodies),
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", default="20mbit", help="tbf rate of the edge-cloud link (root only)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--threshold", type=float, default=-0.5)
    args = ap.parse_args()

    import uvicorn

    from tensorfabric.serve import start_cloud_process
    from tensorfabric.serve._app import create_app
    from tensorfabric.split import parse_config
    from tensorfabric.split._edge import EdgeTier
    from tensorfabric.split._lm import load_chat_model

    with rate_limited_netns(args.rate) as net:
        edge_ip = net["edge_ip"] if net else "127.0.0.1"
        cloud_ip = net["cloud_ip"] if net else "127.0.0.1"
        cfg = parse_config({
            "secret": "bench-secret",
            "edge": {"host": edge_ip},
            "cloud": {"host": cloud_ip, "timeout": 120},
            "routing": {"policy": "confidence", "threshold": args.threshold, "probe_tokens": 8},
            "server": {"max_queue": 256, "request_timeout": 600},
        })  # fmt: skip
        prefix = ["ip", "netns", "exec", net["ns"]] if net else None
        print("starting the cloud tier and loading the edge model ...", file=sys.stderr)
        cloud = start_cloud_process(cfg, prefix=prefix, timeout=600)
        edge_model = load_chat_model(quantize="int8")
        edge_model.warmup()
        edge = EdgeTier(cfg, edge_model, cloud.address)
        app = create_app(edge, max_queue=256)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        th.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/v1"
        try:
            phases = {}
            for name, model in (("edge", "tensorfabric-edge"), ("cloud", "tensorfabric-cloud"),
                                ("routed", "tensorfabric")):  # fmt: skip
                print(f"phase {name} ...", file=sys.stderr)
                phases[name] = run_phase(url, model, args.max_tokens, args.concurrency)
        finally:
            server.should_exit = True
            th.join(10)
            edge.close()
            cloud.stop()

    e, c, r = phases["edge"], phases["cloud"], phases["routed"]
    equal = [a.strip() == b.strip() for a, b in zip(e["texts"], c["texts"])]
    words = [a.split()[:5] == b.split()[:5] for a, b in zip(e["texts"], c["texts"])]
    kept = [t == "edge" for t in r["tiers"]]
    kept_equal = [eq for eq, k in zip(equal, kept) if k]
    link = f"cloud in a netns behind tbf {args.rate}" if net else "cloud on loopback (no root: no netns)"
    print(f"\n# serve_split: {len(PROMPTS)} prompts, max_tokens={args.max_tokens}, "
          f"concurrency={args.concurrency}, {link}")  # fmt: skip
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} CPUs, {platform.python_version()}\n")  # fmt: skip
    print("| phase | p50 s | p99 s | req/s | tok/s | p50 vs cloud | tok/s vs cloud | kept at edge |")
    print("|---|---|---|---|---|---|---|---|")
    for name, ph in phases.items():
        share = sum(t == "edge" for t in ph["tiers"]) / len(PROMPTS)
        print(f"| {name} | {ph['p50']:.2f} | {ph['p99']:.2f} | {ph['rps']:.2f} | {ph['tps']:.1f} | "
              f"{ph['p50'] / c['p50']:.2f}x | {ph['tps'] / c['tps']:.2f}x | {share:.0%} |")  # fmt: skip
    print(f"\nedge answer == cloud answer (greedy, {args.max_tokens} tokens): "
          f"{sum(equal)}/{len(equal)} of all prompts; {sum(kept_equal)}/{len(kept_equal)} of the "
          f"prompts the router kept at the edge (threshold {args.threshold}); degraded replies: "
          f"{sum(ph['degraded'] for ph in phases.values())}")  # fmt: skip
    print(f"same first 5 words: {sum(words)}/{len(words)} of all prompts; "
          f"{sum(w for w, k in zip(words, kept) if k)}/{len(kept_equal)} of those kept at the edge")
    return 0


if __name__ == "__main__":
    sys.exit(main())
