"""PII scrubbing on the labelled corpus: recall and false positives per kind, cost per request.

    PYTHONPATH=src python bench/pii_scrub.py [--repeat 3]

Recall counts a labelled value as caught when nothing of it is left in the scrubbed text (the
whole value in any case and with or without separators, and for names every word of 3+
letters). A false positive is a clean prompt the scrubber changed. The cost is the wall time
of ``scrub`` + ``restore`` per prompt, against a baseline of copying the prompt through the
same loop (so the ratio holds on a busy machine).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections import Counter
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


def _norm(s: str) -> str:
    return re.sub(r"[\s.\-/()]", "", s.casefold())


def leaked(kind: str, value: str, scrubbed: str) -> bool:
    if _norm(value) in _norm(scrubbed):
        return True
    if kind in ("PERSON", "ADDRESS"):
        words = set(re.findall(r"\w+", scrubbed.casefold()))
        generic = {"rua", "calle", "avenida", "street", "road", "avenue", "lane", "drive", "parkway",
                   "court", "paseo", "travessa", "rue", "boulevard", "blvd", "der", "das", "dos",
                   "del", "des", "van", "la", "de", "da", "do", "du"}
        return any(w in words for w in re.findall(r"\w{3,}", value.casefold()) if w not in generic)
    return False


def load(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def evaluate(scrubber, corpus: list[dict], clean: list[dict]) -> dict:
    total, missed = Counter(), Counter()
    misses = []
    for row in corpus:
        out, _ = scrubber.scrub(row["text"])
        for lab in row["pii"]:
            total[lab["kind"]] += 1
            if leaked(lab["kind"], lab["value"], out):
                missed[lab["kind"]] += 1
                misses.append((lab["kind"], lab["value"], out))
    fp_rows, fp_kinds = [], Counter()
    for row in clean:
        ents = scrubber.find(row["text"])
        if ents:
            fp_rows.append((row["text"], [(e.kind, e.text) for e in ents]))
            fp_kinds.update(e.kind for e in ents)
    return {"total": total, "missed": missed, "misses": misses, "fp_rows": fp_rows,
            "fp_kinds": fp_kinds, "n_clean": len(clean)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--show", action="store_true", help="print each miss and false positive")
    args = ap.parse_args()
    from tensorfabric.split import PiiScrubber

    t0 = time.perf_counter()
    scrubber = PiiScrubber()
    build = time.perf_counter() - t0
    corpus, clean = load("pii_corpus.jsonl"), load("pii_clean.jsonl")
    r = evaluate(scrubber, corpus, clean)
    print(f"scrubber built in {build:.1f} s (imports Presidio)")
    print(f"{'kind':<12} {'labelled':>8} {'caught':>7} {'recall':>7} {'false+':>7}")
    kinds = sorted(set(r["total"]) | set(r["fp_kinds"]))
    for k in kinds:
        n, m = r["total"][k], r["missed"][k]
        rec = f"{(n - m) / n:.3f}" if n else "-"
        print(f"{k:<12} {n:>8} {n - m:>7} {rec:>7} {r['fp_kinds'][k]:>7}")
    n, m = sum(r["total"].values()), sum(r["missed"].values())
    print(f"{'all':<12} {n:>8} {n - m:>7} {(n - m) / n:>7.3f}  false-positive prompts: "
          f"{len(r['fp_rows'])}/{r['n_clean']} = {len(r['fp_rows']) / r['n_clean']:.3f}")
    if args.show:
        for kind, value, out in r["misses"]:
            print("MISS", kind, repr(value), "->", repr(out))
        for text, ents in r["fp_rows"]:
            print("FP", repr(text), ents)
    texts = [row["text"] for row in corpus + clean]
    scrub_t, base_t = [], []
    for _ in range(args.repeat):
        t = time.perf_counter()
        for s in texts:
            out, m = scrubber.scrub(s)
            m.restore(out)
        scrub_t.append((time.perf_counter() - t) / len(texts))
        t = time.perf_counter()
        for s in texts:
            "".join(list(s))
        base_t.append((time.perf_counter() - t) / len(texts))
    s_med, b_med = statistics.median(scrub_t), statistics.median(base_t)
    print(f"scrub+restore per prompt: {s_med * 1e3:.2f} ms (median of {args.repeat} passes over "
          f"{len(texts)} prompts); baseline copy {b_med * 1e6:.1f} us; ratio {s_med / b_med:.0f}x")


if __name__ == "__main__":
    main()
