"""``--plot``: throughput against size per op and transport, with the baselines."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ._stats import Row, human_size


def plot_rows(rows: list[Row], path: str | Path, title: str = "tensorfabric bench") -> Path:
    """Draw one panel per op (write, read, pages) and save a PNG. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install 'tensorfabric[plot]'") from exc
    panels = [op for op in ("write", "read", "pages", "sendrecv") if any(r.op == op for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 4.2),
                             squeeze=False)
    for ax, op in zip(axes[0], panels):
        series: dict[str, list[tuple[float, float]]] = defaultdict(list)
        bases: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in rows:
            if r.op != op or r.gbps is None:
                continue
            x = float(r.page_size or r.size)
            label = f"{r.transport} x{r.links}" if r.links > 1 else r.transport
            series[label].append((x, r.gbps))
            if r.baseline_value is not None and op != "sendrecv":
                bases[f"{r.baseline} ({r.transport})"].append((x, r.baseline_value))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        for label, pts in sorted(bases.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", alpha=0.7, label=label)
        ax.set_xscale("log", base=2)
        ticks = sorted({int(p[0]) for pts in series.values() for p in pts})
        ax.set_xticks(ticks)
        ax.set_xticklabels([human_size(t).replace(" ", "") for t in ticks], rotation=45)
        ax.set_xlabel("page size" if op == "pages" else "message size")
        ax.set_ylabel("GB/s" if op != "sendrecv" else "GB/s (round trip, p50)")
        ax.set_title(op)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
