"""Compile a :class:`DeploymentSpec` into Ray label selectors, against the live node table.

Ray's selectors have equality, ``!v``, ``in(..)`` and ``!in(..)`` only, so wildcards
(``eu-*``), minimums (memory, link tier) and ``verified_only`` are expanded here into the
concrete values present in the cluster right now. The requirements are applied in a fixed
order; when nothing survives one, :class:`PlacementError` names it, with what *is* there.
Ray does the placing; this module only says where Ray may place.
"""

from __future__ import annotations

import fnmatch
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from . import _labels as L
from ._errors import PlacementError
from ._spec import DeploymentSpec


@dataclass
class NodeView:
    """One node as the pool sees it: Ray's facts plus the controller's verification record."""

    node_id: str
    alive: bool
    labels: dict[str, str]
    total_gpus: float = 0.0
    available_gpus: float = 0.0
    is_head: bool = False
    verified: bool = False
    score: float = 0.0
    verify_reason: str = ""
    drained: bool = False  # a later check failed: no new work, its replicas move

    @property
    def claims(self) -> L.NodeClaims | None:
        return L.NodeClaims.from_labels(self.labels)


@dataclass
class Placement:
    """Ordered candidate selectors for one deployment (most preferred first)."""

    candidates: list[dict[str, str]]
    descriptions: list[str]
    eligible: list[NodeView] = field(default_factory=list)

    def ray_options(self) -> dict[str, Any]:
        """Options for ``.options(**...)`` on a Ray task or actor: Ray does the fallback."""
        opts: dict[str, Any] = {"label_selector": self.candidates[0]}
        if len(self.candidates) > 1:
            opts["fallback_strategy"] = [{"label_selector": c} for c in self.candidates[1:]]
        return opts

    def preferring_other_zones(self, zones: Iterable[str], *, then_all: bool = True) -> list[dict[str, str]]:
        """Candidates that avoid ``zones`` first (where some eligible node allows it), then
        (``then_all``) all of them."""
        zones = sorted(set(zones))
        if not zones:
            return list(self.candidates) if then_all else []
        avoid = zones[0] if len(zones) == 1 else f"in({','.join(zones)})"
        preferred = []
        for cand in self.candidates:
            sel = {**cand, L.ZONE: "!" + avoid}
            if any(match(n.labels, sel) for n in self.eligible):
                preferred.append(sel)
        return preferred + list(self.candidates) if then_all else preferred


