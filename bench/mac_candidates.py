"""MAC candidates for the tcp links' frame integrity, on one core, against memcpy (same run).

    python bench/mac_candidates.py [--mib 4] [--reps 20]

Prints GB/s per candidate and its ratio to memcpy of the same buffer, plus the per-frame cost
of the header tag (keyed BLAKE2b over a 72-byte header+ext) that every frame pays. Candidates
that are not installed are skipped (blake3 is not a tensorfabric dependency; GMAC and
Poly1305 come with the ``integrity`` extra).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from typing import Any, Callable


def rate(fn: Callable[[], Any], nbytes: int, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=4)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    n = args.mib << 20
    buf = memoryview(os.urandom(n))
    key = os.urandom(32)
    cands: dict[str, Callable[[], Any]] = {
        "memcpy (baseline)": lambda: bytearray(buf),
        "blake2b keyed (hashlib)": lambda: hashlib.blake2b(buf, key=key, digest_size=16).digest(),
    }
    try:
        from cryptography.hazmat.primitives.poly1305 import Poly1305

        cands["poly1305 (OpenSSL via cryptography)"] = lambda: Poly1305.generate_tag(key, buf)
    except ImportError:
        pass
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        gcm, iv = AESGCM(key), bytes(12)
        cands["gmac aes-256-gcm (OpenSSL, the default)"] = lambda: gcm.encrypt(iv, b"", buf)
    except ImportError:
        pass
    try:
        import blake3

        cands["blake3 keyed"] = lambda: blake3.blake3(buf, key=key).digest()
    except ImportError:
        pass
    base = rate(cands["memcpy (baseline)"], n, args.reps)
    print(f"{'candidate':<38} {'GB/s':>7} {'x memcpy':>9}")
    for name, fn in cands.items():
        r = base if name.startswith("memcpy") else rate(fn, n, args.reps)
        print(f"{name:<38} {r:7.2f} {r / base:9.2f}")
    head = os.urandom(72)
    base_h = hashlib.blake2b(key=key, digest_size=48)
    t = time.perf_counter()
    for i in range(100_000):
        h = base_h.copy()
        h.update(i.to_bytes(8, "little"))
        h.update(head)
        h.digest()
    print(f"header tag per frame: {(time.perf_counter() - t) * 10:.2f} us")


if __name__ == "__main__":
    main()
