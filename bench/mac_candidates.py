"""MAC candidates for the tcp links' frame integrity, on one core, against memcpy (same run).

    python bench/mac_candidates.py [--mib 4] [--reps 20]

Prints GB/s per candidate and its ratio to memcpy of the same buffer, plus the per-frame cost
of the header tag (keyed BLAKE2b over a 72-byte header+ext) that every frame pays. Candidates
that are not installed are skipped (blake3 is not a tensorfabric dependency; GMAC and
Poly1305 come with the ``integrity`` extra). The AEAD modes other than GCM are measured as
MACs the same way (the buffer as associated data, nothing encrypted); "gcm encrypt" is a
full AES-256-GCM encryption (MAC and copy in one pass), for comparison.

``GIL free``: how fast a counting Python thread runs during one call on a 64 MiB buffer
(``--gil-mib``), as a fraction of its
rate during a sleep as long (about 1: the call releases the GIL, so a link's other threads
run beside it; about 0: it holds it). On a loaded machine both rates move; compare the
candidates with each other.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import threading
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


def gil_free(fn: Callable[[], Any]) -> float:
    """A counting thread's progress during one ``fn()`` call (on a buffer large enough that the
    call outlasts the interpreter's 5 ms switch interval) over its progress during a sleep as
    long."""
    stop: list[int] = []
    count = [0]

    def spin() -> None:
        while not stop:
            count[0] += 1

    th = threading.Thread(target=spin)
    th.start()
    time.sleep(0.01)
    c0, t = count[0], time.perf_counter()
    fn()
    dt, c1 = time.perf_counter() - t, count[0]
    time.sleep(dt)
    c2 = count[0]
    stop.append(1)
    th.join()
    return (c1 - c0) / max(1, c2 - c1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=4)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--gil-mib", type=int, default=64)
    args = ap.parse_args()
    n = args.mib << 20
    big = memoryview(os.urandom(args.gil_mib << 20))
    key = os.urandom(32)
    cands = candidates(memoryview(os.urandom(n)), key)
    gil = candidates(big, key)
    base = rate(cands["memcpy (baseline)"], n, args.reps)
    print(f"{'candidate':<38} {'GB/s':>7} {'x memcpy':>9} {'GIL free':>9}")
    for name, fn in cands.items():
        r = base if name.startswith("memcpy") else rate(fn, n, args.reps)
        free = sorted(gil_free(gil[name]) for _ in range(3))[1]
        print(f"{name:<38} {r:7.2f} {r / base:9.2f} {free:9.2f}")
    head = os.urandom(72)
    base_h = hashlib.blake2b(key=key, digest_size=48)
    t = time.perf_counter()
    for i in range(100_000):
        h = base_h.copy()
        h.update(i.to_bytes(8, "little"))
        h.update(head)
        h.digest()
    print(f"header tag per frame: {(time.perf_counter() - t) * 10:.2f} us")


def candidates(buf: memoryview, key: bytes) -> dict[str, Callable[[], Any]]:
    """Each candidate as a call over ``buf``; those not installed are left out."""
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
        cands["gcm encrypt (copy + MAC)"] = lambda: gcm.encrypt(iv, buf, b"")
        from cryptography.hazmat.primitives.ciphers import aead

        for name in ("ChaCha20Poly1305", "AESOCB3", "AESGCMSIV"):
            if hasattr(aead, name):
                ctx = getattr(aead, name)(key)
                cands[f"{name} as a MAC"] = lambda ctx=ctx: ctx.encrypt(iv, b"", buf)
    except ImportError:
        pass
    try:
        import blake3

        cands["blake3 keyed"] = lambda: blake3.blake3(buf, key=key).digest()
    except ImportError:
        pass
    return cands


if __name__ == "__main__":
    main()