def match(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    """Whether node ``labels`` satisfy a Ray label ``selector`` (all keys ANDed)."""
    for key, expr in selector.items():
        negate, values = _parse_expr(expr)
        hit = labels.get(key) in values
        if hit == negate:
            return False
    return True


@functools.lru_cache(maxsize=4096)
def _parse_expr(expr: str) -> tuple[bool, frozenset[str]]:
    """(negated, values) of one selector expression; cached: a verified-only selector lists
    every eligible node id, and parsing it per node made matching quadratic."""
    negate = expr.startswith("!")
    body = expr[1:] if negate else expr
    values = [v.strip() for v in body[3:-1].split(",")] if body.startswith("in(") else [body]
    return negate, frozenset(values)


def _one_of(values: Iterable[str]) -> str:
    vals = sorted(set(values))
    return vals[0] if len(vals) == 1 else f"in({','.join(vals)})"


def _present(nodes: Sequence[NodeView], key: str) -> list[str]:
    return sorted({n.labels.get(key, "?") for n in nodes})


Step = tuple[str, Callable[[NodeView], bool], Callable[[list[NodeView]], str]]


def compile_spec(spec: DeploymentSpec, nodes: Sequence[NodeView]) -> Placement:
    """Candidate selectors for ``spec`` given ``nodes``; raise PlacementError if none can fit."""
    pool_nodes = [n for n in nodes if n.alive and not n.is_head and n.claims is not None]
    survivors = [n for n in pool_nodes if not n.drained]
    if not survivors:
        raise PlacementError(
            f"deployment {spec.name!r}: no pool node is alive"
            + (f" ({len(pool_nodes)} drained after failing a re-check)" if pool_nodes else "")
            + "; join one with 'tensorfabric pool join'",
            requirement="nodes",
            deployment=spec.name,
        )
    selector: dict[str, str] = {}
    for requirement, keep, explain in _steps(spec, survivors):
        kept = [n for n in survivors if keep(n)]
        if not kept:
            raise PlacementError(
                f"deployment {spec.name!r} cannot be placed: unmet requirement {requirement}: "
                f"{explain(survivors)}",
                requirement=requirement.split(" ")[0].split("=")[0],
                deployment=spec.name,
            )
        survivors = kept
    selector = _base_selector(spec, survivors)
    drained = [n.node_id for n in pool_nodes if n.drained]
    if drained and L.NODE_ID not in selector:
        selector[L.NODE_ID] = "!" + _one_of(drained)  # keep Ray off nodes that failed a re-check
    _check_capacity(spec, survivors)
    return _candidates(spec, selector, survivors)


def _steps(spec: DeploymentSpec, nodes: list[NodeView]) -> list[Step]:
    steps: list[Step] = []
    if not spec.allow_simulated:
        steps.append((
            "allow_simulated=false",
            lambda n: n.labels.get(L.SIMULATED) != "true",
            lambda ns: f"all {len(ns)} candidate nodes run simulated GPUs; set allow_simulated: "
            "true to use them (tests and development only)",
        ))  # fmt: skip
    if spec.regions:
        steps.append((
            f"regions={list(spec.regions)}",
            lambda n: any(fnmatch.fnmatchcase(n.labels[L.REGION], p) for p in spec.regions),
            lambda ns: f"no node is in a matching region (regions present: "
            f"{', '.join(_present(ns, L.REGION))})",
        ))  # fmt: skip
    if spec.countries:
        steps.append((
            f"countries={list(spec.countries)}",
            lambda n: n.labels.get(L.COUNTRY) in spec.countries,
            lambda ns: f"no matching node is in those countries (present: "
            f"{', '.join(_present(ns, L.COUNTRY))})",
        ))  # fmt: skip
    if spec.providers:
        steps.append((
            f"providers={list(spec.providers)}",
            lambda n: n.labels.get(L.PROVIDER) in spec.providers,
            lambda ns: f"no matching node has those provider kinds (present: "
            f"{', '.join(_present(ns, L.PROVIDER))})",
        ))  # fmt: skip
    if spec.gpus:
        steps.append((
            f"gpus={list(spec.gpus)}",
            lambda n: n.labels.get(L.GPU_MODEL) in spec.gpus,
            lambda ns: f"no matching node has any of those GPU models (models present: "
            f"{', '.join(_present(ns, L.GPU_MODEL))})",
        ))  # fmt: skip
    if spec.min_gpu_memory_gb > 0:
        steps.append((
            f"min_gpu_memory_gb={spec.min_gpu_memory_gb:g}",
            lambda n: _mem(n) >= spec.min_gpu_memory_gb,
            lambda ns: f"the largest GPU memory among matching nodes is "
            f"{max(_mem(n) for n in ns):g} GB",
        ))  # fmt: skip
    if spec.min_link_tier != "low":
        ok = L.tiers_at_least(spec.min_link_tier)
        steps.append((
            f"min_link_tier={spec.min_link_tier}",
            lambda n: n.labels.get(L.LINK_TIER) in ok,
            lambda ns: f"matching nodes have link tiers {', '.join(_present(ns, L.LINK_TIER))}",
        ))  # fmt: skip
    if spec.verified_only:
        steps.append((
            "verified_only=true",
            lambda n: n.verified,
            lambda ns: f"{len(ns)} node(s) match the other requirements but none passed "
            "verification (" + "; ".join(
                f"{n.node_id[:8]}: {n.verify_reason or 'not verified yet'}" for n in ns[:4]
            ) + ")",
        ))  # fmt: skip
    if spec.min_score > 0:
        steps.append((
            f"min_score={spec.min_score:g}",
            lambda n: n.verified and n.score >= spec.min_score,
            lambda ns: f"best verified score among matching nodes is "
            f"{max((n.score for n in ns if n.verified), default=0):.1f}",
        ))  # fmt: skip
    if spec.num_gpus > 0:
        steps.append((
            f"num_gpus={spec.num_gpus:g}",
            lambda n: n.total_gpus >= spec.num_gpus,
            lambda ns: f"matching nodes have at most {max(n.total_gpus for n in ns):g} GPU(s)",
        ))  # fmt: skip
    return steps


def _mem(node: NodeView) -> float:
    try:
        return float(node.labels.get(L.GPU_MEMORY_GB, "0"))
    except ValueError:
        return 0.0


def _base_selector(spec: DeploymentSpec, nodes: list[NodeView]) -> dict[str, str]:
    sel: dict[str, str] = {}
    if not spec.allow_simulated:
        sel[L.SIMULATED] = "!true"
    if spec.regions:
        sel[L.REGION] = _one_of(n.labels[L.REGION] for n in nodes)
    if spec.countries:
        sel[L.COUNTRY] = _one_of(n.labels[L.COUNTRY] for n in nodes)
    if spec.providers:
        sel[L.PROVIDER] = _one_of(n.labels[L.PROVIDER] for n in nodes)
    if spec.min_gpu_memory_gb > 0:
        sel[L.GPU_MEMORY_GB] = _one_of(n.labels[L.GPU_MEMORY_GB] for n in nodes)
    if spec.min_link_tier != "low":
        sel[L.LINK_TIER] = _one_of(n.labels[L.LINK_TIER] for n in nodes)
    if spec.verified_only or spec.min_score > 0:
        sel[L.NODE_ID] = _one_of(n.node_id for n in nodes)
    return sel


def _check_capacity(spec: DeploymentSpec, nodes: list[NodeView]) -> None:
    if spec.num_gpus <= 0:
        return
    slots = sum(math.floor(n.total_gpus / spec.num_gpus + 1e-9) for n in nodes)
    if slots < spec.replicas:
        raise PlacementError(
            f"deployment {spec.name!r} cannot be placed: unmet requirement replicas="
            f"{spec.replicas}: it needs {spec.replicas} x {spec.num_gpus:g} GPU but the "
            f"{len(nodes)} matching node(s) hold {slots} such slot(s) in total",
            requirement="replicas",
            deployment=spec.name,
        )


def _candidates(spec: DeploymentSpec, base: dict[str, str], nodes: list[NodeView]) -> Placement:
    if not spec.gpus:
        return Placement([base], ["any GPU"], nodes)
    present = {n.labels.get(L.GPU_MODEL) for n in nodes}
    cands, descs = [], []
    for gpu in spec.gpus:  # the spec's order is the preference order
        if gpu in present:
            cands.append({**base, L.GPU_MODEL: gpu})
            descs.append(f"gpu={gpu}")
    return Placement(cands, descs, nodes)


MAX_SELECTOR_IDS = 64  # a node-id list in a placement group's selector names at most this many


def narrow_ids(sel: dict[str, str], fits: list[NodeView], gpus: float) -> dict[str, str]:
    """Bound a node-id list (``verified_only`` lists every eligible node) to the first
    MAX_SELECTOR_IDS matching nodes with free GPUs: Ray keeps each placement group's selector,
    and at 10,000 nodes the full list is ~0.5 MB per replica."""
    expr = sel.get(L.NODE_ID, "")
    if not expr.startswith("in(") or expr.count(",") < MAX_SELECTOR_IDS:
        return sel
    free = [n.node_id for n in fits if n.available_gpus >= gpus] or [n.node_id for n in fits]
    return {**sel, L.NODE_ID: f"in({','.join(free[:MAX_SELECTOR_IDS])})"}


def no_node_message(spec: DeploymentSpec, index: int, placement: Placement, lost: list[str]) -> str:
    if lost:
        return (f"deployment {spec.name!r}: replica {index} lost its node"
                f"{'s' if len(lost) > 1 else ''} {', '.join(n[:12] for n in lost)} while it "
                f"started, and no other node matching [{', '.join(placement.descriptions)}] was "
                f"free within {spec.placement_timeout_s:g} s")  # fmt: skip
    return (f"deployment {spec.name!r}: replica {index} found no free node within "
            f"{spec.placement_timeout_s:g} s; nodes matching [{', '.join(placement.descriptions)}] "
            "are busy (their GPUs are taken by other work)")  # fmt: skip
