"""KV handoff benchmark: disaggregated prefill/decode against a single-process run.

    PYTHONPATH=src python bench/kv_handoff.py [--lengths 128,512,2048] [--reps 3] [--json out.json]

One run measures, on this machine:

* time to first token (TTFT) of prompts of each length, disaggregated (a prefill worker
  process writes the KV cache layer by layer into the decode worker's blocks) against
  single-process (the decode worker prefills itself, nothing moves). Both are timed inside
  the decode worker, from admitting the request to holding the first token (and, when
  disaggregated, every layer's KV). Runs alternate, medians are reported.
* KV bytes per second during the handoff (bytes over the time a write_pages of the request was
  in flight, while the forward pass computes beside it), and of the same handoff writes
  replayed by the prefill worker right after (all layers in flight, no compute), against the
  engine's own write_pages benchmark (``tensorfabric bench``'s paged write, shm transport) at
  the same page size and the same bytes per op.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import sys
import textwrap
import time
from typing import Any

from tensorfabric.bench import BenchConfig, run_bench
from tensorfabric.kv import DisaggregatedCluster, KVLayout
from tensorfabric.models import chat_ids, load_model


def prompt_of(lm: Any, n: int) -> list[int]:
    """Token ids of a real prompt (a question about Python source) of exactly ``n`` tokens."""
    head = chat_ids(lm, "Explain this code in one sentence.\n\n")
    body: list[int] = []
    for module in (textwrap, inspect, json.decoder, statistics):
        body += lm.tokenizer(inspect.getsource(module), add_special_tokens=False)["input_ids"]
    need = n - len(head)
    if need > len(body):
        raise SystemExit(f"prompt length {n} is longer than the source text available")
    tail = head[-3:]  # keep "<|im_end|>\n<|im_start|>assistant\n"-style ending intact
    return head[:-3] + body[:need] + tail


def engine_pages_gbps(page_bytes: int, per_op: int) -> float:
    """The engine's `write_pages` rate (shm, two processes) at this page size and op size."""
    report = run_bench(BenchConfig(transports=("shm",), ops=("pages",), page_sizes=(page_bytes,),
                                   pages_bytes=per_op, budget_s=1.0, sizes=(per_op,),
                                   msg_sizes=(64,)))
    return next(r.gbps for r in report.rows if r.op == "pages")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lengths", default="128,512,2048")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--model", default=None)
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    lm = load_model(args.model)
    layout = KVLayout.for_model(lm, num_blocks=1, block_size=args.block_size)
    blocks = -(-max(lengths) // args.block_size) + 2
    prompts = {n: prompt_of(lm, n) for n in lengths}
    rows = []
    before_gbps = engine_pages_gbps(layout.page_bytes,
                                    layout.blocks_for(max(lengths)) * layout.page_bytes)
    print(f"starting workers ({platform.node()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
          file=sys.stderr)
    with DisaggregatedCluster(args.model, prefill_workers=1, kv_blocks=blocks + 2,
                              prefill_blocks=blocks, block_size=args.block_size,
                              prefill_timeout=600, timeout=60) as cluster:
        for local in (True, False):  # warm both paths (first forward passes are slow)
            cluster.generate(prompts[lengths[0]], max_new_tokens=2, local=local, timeout=600)
        for n in lengths:
            single, disagg, gbps, exposed, replay = [], [], [], [], []
            for rep in range(args.reps):
                for local in ((True, False) if rep % 2 == 0 else (False, True)):
                    out = cluster.generate(prompts[n], max_new_tokens=2, local=local, timeout=900,
                                           measure_replay=not local)
                    if local:
                        single.append(out.stats.ttft_s)
                    else:
                        disagg.append(out.stats.ttft_s)
                        gbps.append(out.stats.gbps)
                        exposed.append(out.stats.exposed_s)
                        replay.append(out.stats.kv_bytes / out.stats.extra["replay_s"] / 1e9)
                print(f"  {n} tokens: rep {rep + 1}/{args.reps}", file=sys.stderr)
            nb = layout.blocks_for(n)
            rows.append({"tokens": n, "ttft_single_s": statistics.median(single),
                         "ttft_disagg_s": statistics.median(disagg),
                         "overhead": statistics.median(disagg) / statistics.median(single) - 1,
                         "exposed_s": statistics.median(exposed), "kv_gbps": statistics.median(gbps),
                         "replay_gbps": statistics.median(replay),
                         "kv_bytes": nb * layout.page_bytes * layout.num_layers,
                         "layer_bytes": nb * layout.page_bytes})
    # The engine's own paged-write benchmark at the KV page size and bytes per op, measured
    # before and after the runs; ratios use the faster of the two (the conservative choice).
    per_op = rows[-1]["layer_bytes"]
    baselines = [before_gbps, engine_pages_gbps(layout.page_bytes, per_op)]
    engine_gbps = max(baselines)
    print(f"\nKV page {layout.page_bytes} B ({args.block_size} tokens x {layout.num_kv_heads} kv heads"
          f" x {layout.head_dim} x {layout.dtype}, K+V); engine write_pages at that page size, "
          f"{per_op} B per op (shm): {engine_gbps:.2f} GB/s (before the runs "
          f"{baselines[0]:.2f}, after {baselines[1]:.2f})\n")
    print("| prompt tokens | TTFT single | TTFT disaggregated | overhead | exposed transfer "
          "| KV MB | KV GB/s during prefill | ratio | KV GB/s handoff alone | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        r["ratio_vs_engine"] = r["kv_gbps"] / engine_gbps if engine_gbps else None
        r["replay_ratio_vs_engine"] = r["replay_gbps"] / engine_gbps if engine_gbps else None
        print(f"| {r['tokens']} | {r['ttft_single_s'] * 1e3:.0f} ms | {r['ttft_disagg_s'] * 1e3:.0f} ms "
              f"| {r['overhead'] * 100:+.1f}% | {r['exposed_s'] * 1e3:.1f} ms | {r['kv_bytes'] / 1e6:.1f} "
              f"| {r['kv_gbps']:.2f} | {r['ratio_vs_engine']:.2f} | {r['replay_gbps']:.2f} "
              f"| {r['replay_ratio_vs_engine']:.2f} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"rows": rows, "engine_pages_gbps": engine_gbps,
                       "engine_pages_gbps_before_after": baselines, "argv": sys.argv,
                       "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
