"""Measure an edge runtime and calibrate the router on the shipped prompt set.

For every prompt of ``tensorfabric/split/data/routing_prompts.json`` (76 prompts, 10 task
kinds): the edge runtime's greedy answer with per-token log-probabilities (the probe score is
the mean over the first ``--probe-tokens``), and the cloud model's greedy answer (the float32
model, the weights the vLLM cloud tier serves). Then:

- speed of the edge runtime: tokens/s of one stream, and of ``--concurrency`` streams at once
  (every request through the runtime's own admission: a lock or a batch);
- agreement: how often the edge answer equals the cloud answer, overall and per task kind;
- calibration: ``cloud_kinds`` = the kinds whose edge answers agree less than ``--kind-bar``;
  the threshold that keeps ``--share`` of the remaining prompts at the edge
  (:func:`tensorfabric.split.calibrate_threshold`);
- routing quality: share kept at the edge and agreement of the routed answer with the cloud's,
  for the calibrated policy, the old default (-0.5, no kinds), always-edge and always-cloud.

    PYTHONPATH=src python bench/routing_calibrate.py --runtime transformers   # int8 edge
    PYTHONPATH=src python bench/routing_calibrate.py --runtime vllm
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import os
import platform
import sys
import time
from importlib import resources
from typing import Any


def answer(model: Any, prompt: str, max_tokens: int) -> tuple[str, list[float], int]:
    ids = model.encode_chat([{"role": "user", "content": prompt}])
    model.acquire(600)
    text, lps, n = [], [], 0
    try:
        for st in model.stream(ids, max_new_tokens=max_tokens):
            if st.stop:
                break
            text.append(st.text)
            lps.append(st.logprob)
            n += 1
    finally:
        model.lock.release()
    return "".join(text).strip(), lps, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runtime", default="transformers", choices=["transformers", "vllm"])
    ap.add_argument("--quantize", default="int8", choices=["int8", "none"])
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--probe-tokens", type=int, default=8)
    ap.add_argument("--share", type=float, default=0.8, help="share kept at the edge after the cheap signals")
    ap.add_argument("--kind-bar", type=float, default=0.5)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--cloud-cache", help="the cloud answers: read from this JSON file if it exists, "
                    "else computed and written there (reuse them across runtimes)")
    args = ap.parse_args()

    from tensorfabric.split import calibrate_threshold, parse_config
    from tensorfabric.split._edge_runtimes import load_edge_model
    from tensorfabric.split._lm import load_chat_model

    data = json.loads(resources.files("tensorfabric.split").joinpath("data/routing_prompts.json").read_text())
    rows = data["prompts"]
    load0 = os.getloadavg()[0]
    cfg = parse_config({"edge": {"runtime": args.runtime, "quantize": args.quantize},
                        "cloud": {"engine": "transformers"}})  # fmt: skip
    t = time.perf_counter()
    edge = load_edge_model(cfg)
    edge.warmup()
    load_s = time.perf_counter() - t
    print(f"edge runtime {args.runtime}: {edge.name} loaded in {load_s:.1f} s", file=sys.stderr, flush=True)

    # speed: one stream, then N at once
    t = time.perf_counter()
    toks = sum(answer(edge, r["prompt"], args.max_tokens)[2] for r in rows[:4])
    single = toks / (time.perf_counter() - t)
    t = time.perf_counter()
    with cf.ThreadPoolExecutor(args.concurrency) as pool:
        outs = list(pool.map(lambda r: answer(edge, r["prompt"], args.max_tokens), rows[: 2 * args.concurrency]))
    multi = sum(o[2] for o in outs) / (time.perf_counter() - t)

    edge_out = []
    for i, r in enumerate(rows):
        edge_out.append(answer(edge, r["prompt"], args.max_tokens))
        if i % 10 == 9:
            print(f"edge {i + 1}/{len(rows)}", file=sys.stderr, flush=True)
    close = getattr(edge, "close", None)
    if close is not None:
        close()
    cache = args.cloud_cache and os.path.exists(args.cloud_cache) and json.load(open(args.cloud_cache))
    if cache and cache.get("max_tokens") == args.max_tokens and len(cache["answers"]) == len(rows):
        cloud_out = cache["answers"]
    else:
        cloud = load_chat_model("default")
        cloud_out = [answer(cloud, r["prompt"], args.max_tokens) for r in rows]
        if args.cloud_cache:
            with open(args.cloud_cache, "w") as f:
                json.dump({"max_tokens": args.max_tokens, "answers": cloud_out}, f)

    agree = [e[0] == c[0] for e, c in zip(edge_out, cloud_out)]
    scores = [sum(e[1][: args.probe_tokens]) / max(len(e[1][: args.probe_tokens]), 1) for e in edge_out]
    kinds = sorted({r["kind"] for r in rows})
    per_kind = {k: [a for a, r in zip(agree, rows) if r["kind"] == k] for k in kinds}
    cloud_kinds = [k for k in kinds if sum(per_kind[k]) / len(per_kind[k]) < args.kind_bar]
    rest = [s for s, r in zip(scores, rows) if r["kind"] not in cloud_kinds]
    threshold = round(calibrate_threshold(rest, args.share), 3) if rest else -0.5

    def quality(th: float, ck: list[str]) -> tuple[float, float]:
        at_edge = [r["kind"] not in ck and s >= th for s, r in zip(scores, rows)]
        routed = [a if e else True for a, e in zip(agree, at_edge)]
        return sum(at_edge) / len(rows), sum(routed) / len(rows)

    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"\n# routing_calibrate: runtime {args.runtime} ({edge.name}), {len(rows)} prompts, "
          f"max_tokens={args.max_tokens}, probe_tokens={args.probe_tokens}; {now:%Y-%m-%d %H:%M} UTC, "
          f"{platform.node()}, {os.cpu_count()} CPUs, load {load0:.1f} -> {os.getloadavg()[0]:.1f}\n")  # fmt: skip
    print(f"edge speed: {single:.1f} tok/s one stream, {multi:.1f} tok/s with {args.concurrency} "
          f"streams at once; load {load_s:.1f} s")  # fmt: skip
    print(f"edge answer == cloud answer: {sum(agree)}/{len(agree)}")
    print("per kind: " + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in per_kind.items()))
    print(f"calibrated: cloud_kinds={cloud_kinds}, threshold={threshold} "
          f"(keeps {args.share:.0%} of the other prompts at the edge)\n")  # fmt: skip
    print("| policy | kept at edge | routed answer == cloud answer |")
    print("|---|---|---|")
    for name, th, ck in (("calibrated", threshold, cloud_kinds), ("old default (-0.5, no kinds)", -0.5, []),
                         ("always edge", -1e9, []), ("always cloud", 1.0, [])):  # fmt: skip
        share, q = quality(th, ck)
        print(f"| {name} | {share:.0%} | {q:.0%} |")
    two = next((i for i, r in enumerate(rows) if r["prompt"] == "What is 2+2?"), None)
    if two is not None:
        print(f"\n'What is 2+2?': edge {edge_out[two][0]!r} / cloud {cloud_out[two][0]!r}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "edge": edge_out, "cloud": cloud_out, "scores": scores,
                       "threshold": threshold, "cloud_kinds": cloud_kinds}, f)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
