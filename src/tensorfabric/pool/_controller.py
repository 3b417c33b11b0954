"""The pool controller: one detached Ray actor on the head node.

It keeps what Ray does not: verification records (score, reason) per node, and the
deployments with their replicas. Ray places everything (placement groups with label
selectors); the controller chooses the order in which to ask and watches for failures.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from . import _labels as L
from ._compile import NodeView, Placement, compile_spec, match
from ._client import NAMESPACE
from ._errors import PlacementError, PoolError
from ._replica import ReplicaHost
from ._spec import DeploymentSpec
from ._verify import judge, measure_node

MONITOR_PERIOD_S = 0.25
PING_TIMEOUT_S = 2.0
VERIFY_BYTES = 16 * 2**20


@dataclass
class Replica:
    index: int
    actor: Any
    pg: Any
    node_id: str
    zone: str
    selector: dict[str, str]
    state: str = "ready"
    misses: int = 0


@dataclass
class Deployment:
    spec: DeploymentSpec
    replicas: dict[int, Replica] = field(default_factory=dict)
    state: str = "deploying"
    ready_s: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)
    pending: set[int] = field(default_factory=set)  # replica indexes waiting for a node
    lost_at: dict[int, tuple[float, str, str]] = field(default_factory=dict)


class PoolController:
    """Wrapped with ``ray.remote`` by :func:`get_or_create_controller`."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._verified: dict[str, dict[str, Any]] = {}
        self._deployments: dict[str, Deployment] = {}
        self._engine: Any = None
        self._stop = threading.Event()
        self._replica_cls: Any = ray.remote(ReplicaHost)
        self._probe = ray.remote(measure_node)
        self._monitor = threading.Thread(target=self._monitor_loop, daemon=True)
        self._monitor.start()

    # ---------------------------------------------------------------- nodes
    def nodes(self) -> list[NodeView]:
        from ray._private.state import available_resources_per_node

        avail = available_resources_per_node()
        views = []
        for n in ray.nodes():
            nid = n["NodeID"]
            rec = self._verified.get(nid, {})
            views.append(NodeView(
                node_id=nid, alive=bool(n["Alive"]), labels=dict(n.get("Labels") or {}),
                total_gpus=float(n.get("Resources", {}).get("GPU", 0.0)),
                available_gpus=float(avail.get(nid, {}).get("GPU", 0.0)),
                is_head="node:__internal_head__" in n.get("Resources", {}),
                verified=bool(rec.get("verified")), score=float(rec.get("score", 0.0)),
                verify_reason=str(rec.get("reason", "")),
            ))  # fmt: skip
        return views

    def verify(self, node_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """Measure one node's claims now; record and return the verdict."""
        import hashlib

        import tensorfabric as tf

        view = next((n for n in self.nodes() if n.node_id == node_id and n.alive), None)
        if view is None or view.claims is None:
            raise PoolError(f"node {node_id[:12]} is not an alive pool node")
        eng = self._get_engine()
        buf = eng.alloc(VERIFY_BYTES, access=tf.Access.REMOTE_WRITE)
        imm = int.from_bytes(os.urandom(4), "little") | 1
        try:
            landed = eng.expect(imm, 1, timeout=timeout)
            ref = self._probe.options(
                label_selector={L.NODE_ID: node_id}, num_cpus=0, max_retries=0
            ).remote(view.labels, buf.descriptor().to_bytes(), VERIFY_BYTES, imm, timeout)
            measured = ray.get(ref, timeout=timeout)
            sha = None
            if "error" not in measured:
                landed.wait(timeout)
                sha = hashlib.sha256(buf.array.tobytes()).hexdigest()
        except Exception as exc:  # node died or hung: record it as unverified, with the reason
            measured, sha = {"error": f"{type(exc).__name__}: {exc}"}, None
        finally:
            eng.unregister(buf)
        ok, reason = judge(view.claims, measured, sha)
        rec = {"verified": ok, "reason": reason, "score": round(measured.get("gflops", 0.0), 1),
               "measured": measured, "time": time.time()}  # fmt: skip
        with self._lock:
            self._verified[node_id] = rec
        return rec

    def verify_pending(self, timeout: float = 60.0) -> dict[str, dict[str, Any]]:
        """Verify every alive pool node that has no record yet (all at once)."""
        from concurrent.futures import ThreadPoolExecutor

        todo = [n.node_id for n in self.nodes() if n.alive and not n.is_head
                and n.claims is not None and n.node_id not in self._verified]  # fmt: skip

        def one(node_id: str) -> dict[str, Any]:
            try:
                return self.verify(node_id, timeout)
            except PoolError as exc:  # it died meanwhile: skip it, verify the others
                return {"verified": False, "reason": str(exc), "score": 0.0}

        with ThreadPoolExecutor(max_workers=8) as ex:
            return dict(zip(todo, ex.map(one, todo)))

    def _get_engine(self) -> Any:
        with self._lock:
            return self._make_engine()

    def _make_engine(self) -> Any:
        if self._engine is None:
            import tensorfabric as tf

            self._engine = tf.Engine(host=ray.util.get_node_ip_address(), port=0, name="pool")
        return self._engine

    # ---------------------------------------------------------- deployments
    def deploy(self, spec_dict: dict[str, Any]) -> dict[str, Any]:
        """Place all replicas (all or nothing) and wait until each answers; return status."""
        spec = DeploymentSpec.from_dict(spec_dict)
        t0 = time.perf_counter()
        placement = compile_spec(spec, self.nodes())
        with self._lock:
            if spec.name in self._deployments:
                raise PoolError(
                    f"deployment {spec.name!r} exists; remove it first with "
                    f"'tensorfabric pool down --deployment {spec.name}'"
                )
            dep = self._deployments[spec.name] = Deployment(spec)
        try:
            for i in range(spec.replicas):
                zones = [r.zone for r in dep.replicas.values()]
                rep = self._place(spec, i, placement.preferring_other_zones(zones))
                if rep is None:
                    raise PlacementError(
                        f"deployment {spec.name!r}: replica {i} found no free node within "
                        f"{spec.placement_timeout_s:g} s; nodes matching "
                        f"[{', '.join(placement.descriptions)}] are busy (their GPUs are "
                        "taken by other work)",
                        requirement="capacity", deployment=spec.name,
                    )  # fmt: skip
                dep.replicas[i] = rep
        except BaseException:
            with self._lock:
                self._deployments.pop(spec.name, None)
            for rep in list(dep.replicas.values()):
                self._discard(rep)
            raise
        dep.state, dep.ready_s = "ready", time.perf_counter() - t0
        return self._dep_status(dep)

    def _place(self, spec: DeploymentSpec, index: int, selectors: list[dict[str, str]]) -> Replica | None:
        bundle = {k: v for k, v in (("GPU", spec.num_gpus), ("CPU", spec.num_cpus)) if v > 0}
        nodes = [n for n in self.nodes() if n.alive]
        tried: list[str] = []
        for sel in selectors:
            key = repr(sorted(sel.items()))
            fits = [n for n in nodes if match(n.labels, sel) and n.total_gpus >= spec.num_gpus]
            if key in tried or not fits:
                continue
            tried.append(key)
            # Ray's free-resource view can lag by a second: where it says "busy", still ask
            # Ray, but wait briefly so a truly busy candidate does not cost the full timeout.
            free = any(n.available_gpus >= spec.num_gpus for n in fits)
            wait_s = spec.placement_timeout_s if free else min(1.5, spec.placement_timeout_s)
            pg = placement_group([bundle or {"CPU": 0.001}], bundle_label_selector=[sel])
            if not pg.wait(wait_s):
                remove_placement_group(pg)
                continue
            actor = self._replica_cls.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, 0),
                num_gpus=spec.num_gpus, num_cpus=spec.num_cpus, max_concurrency=8,
                name=f"{spec.name}-{index}-{os.urandom(3).hex()}", namespace=NAMESPACE,
            ).remote(spec.run.kind, spec.run.target, spec.run.args, spec.run.kwargs,
                     spec.name, index)  # fmt: skip
            try:
                where = ray.get(actor.ready.remote(), timeout=max(30.0, spec.placement_timeout_s))
            except Exception as exc:
                ray.kill(actor, no_restart=True)
                remove_placement_group(pg)
                raise PoolError(
                    f"replica {index} of {spec.name!r} failed to start ({spec.run.kind} "
                    f"{spec.run.target}): {_first_line(exc)}"
                ) from None
            return Replica(index, actor, pg, where["node_id"], where["labels"].get(L.ZONE, "?"), sel)
        return None

    def _discard(self, rep: Replica) -> None:
        try:
            ray.kill(rep.actor, no_restart=True)
        except Exception:
            pass
        try:
            remove_placement_group(rep.pg)
        except Exception:
            pass

    def remove(self, name: str | None = None) -> list[str]:
        """Remove one deployment (or all with ``name=None``); return the names removed."""
        with self._lock:
            names = [name] if name else list(self._deployments)
            for n in names:
                dep = self._deployments.pop(n, None)
                if dep is None:
                    raise PoolError(f"no deployment named {n!r}")
                for rep in dep.replicas.values():
                    self._discard(rep)
            return names

    def replica_handles(self, name: str) -> list[Any]:
        with self._lock:
            dep = self._deployments.get(name)
            if dep is None:
                raise PoolError(f"no deployment named {name!r}; see 'tensorfabric pool status'")
            return [r.actor for r in dep.replicas.values() if r.state == "ready"]

    # -------------------------------------------------------------- failover
    def _monitor_loop(self) -> None:
        while not self._stop.wait(MONITOR_PERIOD_S):
            try:
                self._check_once()
            except Exception:  # keep watching; a transient GCS error must not end failover
                traceback.print_exc()

    def _check_once(self) -> None:
        with self._lock:
            deps = list(self._deployments.values())
        if not deps:
            return
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        for dep in deps:
            reps = [r for r in dep.replicas.values() if r.state == "ready"]
            pings = {r.index: r.actor.ping.remote() for r in reps if r.node_id in alive}
            ready, _ = ray.wait(list(pings.values()), num_returns=len(pings), timeout=PING_TIMEOUT_S)
            for rep in reps:
                ref = pings.get(rep.index)
                if ref is None:
                    self._lose(dep, rep, "node died")
                    continue
                if ref not in ready:
                    rep.misses += 1
                    if rep.misses >= 3:
                        self._lose(dep, rep, "stopped answering")
                    continue
                try:
                    ray.get(ref, timeout=0)
                    rep.misses = 0
                except Exception as exc:
                    self._lose(dep, rep, f"replica died: {type(exc).__name__}")
            self._replace_pending(dep)

    def _lose(self, dep: Deployment, rep: Replica, why: str) -> None:
        with self._lock:
            rep.state = "lost"
            dep.replicas.pop(rep.index, None)
            dep.pending.add(rep.index)
            dep.lost_at[rep.index] = (time.perf_counter(), rep.zone, rep.node_id)
            dep.state = "recovering"
            dep.events.append({"time": time.time(), "event": "lost", "replica": rep.index,
                               "node": rep.node_id, "zone": rep.zone, "why": why})  # fmt: skip
        self._discard(rep)

    def _replace_pending(self, dep: Deployment) -> None:
        for index in sorted(dep.pending):
            t_lost, dead_zone, dead_node = dep.lost_at[index]
            try:
                placement = compile_spec(dep.spec, self.nodes())
                rep = self._place(dep.spec, index, _failover_order(placement, dead_zone, dep))
            except PlacementError as exc:
                dep.state = f"degraded: {exc}"
                continue
            with self._lock:
                if dep.spec.name not in self._deployments:  # removed meanwhile
                    self._discard(rep) if rep else None
                    return
                if rep is None:
                    dep.state = "degraded: no free matching node; waiting for one"
                    continue
                dep.replicas[index] = rep
                dep.pending.discard(index)
                dep.events.append({
                    "time": time.time(), "event": "replaced", "replica": index,
                    "from_node": dead_node, "from_zone": dead_zone, "node": rep.node_id,
                    "zone": rep.zone, "recovery_s": round(time.perf_counter() - t_lost, 3),
                })  # fmt: skip
                if not dep.pending:
                    dep.state = "ready"

    # ---------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        views = self.nodes()
        nodes = []
        for n in views:
            rec = self._verified.get(n.node_id, {})
            nodes.append({"node_id": n.node_id, "alive": n.alive, "head": n.is_head,
                          "labels": n.labels, "verified": n.verified, "score": n.score,
                          "reason": rec.get("reason", ""), "gpus": n.total_gpus,
                          "gpus_free": n.available_gpus})  # fmt: skip
        with self._lock:
            deps = [self._dep_status(d) for d in self._deployments.values()]
        return {"nodes": nodes, "deployments": deps}

    def _dep_status(self, dep: Deployment) -> dict[str, Any]:
        return {
            "name": dep.spec.name, "state": dep.state, "desired": dep.spec.replicas,
            "ready": sum(r.state == "ready" for r in dep.replicas.values()),
            "ready_s": round(dep.ready_s, 3),
            "replicas": [{"index": r.index, "node_id": r.node_id, "zone": r.zone,
                          "state": r.state} for r in dep.replicas.values()],
            "events": list(dep.events),
        }  # fmt: skip

    def shutdown(self) -> None:
        self._stop.set()
        self.remove(None)
        if self._engine is not None:
            self._engine.close()


def _failover_order(placement: Placement, dead_zone: str, dep: Deployment) -> list[dict[str, str]]:
    """Away from the dead zone and the other replicas' zones, then away from the dead zone,
    then anywhere the spec allows."""
    used = {r.zone for r in dep.replicas.values()}
    seen, order = set(), []
    for sels in (placement.preferring_other_zones(used | {dead_zone}),
                 placement.preferring_other_zones({dead_zone}), placement.candidates):  # fmt: skip
        for sel in sels:
            key = repr(sorted(sel.items()))
            if key not in seen:
                seen.add(key)
                order.append(sel)
    return order


def _first_line(exc: BaseException) -> str:
    """The user's error out of a RayTaskError/RayActorError wrapper, on one line."""
    cause = getattr(exc, "cause", None) or exc
    lines = [ln for ln in str(cause).strip().splitlines() if ln.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"
