"""Small ops against the wire (issue 16): 4 KiB writes (64 in flight), an immediate's round
trip and a 64 B send/recv round trip over tcp, each beside its raw-socket baseline measured in
alternation in the same run (``tensorfabric bench``'s own points, only these).

    PYTHONPATH=src python bench/small_op_cpu.py --transport tcp,tcp-plain --budget 0.5 --reps 3

Prints one line per point and run: the engine against raw (a fraction of raw throughput for
writes, a multiple of the raw round trip for the others) and the engine's p50. ``tensorfabric
bench`` measures the send/recv baseline after the engine's round trips; ``sendrecv-paired``
(this program's own point) alternates one engine round trip with one raw ping-pong over the
same peer pair, so both see the same load, and reports the median of the per-pair ratios.
``--json FILE`` keeps the rows. Run it once per tree, alternating trees, to compare two
versions of the engine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from tensorfabric.bench._engine import engine_from_options
from tensorfabric.bench._peer import DATA_TAG
from tensorfabric.bench._runner import BenchConfig, PeerProcess, Session, _raw_peer, run_bench


def paired_sendrecv(transport: str, n: int, size: int = 64) -> dict:
    """``n`` engine send/recv round trips of ``size`` bytes, each followed by one raw
    ping-pong of the same size; the median of the per-pair ratios (engine / raw)."""
    cfg = BenchConfig(transports=(transport,), msg_sizes=(size,))
    peer = PeerProcess(transport, cfg)
    eng = engine_from_options(host=cfg.host, transport=transport, links=1, link_addrs=[],
                              name="bench", timeout=cfg.timeout)
    raw = None
    try:
        s = Session(eng, peer.address, cfg, transport)
        raw = _raw_peer(s, cfg, 1 << 16)
        data, warm = bytes(size), 20
        s.ctrl("echo", wait=False, n=n + warm)
        pairs = []
        for i in range(n + warm):
            t0 = time.perf_counter()
            eng.send(peer.address, data, tag=DATA_TAG).wait(30)
            eng.recv(tag=DATA_TAG, timeout=30)
            e = time.perf_counter() - t0
            r = raw.echo(size)[0]
            if i >= warm:
                pairs.append((e, r))
        s.reply()
        return {"transport": transport, "op": "sendrecv-paired", "size": size,
                "ratio": statistics.median(r / e for e, r in pairs),
                "p50_us": statistics.median(e for e, _ in pairs) * 1e6,
                "baseline_value": statistics.median(r for _, r in pairs) * 1e6}
    finally:
        if raw is not None:
            raw.close()
        try:
            s.ctrl("quit")
        except Exception:
            pass
        peer.close()
        eng.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transport", default="tcp")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=1000, help="sendrecv-paired round trips")
    ap.add_argument("--paired-only", action="store_true",
                    help="only sendrecv-paired (it swings most after the other points)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows: list[dict] = []
    for rep in range(a.reps):
        cfg = BenchConfig(transports=tuple(a.transport.split(",")),
                          ops=("write", "imm", "sendrecv"), sizes=(4096,), msg_sizes=(64,),
                          budget_s=a.budget)
        got = []
        if not a.paired_only:
            report = run_bench(cfg)
            got = [r.to_dict() for r in report.rows if r.op != "imm-echo"]
        got += [paired_sendrecv(t, a.pairs) for t in cfg.transports]
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
