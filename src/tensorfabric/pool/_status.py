"""``tensorfabric pool status`` tables (rich)."""

from __future__ import annotations

import time
from typing import Any

from . import _labels as L


def render(status: dict[str, Any], console: Any = None) -> None:
    """Print the node and deployment tables of a controller ``status()`` dict."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    nodes = Table(title="nodes")
    for col in ("node", "state", "region", "zone", "country", "provider", "gpu", "mem GB",
                "link", "GPUs used", "verified", "score"):  # fmt: skip
        nodes.add_column(col)
    notes: list[str] = []
    for n in sorted(status["nodes"], key=lambda n: (not n["head"], n["labels"].get(L.REGION, ""))):
        lab = n["labels"]
        if n["head"]:
            verified = "head"
        elif L.REGION not in lab:
            verified = "not a pool node"
        else:
            verified = "yes" if n["verified"] else ("drained" if n.get("drained") else "no")
            if not n["verified"] and n["alive"]:
                notes.append(f"node {n['node_id'][:12]} unverified: {n['reason'] or 'not verified yet'}")
        used = f"{n['gpus'] - n['gpus_free']:g}/{n['gpus']:g}" if n["alive"] else "-"
        nodes.add_row(
            n["node_id"][:8], "alive" if n["alive"] else "dead", lab.get(L.REGION, "-"),
            lab.get(L.ZONE, "-"), lab.get(L.COUNTRY, "-"), lab.get(L.PROVIDER, "-"),
            lab.get(L.GPU_MODEL, "-") + (" (sim)" if lab.get(L.SIMULATED) == "true" else ""),
            lab.get(L.GPU_MEMORY_GB, "-"), lab.get(L.LINK_TIER, "-"), used, verified,
            f"{n['score']:.1f}" if n["score"] else "-",
        )  # fmt: skip
    console.print(nodes)
    for note in notes:
        console.print(note, soft_wrap=True)
    deps = Table(title="deployments")
    dep_notes: list[str] = []
    for col in ("name", "state", "ready", "deploy s", "replicas", "last event"):
        deps.add_column(col)
    if status.get("state_error"):
        dep_notes.append(f"the pool state could not be saved: {status['state_error']}")
    for d in status["deployments"]:
        reps = ", ".join(f"{r['index']}@{r['zone']}({r['node_id'][:6]})" for r in d["replicas"])
        state, _, detail = d["state"].partition(": ")
        if detail:
            dep_notes.append(f"deployment {d['name']} {state}: {detail}")
        deps.add_row(d["name"], state, f"{d['ready']}/{d['desired']}", f"{d['ready_s']:.2f}",
                     reps, _event(d["events"][-1]) if d["events"] else "-")  # fmt: skip
    console.print(deps)
    for note in dep_notes:
        console.print(note, soft_wrap=True)


def _event(e: dict[str, Any]) -> str:
    ago = time.time() - e["time"]
    if e["event"] == "replaced":
        return (f"replica {e['replica']} moved {e['from_zone']} -> {e['zone']} in "
                f"{e['recovery_s']:.2f} s ({ago:.0f} s ago)")  # fmt: skip
    if e["event"] == "lost":
        return f"replica {e['replica']} lost in {e['zone']}: {e['why']} ({ago:.0f} s ago)"
    if e["event"] == "node_lost_during_start":
        return f"replica {e['replica']}: node {e['node'][:8]} in {e['zone']} died while it started ({ago:.0f} s ago)"
    if e["event"] == "restored":
        return f"restored after a controller restart: {e['adopted']} adopted, {e['pending']} to place ({ago:.0f} s ago)"
    return f"{e['event']} ({ago:.0f} s ago)"
