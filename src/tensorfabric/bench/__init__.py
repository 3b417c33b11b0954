"""Benchmarks: ``tensorfabric bench`` and the programs under ``bench/``.

Every figure is a ratio to a baseline measured in the same run on the same machine: a raw
Python socket pair for tcp, a numpy copy into a pre-faulted buffer for shm, a raw socket
ping-pong for latency.
"""

from __future__ import annotations

from ._baselines import RawSocketPeer, memcpy_timing
from ._plot import plot_rows
from ._runner import ALL_OPS, BenchConfig, BenchReport, run_bench
from ._stats import Row, Timing, format_table, human_size, integrity_table, parse_size

__all__ = [
    # running
    "BenchConfig",
    "BenchReport",
    "run_bench",
    "ALL_OPS",
    # results
    "Row",
    "Timing",
    "format_table",
    "integrity_table",
    "plot_rows",
    # baselines
    "RawSocketPeer",
    "memcpy_timing",
    # helpers
    "human_size",
    "parse_size",
]
