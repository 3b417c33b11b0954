"""Result rows, timing loops and table formatting for ``tensorfabric bench``."""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

KiB = 1024
MiB = 1024 * 1024
GiB = 1024 * MiB


@dataclass
class Row:
    """One measured point: an op on a transport with a link count at a size.

    ``gbps`` is GB/s (10^9 bytes/s) of payload, ``ops_per_s`` the op rate, ``p50_us`` and
    ``p99_us`` the latency of one op issued alone. ``ratio`` is ``gbps`` (or, for latency-bound
    ops, ``baseline p50 / p50``) over the baseline named in ``baseline`` measured in the same run.
    """

    op: str
    transport: str
    links: int
    size: int
    gbps: float | None
    ops_per_s: float
    p50_us: float
    p99_us: float
    baseline: str = ""
    baseline_value: float | None = None
    ratio: float | None = None
    page_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Timing:
    """Latencies of ops issued one at a time and the throughput of ops issued ``window`` at once."""

    latencies: list[float]
    window: int
    batch_times: list[float]

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 99)

    @property
    def per_op(self) -> float:
        """Median seconds per op in the windowed (throughput) run."""
        return statistics.median(self.batch_times) / self.window


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def repeat(fn: Callable[[], None], budget_s: float, min_reps: int, max_reps: int) -> list[float]:
    """Call ``fn`` once to warm up, then until ``budget_s`` is spent (within the rep bounds).

    Returns the duration of every timed call in seconds.
    """
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= min_reps and time.perf_counter() - start >= budget_s:
            break
    return times


def window_for(size: int, cap: int = 64, bytes_in_flight: int = 4 * MiB) -> int:
    """How many ops to keep in flight when measuring throughput of ``size``-byte ops."""
    return max(1, min(cap, bytes_in_flight // max(1, size)))


def human_size(n: int) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"


_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}


def parse_size(text: str) -> int:
    """``"4k"``, ``"64KiB"``, ``"1m"``, ``"256MiB"``, ``"1g"``, ``"512b"`` or a plain byte count
    (units are powers of 1024). Raises ValueError naming the text for anything else, and for a
    size under one byte."""
    match = _SIZE.fullmatch(str(text).strip())
    if match is None:
        raise ValueError(f"{text!r} is not a size: use a byte count or a number with k, m or g "
                         "(e.g. 4096, 64k, 1m, 1.5g)")
    value = int(float(match[1]) * _UNITS[match[2].lower()])
    if value <= 0:
        raise ValueError(f"size must be at least one byte: {text!r}")
    return value


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or value != value:
        return "-"
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


COLUMNS = ("op", "transport", "links", "size", "GB/s", "ops/s", "p50 us", "p99 us",
           "baseline", "ratio")


def row_cells(row: Row) -> list[str]:
    size = human_size(row.size)
    if row.page_size:
        size = f"{size} ({human_size(row.page_size)} pages)"
    return [row.op, row.transport, str(row.links), size, fmt(row.gbps), fmt(row.ops_per_s, 0),
            fmt(row.p50_us, 1), fmt(row.p99_us, 1), row.baseline, fmt(row.ratio)]


def format_table(rows: list[Row]) -> str:
    """A plain-text table (what ``--json`` does not need and a terminal without rich gets)."""
    cells = [list(COLUMNS)] + [row_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c[i].rjust(widths[i]) if i >= 2 else c[i].ljust(widths[i])
                       for i in range(len(COLUMNS))) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def integrity_table(rows: list[Row], plain: str = "tcp-plain") -> str:
    """Each tcp variant's figure as a ratio to the plain link (frame MACs off) at the same op
    and size, from the same run. Where both have a baseline ratio (each measured in alternation
    with its own raw-socket baseline) it is the ratio of those; else the throughput ratio, or
    for latency-bound ops plain p50 / p50."""
    base = {(r.op, r.size, r.page_size): r for r in rows if r.transport == plain}
    lines = [f"{'op':<9} {'size':>8}  " + "  ".join(f"{t:>12}" for t in ("tcp (mac)", "tcp-tls"))]
    keys = sorted({(r.op, r.size, r.page_size) for r in rows if r.transport != plain},
                  key=lambda k: (k[0], k[1], k[2] or 0))
    for key in keys:
        b = base.get(key)
        cells = []
        for t in ("tcp", "tcp-tls"):
            r = next((x for x in rows if x.transport == t and (x.op, x.size, x.page_size) == key),
                     None)
            if r is None or b is None:
                cells.append("-")
            elif r.ratio and b.ratio:  # each against its own raw baseline, alternated: the
                cells.append(f"{r.ratio / b.ratio:.2f}")  # steadiest on a busy machine
            elif r.gbps and b.gbps and key[1] >= 64 * KiB:
                cells.append(f"{r.gbps / b.gbps:.2f}")
            else:
                cells.append(f"{b.p50_us / r.p50_us:.2f}")
        size = human_size(key[2] or key[1]) if key[0] == "pages" else human_size(key[1])
        lines.append(f"{key[0]:<9} {size:>8}  " + "  ".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)
