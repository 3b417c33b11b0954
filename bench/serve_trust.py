"""Added latency per request of PII scrubbing+restoring and of TLS on the tier link.

    PYTHONPATH=src python bench/serve_trust.py [--requests 12] [--max-tokens 8]

Two real cloud tiers (default model, own processes): one on a plain link, one on a TLS link
(generated pinned pair). One edge process (this one) loads the int8 edge model once and serves
the same PII-laden prompt to the cloud through both links, with scrubbing on and off; the four
configurations are interleaved request by request so machine load hits them alike. Figures are
ratios to the plain link without scrubbing, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT = ("Hi, my name is Maria Gonzalez, mail maria.gonzalez@example.com, phone +34 612 345 678, "
          "I live at Calle Mayor 12. Write one short sentence welcoming me.")  # fmt: skip


def start_cloud(cfg: dict) -> tuple[subprocess.Popen[str], bytes]:
    p = subprocess.Popen([sys.executable, "-m", "tensorfabric.split", "cloud", "--config-json",
                          json.dumps(cfg)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert p.stdout is not None
    for line in p.stdout:
        if line.startswith("TENSORFABRIC_CLOUD_ADDRESS "):
            return p, bytes.fromhex(line.split()[1])
    raise RuntimeError("cloud tier did not start")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args()
    os.environ.setdefault("TENSORFABRIC_SECRET", "bench-trust")
    from tensorfabric.split import parse_config
    from tensorfabric.split._edge import ChatRequest, Done, EdgeTier, build_scrubber
    from tensorfabric.split._lm import load_chat_model

    tls_dir = tempfile.mkdtemp(prefix="tf-bench-tls-")
    cfgs = {
        "plain": {"cloud": {"tls": {"enabled": False}}},
        "tls": {"cloud": {"tls": {"enabled": True, "dir": tls_dir}}},
    }
    clouds = {k: start_cloud(v) for k, v in cfgs.items()}
    try:
        model = load_chat_model("default", quantize="int8")
        model.warmup()
        edges = {k: EdgeTier(parse_config(v), model, clouds[k][1]) for k, v in cfgs.items()}
        scrubber = build_scrubber(parse_config({}))
        for e in edges.values():
            assert e.health is not None and e.health.wait_available(60), "cloud not reachable"
        times: dict[tuple[str, bool], list[float]] = {(k, p): [] for k in edges for p in (False, True)}
        tokens: dict[tuple[str, bool], tuple[int, int]] = {}
        req = ChatRequest([{"role": "user", "content": PROMPT}], max_tokens=args.max_tokens,
                          explicit="cloud")  # fmt: skip
        for i in range(args.requests + 1):  # the first round warms every path up
            for (link, pii), bucket in times.items():
                edge = edges[link]
                edge.scrubber = scrubber if pii else None
                t = time.perf_counter()
                done = [ev for ev in edge.chat(req) if isinstance(ev, Done)][0]
                if i:
                    bucket.append(time.perf_counter() - t)
                assert done.tier == "cloud" and not done.degraded, done
                tokens[(link, pii)] = (done.prompt_tokens, done.completion_tokens)
        med = {k: statistics.median(v) for k, v in times.items()}
        base = med[("plain", False)]
        print(f"{'link':<6} {'pii':<4} {'median s/request':>17} {'p25-p75':>13} {'ratio':>7} {'tokens in/out':>14}"
              f"   ({args.requests} requests each, max_tokens {args.max_tokens}, interleaved)")  # fmt: skip
        for (link, pii), m in med.items():
            q = statistics.quantiles(times[(link, pii)], n=4)
            pt, ct = tokens[(link, pii)]
            print(f"{link:<6} {'on' if pii else 'off':<4} {m:>17.3f} {q[0]:>6.2f}-{q[2]:<6.2f} "
                  f"{m / base:>7.3f} {pt:>7}/{ct:<6}")  # fmt: skip
        t = time.perf_counter()
        for _ in range(50):
            out, mapping = scrubber.scrub(PROMPT)  # type: ignore[union-attr]
            mapping.restore(out)
        scrub = (time.perf_counter() - t) / 50
        print(f"scrub+restore of this prompt alone: {scrub * 1e3:.2f} ms "
              f"= {scrub / base:.4f} of a plain request")  # fmt: skip
        for e in edges.values():
            e.close()
    finally:
        for p, _ in clouds.values():
            p.terminate()
            p.wait(15)


if __name__ == "__main__":
    main()
