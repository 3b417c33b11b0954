"""Small ops against the wire (issue 16): 4 KiB writes (64 in flight), an immediate's round
trip and a 64 B send/recv round trip over tcp, each beside its raw-socket baseline measured in
alternation in the same run (``tensorfabric bench``'s own points, only these).

    PYTHONPATH=src python bench/small_op_cpu.py --transport tcp,tcp-plain --budget 0.5 --reps 3

Prints one line per point and run: the engine against raw (a fraction of raw throughput for
writes, a multiple of the raw round trip for the others) and the engine's p50. Every point
alternates the engine's op with its baseline (send/recv: one engine round trip, then one raw
ping-pong of the same size; the ratio is the median of the per-pair ratios; until 2026-12-04
the bench ran the raw loop after the engine's, and this program's ``sendrecv-paired`` point
did the pairing). ``--json FILE`` keeps the rows. Run it once per tree, alternating trees,
to compare two versions of the engine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from tensorfabric.bench._runner import BenchConfig, run_bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transport", default="tcp")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows: list[dict] = []
    for rep in range(a.reps):
        cfg = BenchConfig(transports=tuple(a.transport.split(",")),
                          ops=("write", "imm", "sendrecv"), sizes=(4096,), msg_sizes=(64,),
                          budget_s=a.budget)
        report = run_bench(cfg)
        got = [r.to_dict() for r in report.rows if r.op != "imm-echo"]
        for d in got:
            d["rep"] = rep
            rows.append(d)
            x = d["ratio"] or 0.0
            shown = f"{x:.2f} of raw" if d["op"] == "write" else f"{1 / x:.2f}x raw" if x else "-"
            print(f"rep {rep} {d['transport']:10s} {d['op']:15s} {d['size']:6d} B  {shown:14s} "
                  f"p50 {d['p50_us']:7.1f} us  raw {d['baseline_value'] or 0:.3g}", flush=True)
    keys = sorted({(r["transport"], r["op"]) for r in rows})
    for t, op in keys:
        xs = [r["ratio"] for r in rows if (r["transport"], r["op"]) == (t, op) and r["ratio"]]
        if xs:
            m = statistics.median(xs)
            shown = f"{m:.2f} of raw" if op == "write" else f"{1 / m:.2f}x raw"
            print(f"median {t:10s} {op:15s} {shown}  (load {os.getloadavg()[0]:.1f})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
