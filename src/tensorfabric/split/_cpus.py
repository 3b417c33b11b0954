"""Tier placement on CPUs: ``edge.cpus`` and ``cloud.cpus`` (``"0"``, ``"2-3"``, ``"0,2-3"``).

Each tier pins its own process (every thread it has, and what it starts later) to its list; a
tier on vLLM binds its worker's OpenMP threads there too (``VLLM_CPU_OMP_THREADS_BIND`` while
its engine starts, unless the environment already says). A local cloud process is spawned on
its own list or on the CPUs serve itself started with, never on the edge's placement.
"""

from __future__ import annotations

import os
import sys

from ._errors import SplitConfigError

#: the CPUs this process could use when it started (before a tier pinned it)
START_CPUS: frozenset[int] = frozenset(
    os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else ())


def parse_cpus(key: str, text: str) -> frozenset[int]:
    """``"0,2-3"`` -> {0, 2, 3}; a SplitConfigError naming ``key`` on anything else."""
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise SplitConfigError(
                f"{key}: {text!r} is not a CPU list (like '0', '2-3' or '0,2-3')") from None
        if a < 0 or b < a or b - a > 4096:
            raise SplitConfigError(f"{key}: bad CPU range {part!r} in {text!r}")
        out.update(range(a, b + 1))
    return frozenset(out)


def cpu_text(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def resolve(key: str, text: str | None) -> frozenset[int] | None:
    """The CPUs a tier asks for, checked against those this process may use."""
    if text is None:
        return None
    cpus = parse_cpus(key, text)
    if not hasattr(os, "sched_setaffinity"):
        raise SplitConfigError(f"{key}: placing a tier on CPUs needs Linux (sched_setaffinity)")
    allowed = START_CPUS
    missing = cpus - allowed
    if missing:
        raise SplitConfigError(
            f"{key}: CPU(s) {cpu_text(frozenset(missing))} not available to this process "
            f"(it may use {cpu_text(allowed)})")
    return cpus


def pin_process(key: str, text: str | None) -> frozenset[int] | None:
    """Pin every thread of this process to the tier's CPUs (threads started later inherit) and
    size torch's thread pool to them. None: no list."""
    cpus = resolve(key, text)
    if cpus is None:
        return None
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, ValueError):
            pass  # a thread that ended meanwhile
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(len(cpus))
    return cpus


def child_cpus(text: str | None) -> frozenset[int]:
    """What a spawned cloud process starts on: its own list, else what serve started with."""
    return resolve("cloud.cpus", text) or START_CPUS


__all__ = ["START_CPUS", "child_cpus", "cpu_text", "parse_cpus", "pin_process", "resolve"]
