#!/usr/bin/env python
"""MoE dispatch and combine latency: tensorfabric.moe against torch.distributed
all_to_all_single on gloo and a raw-socket all-to-all moving the same bytes between the same
processes, and the same MoE layer built on gloo (its counts exchange included), in
alternation, in one run (``tensorfabric bench --moe`` runs the same code)::

    PYTHONPATH=src python bench/moe.py                                  # the full sweep
    PYTHONPATH=src python bench/moe.py --points 2x128x2048x64,4x128x2048x64 --iters 20
    PYTHONPATH=src python bench/moe.py --transport netns --points 4x128x7168x256   # root

Points are EPxTOKENSxHIDDENxEXPERTS[xTOPK] (top-k 8 by default); tokens are bfloat16 torch
tensors; experts are the identity, so what is timed is the layer's communication and
bookkeeping. Needs torch (the gloo baseline).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from tensorfabric.bench._moe import format_moe, moe_config, run_moe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", help="comma list of EPxTOKENSxHIDDENxEXPERTS[xTOPK]")
    ap.add_argument("--transport", default="shm,tcp", help="comma list of shm, tcp, tcp-plain, netns")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--rate", default="10gbit", help="netns hosts' NIC rate")
    ap.add_argument("--quick", action="store_true", help="two small points, 10 iterations")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args()
    cfg = moe_config(args.points, args.transport, quick=args.quick,
                     iters=None if args.quick else args.iters)
    cfg.rate = args.rate
    def save(rows: list) -> None:  # after every point, so a later failure loses nothing
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))

    rows = run_moe(cfg, print, save)
    print(format_moe(rows))

    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")


if __name__ == "__main__":
    main()
