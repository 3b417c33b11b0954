"""What a frame MAC costs, by primitive: instructions per call counted by valgrind (a loop of
``--calls`` calls less the same loop of none), as the frame MACs of transports/_integrity.py
use them, per small frame (bench/mac_candidates.py measures their bandwidth on large
buffers, bench/mac_cost.py their CPU per GB on a link). The figures behind
docs/benchmarks.md's "Small ops, seventh pass".

    python bench/mac_instr.py                # every primitive, 2,000 calls each
    python bench/mac_instr.py --only gcm_seq --calls 5000
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

CHILD = r'''
import hashlib, sys
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
K, IV = bytes(32), bytes(12)
what, size, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
d, g, base = bytes(size), AESGCM(K), hashlib.blake2b(key=K, digest_size=48)
def head():
    h = base.copy()
    h.update(d)
    return h.digest()
seq = 1 << 40
f = {"gcm_new": lambda: AESGCM(K).encrypt(IV, b"", d),
     "gcm_reuse": lambda: g.encrypt(IV, b"", d),
     "gcm_seq": lambda: g.encrypt(seq.to_bytes(12, "little"), b"", d),
     "blake_keyed": lambda: hashlib.blake2b(d, key=K, digest_size=16).digest(),
     "blake_head": head}[what]
for _ in range(n):
    f()
'''

POINTS = {  # name: (primitive, bytes, what it is in a frame)
    "header tag": ("blake_head", 96, "keyed BLAKE2b-384 copy + update + digest (seq, header, ext)"),
    "counter GMAC 64 B": ("gcm_seq", 64, "payload tag (default): the link's AESGCM, counter nonce"),
    "counter GMAC 4 KiB": ("gcm_seq", 4096, "the same over 4 KiB"),
    "payload tag < 4 KiB": ("blake_keyed", 100, "one-time key (old peers): BLAKE2b, 100 B"),
    "payload tag >= 4 KiB": ("gcm_new", 4096, "AESGCM(one-time key).encrypt, 4 KiB"),
    "gcm_reuse": ("gcm_reuse", 4096, "a reused key object, fixed nonce"),
    "blake over 4 KiB": ("blake_keyed", 4096, "keyed BLAKE2b over 4 KiB (why GMAC from 4 KiB)"),
}


def _count(script: str, what: str, size: int, n: int) -> int:
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                          os.path.realpath(sys.executable), script, what, str(size), str(n)],
                         capture_output=True, text=True, timeout=1800)
    m = re.search(r"Collected : (\d+)", out.stderr)
    if out.returncode or m is None:
        raise SystemExit(f"valgrind failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return int(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000, help="calls per point (default 2000)")
    ap.add_argument("--only", choices=sorted({p for p, _, _ in POINTS.values()}),
                    help="one primitive")
    args = ap.parse_args()
    if args.calls < 1:
        ap.error("--calls must be at least 1")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(CHILD)
    try:
        for name, (what, size, text) in POINTS.items():
            if args.only and what != args.only:
                continue
            calls = _count(f.name, what, size, args.calls)
            per = (calls - _count(f.name, what, size, 0)) / args.calls
            print(f"{name:22s} {per:10,.0f} instructions per call   {text}", flush=True)
    finally:
        os.unlink(f.name)


if __name__ == "__main__":
    main()
