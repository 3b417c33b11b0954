"""Run a small `tensorfabric bench` sweep from Python and act on the ratios.

Two engines in two processes on this host; every figure comes with a baseline measured in the
same run (raw socket for tcp, memcpy for shm).

    PYTHONPATH=src python examples/bench_in_code.py
"""

from __future__ import annotations

from tensorfabric.bench import BenchConfig, format_table, run_bench
from tensorfabric.bench._stats import MiB


def main() -> None:
    cfg = BenchConfig(transports=("tcp", "shm"), ops=("write", "imm"),
                      sizes=(1 * MiB, 64 * MiB), budget_s=0.3)
    report = run_bench(cfg, progress=lambda step: print("...", step))
    print(format_table(report.rows))
    for row in report.rows:
        if row.op == "write" and row.size >= 64 * MiB and row.ratio is not None:
            print(f"{row.transport} 64 MiB write: {row.ratio:.2f} of {row.baseline}")


if __name__ == "__main__":
    main()
