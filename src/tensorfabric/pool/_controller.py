"""The pool controller: one detached Ray actor on the head node.

It keeps what Ray does not: verification records (:mod:`._records`), and the deployments with
their replicas. Ray places everything (placement groups with label selectors, through
:mod:`._backend`); the controller chooses the order in which to ask and watches for failures.

Its state is durable (:mod:`._state`): saved after every change to Ray's internal KV and a
checkpoint file, and reloaded when the controller or the head restarts. Replicas are detached
named actors, so a restarted controller adopts the ones still running and places again the
ones that are gone.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from . import _labels as L
from ._backend import NodeLost, StartTimeout
from ._compile import NodeView, Placement, compile_spec, match, narrow_ids, no_node_message
from ._errors import PlacementError, PoolError
from ._records import VERIFY_TTL_S, VerificationBook, load_factor, node_key
from ._spec import DeploymentSpec
from ._state import StateStore

MONITOR_PERIOD_S = 0.25
PING_TIMEOUT_S = 2.0
VERIFY_SCAN_S = 10.0  # how often the controller looks for nodes due a (re-)check
MAX_NODE_LOSSES = 3  # node deaths one replica start may survive before the deploy gives up
EVENTS_KEPT = 50


@dataclass
class Replica:
    index: int
    actor: Any
    pg: Any
    node_id: str
    zone: str
    selector: dict[str, str]
    name: str = ""
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
    # replica index -> actor name while it starts: a restarted controller (after a head
    # restart that kept Ray's state) removes what such a start left behind, then places again
    starting: dict[int, str] = field(default_factory=dict)


class PoolController:
    """Wrapped with ``ray.remote`` by :func:`tensorfabric.pool._client.controller`.

    ``backend`` defaults to the live Ray cluster; the scale benchmark injects a simulated one.
    ``monitor=False`` leaves the failover and re-verification threads off (the benchmark
    calls :meth:`check_once` and :meth:`reverify_due` itself)."""

    def __init__(self, state_file: str | None = None, verify_ttl_s: float = VERIFY_TTL_S,
                 verify_scan_s: float = VERIFY_SCAN_S, *, backend: Any = None,
                 store: StateStore | None = None, monitor: bool = True) -> None:  # fmt: skip
        if backend is None:
            from ._backend import RayBackend

            backend = RayBackend()
        self._backend = backend
        self._lock = threading.RLock()
        self._deployments: dict[str, Deployment] = {}
        self._store = store or StateStore(state_file)
        self._book = VerificationBook(verify_ttl_s)
        self.restored = self._restore()
        self._book.on_change = lambda key, rec: self._store.put("rec", key, rec)
        self._stop = threading.Event()
        self._verifying: set[str] = set()
        self._threads = []
        if monitor:
            for fn, period in ((self.check_once, MONITOR_PERIOD_S), (self.reverify_due, verify_scan_s)):
                if period > 0:
                    t = threading.Thread(target=self._loop, args=(fn, period), daemon=True)
                    t.start()
                    self._threads.append(t)

    # ---------------------------------------------------------------- nodes
    def nodes(self) -> list[NodeView]:
        return self._book.annotate(self._backend.nodes())

    def _find_nodes(self, ids: list[str] | None) -> list[NodeView]:
        views = [n for n in self.nodes() if n.alive and not n.is_head and n.claims is not None]
        if ids is None:
            return views
        out = []
        for want in ids:
            hits = [n for n in views if n.node_id.startswith(want) or node_key(n).startswith(want)]
            if len(hits) != 1:
                raise PoolError(f"node {want!r} " + ("matches several nodes; give more of its id"
                                if hits else "is not an alive pool node; see 'tensorfabric pool status'"))  # fmt: skip
            out.append(hits[0])
        return out

    def verify(self, node_id: str, timeout: float | None = None, attempts: int = 3) -> dict[str, Any]:
        """Measure one node's claims now (retrying with backoff); record and return the
        verdict. A node that was verified and fails now is drained: its replicas move."""
        return self._verify_view(self._find_nodes([node_id])[0], timeout, attempts)

    def _verify_view(self, view: NodeView, timeout: float | None, attempts: int) -> dict[str, Any]:
        with self._lock:
            self._verifying.add(view.node_id)
        try:
            rec, newly_failed = self._book.verify(view, self._backend.measure, timeout, attempts)
        finally:
            with self._lock:
                self._verifying.discard(view.node_id)
        if newly_failed:
            self._drain(view.node_id, rec["reason"])
        return rec

    def verify_many(self, node_ids: list[str] | None = None, timeout: float | None = None,
                    attempts: int = 3) -> dict[str, dict[str, Any]]:  # fmt: skip
        """Verify the given nodes (all alive pool nodes with ``None``), eight at a time."""
        views = self._find_nodes(node_ids)
        return self._verify_all(views, timeout, attempts)

    def _verify_all(self, views: list[NodeView], timeout: float | None,
                    attempts: int) -> dict[str, dict[str, Any]]:  # fmt: skip
        def one(v: NodeView) -> dict[str, Any]:
            try:
                return self._verify_view(v, timeout, attempts)
            except Exception as exc:  # it died meanwhile: report it, verify the others
                return {"verified": False, "reason": f"{type(exc).__name__}: {exc}", "score": 0.0}

        if not views:
            return {}
        with ThreadPoolExecutor(max_workers=min(8, len(views))) as ex:
            return dict(zip((v.node_id for v in views), ex.map(one, views)))

    def verify_pending(self, timeout: float | None = None) -> dict[str, dict[str, Any]]:
        """Verify every alive pool node that is due: never checked, expiring, or rejoined."""
        with self._lock:
            busy = set(self._verifying)
        return self._verify_all([v for v in self._book.due(self.nodes()) if v.node_id not in busy],
                                timeout, 3)  # fmt: skip

    def reverify_due(self) -> None:
        """One pass of the schedule: check the nodes that are due (in the background loop)."""
        self.verify_pending()

    def _drain(self, node_id: str, reason: str) -> None:
        with self._lock:
            victims = [(d, r) for d in self._deployments.values() for r in d.replicas.values()
                       if r.node_id == node_id and r.state == "ready"]  # fmt: skip
        for dep, rep in victims:
            self._lose(dep, rep, f"node {node_id[:12]} drained: {reason}")

    # ---------------------------------------------------------- deployments
    def deploy(self, spec_dict: dict[str, Any]) -> dict[str, Any]:
        """Place all replicas (all or nothing) and wait until each answers; return status.
        A replica whose node dies while it starts is placed again on the next matching node."""
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
        self._save(dep)
        try:
            for i in range(spec.replicas):
                zones = [r.zone for r in dep.replicas.values()]
                rep, lost = self._place(dep, i, placement.preferring_other_zones(zones))
                if rep is None:
                    raise PlacementError(no_node_message(spec, i, placement, lost),
                                         requirement="capacity", deployment=spec.name)  # fmt: skip
                with self._lock:
                    dep.replicas[i] = rep
                self._save(dep)
        except BaseException:
            with self._lock:
                self._deployments.pop(spec.name, None)
            for rep in list(dep.replicas.values()):
                self._backend.discard(rep.actor, rep.pg)
            self._store.put("dep", spec.name, None)
            raise
        dep.state, dep.ready_s = "ready", time.perf_counter() - t0
        self._save(dep)
        return self._dep_status(dep)

    def _place(self, dep: Deployment, index: int,
               selectors: list[dict[str, str]]) -> tuple[Replica | None, list[str]]:  # fmt: skip
        """Try ``selectors`` in order; on a node loss, start over without that node."""
        spec = dep.spec
        bundle = {k: v for k, v in (("GPU", spec.num_gpus), ("CPU", spec.num_cpus)) if v > 0}
        lost: list[str] = []
        for _ in range(MAX_NODE_LOSSES + 1):
            nodes = [n for n in self.nodes() if n.alive and n.node_id not in lost and not n.drained]
            tried: set[str] = set()
            for sel in selectors:
                key = repr(sorted(sel.items()))
                fits = [n for n in nodes if match(n.labels, sel) and n.total_gpus >= spec.num_gpus]
                if key in tried or not fits:
                    continue
                tried.add(key)
                # Ray's free-resource view can lag by seconds on a loaded head; the pool's own
                # ledger (its replicas' GPUs per node) does not. A node free by either gets the
                # whole placement timeout, scaled by the head's load (a loaded Ray commits a
                # placement group slowly); one busy by both is still asked, briefly, so a truly
                # busy one costs little.
                used = self._gpus_used()
                free = any(n.available_gpus >= spec.num_gpus
                           or n.total_gpus - used.get(n.node_id, 0.0) >= spec.num_gpus
                           for n in fits)  # fmt: skip
                wait_s = (spec.placement_timeout_s * load_factor() if free
                          else min(1.5 * load_factor(), spec.placement_timeout_s))  # fmt: skip
                name = f"{spec.name}-{index}-{os.urandom(3).hex()}"
                sel = narrow_ids(sel, fits, spec.num_gpus)
                with self._lock:
                    dep.starting[index] = name
                self._save(dep)
                try:
                    out = self._start_one(dep, index, name, bundle, sel, wait_s, nodes, lost)
                finally:
                    with self._lock:
                        dep.starting.pop(index, None)
                if isinstance(out, Replica):
                    return out, lost
                if out == "lost":
                    break  # look at the nodes again, without the dead one
            else:
                return None, lost  # no candidate had a free node
        return None, lost

    def _gpus_used(self) -> dict[str, float]:
        """GPUs the pool's own live replicas hold, per node id."""
        used: dict[str, float] = {}
        with self._lock:
            for d in self._deployments.values():
                for r in d.replicas.values():
                    used[r.node_id] = used.get(r.node_id, 0.0) + d.spec.num_gpus
        return used

    def _start_one(self, dep: Deployment, index: int, name: str, bundle: dict[str, float],
                   sel: dict[str, str], wait_s: float, nodes: list[NodeView],
                   lost: list[str]) -> Replica | str | None:  # fmt: skip
        """One try on nodes matching ``sel``: the replica, None (no room) or "lost" (its node
        died while it started; the node is added to ``lost``)."""
        spec = dep.spec
        pg = self._backend.reserve(bundle, sel, wait_s, name + "-pg")
        if pg is None:
            return None
        node_id = self._backend.pg_node(pg)
        actor = self._backend.start(pg, spec, index, name)
        try:
            # the constructor's own time (a model load), scaled by the head's load like placement
            where = self._backend.ready(actor, spec.start_timeout_s * load_factor(), node_id)
        except NodeLost as exc:
            self._backend.discard(actor, pg)
            lost.append(exc.node_id)
            zone = next((n.labels.get(L.ZONE, "?") for n in nodes if n.node_id == exc.node_id), "?")
            self._event(dep, "node_lost_during_start", replica=index, node=exc.node_id,
                        zone=zone, why=str(exc))  # fmt: skip
            return "lost"
        except Exception as exc:
            self._backend.discard(actor, pg)
            if isinstance(exc, StartTimeout):  # a slow start, not the replica's code failing
                what = "did not finish starting"
                why = f"{exc}; raise start_timeout_s if its start is that slow"
            else:
                what, why = "failed to start", _first_line(exc)
            raise PoolError(
                f"replica {index} of {spec.name!r} {what} ({spec.run.kind} {spec.run.target}): {why}"
            ) from None
        zone = where["labels"].get(L.ZONE, "?")
        return Replica(index, actor, pg, where["node_id"], zone, sel, name)

    def remove(self, name: str | None = None) -> list[str]:
        """Remove one deployment (or all with ``name=None``); return the names removed."""
        with self._lock:
            names = [name] if name else list(self._deployments)
            for n in names:
                dep = self._deployments.pop(n, None)
                if dep is None:
                    raise PoolError(f"no deployment named {n!r}")
                for rep in dep.replicas.values():
                    self._backend.discard(rep.actor, rep.pg)
                self._store.put("dep", n, None)
        return names

    def replica_handles(self, name: str) -> list[Any]:
        with self._lock:
            dep = self._deployments.get(name)
            if dep is None:
                raise PoolError(f"no deployment named {name!r}; see 'tensorfabric pool status'")
            return [r.actor for r in dep.replicas.values() if r.state == "ready"]

    # -------------------------------------------------------------- failover
    def _loop(self, fn: Any, period: float) -> None:
        while not self._stop.wait(period):
            try:
                fn()
            except Exception:  # keep watching; a transient GCS error must not end failover
                traceback.print_exc()

    def check_once(self) -> None:
        """Ping every replica; mark the lost ones and place replacements (one monitor pass)."""
        with self._lock:
            deps = list(self._deployments.values())
        if not deps:
            return
        alive = self._backend.alive_ids()
        for dep in deps:
            reps = [r for r in dep.replicas.values() if r.state == "ready"]
            results = self._backend.ping({r.index: r.actor for r in reps if r.node_id in alive},
                                         PING_TIMEOUT_S)  # fmt: skip
            for rep in reps:
                res = results.get(rep.index)
                if res is None:
                    self._lose(dep, rep, "node died")
                elif res == "miss":
                    rep.misses += 1
                    if rep.misses >= 3:
                        self._lose(dep, rep, "stopped answering")
                elif res.startswith("dead"):
                    self._lose(dep, rep, f"replica died: {res[6:]}")
                else:
                    rep.misses = 0
            if dep.pending:
                self._replace_pending(dep)

    def _lose(self, dep: Deployment, rep: Replica, why: str) -> None:
        with self._lock:
            if dep.replicas.get(rep.index) is not rep:
                return  # already lost (by the monitor and a drain at once)
            rep.state = "lost"
            dep.replicas.pop(rep.index, None)
            dep.pending.add(rep.index)
            dep.lost_at[rep.index] = (time.perf_counter(), rep.zone, rep.node_id)
            dep.state = "recovering"
            self._event(dep, "lost", replica=rep.index, node=rep.node_id, zone=rep.zone, why=why)
        self._backend.discard(rep.actor, rep.pg)
        self._save(dep)

    def _replace_pending(self, dep: Deployment) -> None:
        for index in sorted(dep.pending):
            t_lost, dead_zone, dead_node = dep.lost_at.get(index, (time.perf_counter(), "?", "?"))
            try:
                placement = compile_spec(dep.spec, self.nodes())
                rep, _ = self._place(dep, index, _failover_order(placement, dead_zone, dep))
            except Exception as exc:  # one deployment's trouble must not stall the others
                dep.state = f"degraded: {_first_line(exc) if not isinstance(exc, PoolError) else exc}"
                continue
            with self._lock:
                if dep.spec.name not in self._deployments:  # removed meanwhile
                    if rep:
                        self._backend.discard(rep.actor, rep.pg)
                    return
                if rep is None:
                    dep.state = "degraded: no free matching node; waiting for one"
                    continue
                dep.replicas[index] = rep
                dep.pending.discard(index)
                dep.lost_at.pop(index, None)
                self._event(dep, "replaced", replica=index, from_node=dead_node,
                            from_zone=dead_zone, node=rep.node_id, zone=rep.zone,
                            recovery_s=round(time.perf_counter() - t_lost, 3))  # fmt: skip
                if not dep.pending:
                    dep.state = "ready"
            self._save(dep)

    def _event(self, dep: Deployment, event: str, **fields: Any) -> None:
        with self._lock:
            dep.events.append({"time": time.time(), "event": event, **fields})
            del dep.events[:-EVENTS_KEPT]

    # ---------------------------------------------------------- persistence
    def _save(self, dep: Deployment) -> None:
        """Write one deployment (spec, state, replicas by name, recent events)."""
        from ._client import _spec_dict

        with self._lock:
            if self._deployments.get(dep.spec.name) is not dep:
                return  # removed meanwhile
            item = {
                "spec": _spec_dict(dep.spec), "state": dep.state, "ready_s": dep.ready_s,
                "events": list(dep.events), "pending": sorted(dep.pending),
                "starting": {str(i): n for i, n in dep.starting.items()},
                "replicas": [{"index": r.index, "name": r.name, "node_id": r.node_id,
                              "zone": r.zone, "selector": r.selector}
                             for r in dep.replicas.values()],
            }  # fmt: skip
        self._store.put("dep", dep.spec.name, item)

    def _restore(self) -> dict[str, Any]:
        """Load saved state; adopt replicas still running, queue the rest for placement."""
        state = self._store.load()
        self._book.load(state["rec"].values())
        adopted = pending = 0
        now = time.perf_counter()
        for d in state["dep"].values():
            dep = Deployment(DeploymentSpec.from_dict(d["spec"]), ready_s=d.get("ready_s", 0.0),
                             events=list(d.get("events", [])))  # fmt: skip
            for index, name in d.get("starting", {}).items():
                # A start the old controller did not finish: remove what is left of it (its
                # actor and placement group survive a head restart with GCS fault tolerance).
                left = self._backend.find(name, name + "-pg")
                if left is not None:
                    self._backend.discard(*left)
                self._event(dep, "start_abandoned", replica=int(index), name=name)
            for r in d.get("replicas", []):
                found = self._backend.find(r["name"], r["name"] + "-pg")
                if found is not None and found[0] is not None:
                    dep.replicas[r["index"]] = Replica(r["index"], found[0], found[1], r["node_id"],
                                                       r["zone"], r["selector"], r["name"])  # fmt: skip
                    adopted += 1
                    continue
                dep.pending.add(r["index"])
                dep.lost_at[r["index"]] = (now, r["zone"], r["node_id"])
                self._event(dep, "lost", replica=r["index"], node=r["node_id"], zone=r["zone"],
                            why="gone after the controller restarted")  # fmt: skip
            placed = set(dep.replicas) | dep.pending
            dep.pending |= {i for i in range(dep.spec.replicas) if i not in placed}
            pending += len(dep.pending)
            dep.state = "recovering" if dep.pending else "ready"
            self._event(dep, "restored", adopted=len(dep.replicas), pending=len(dep.pending))
            self._deployments[dep.spec.name] = dep
            self._save(dep)
        return {"adopted": adopted, "pending": pending, "records": len(self._book)}

    # ---------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        nodes = []
        for n in self.nodes():
            rec = self._book.get(n) or {}
            nodes.append({"node_id": n.node_id, "alive": n.alive, "head": n.is_head,
                          "labels": n.labels, "verified": n.verified, "score": n.score,
                          "reason": n.verify_reason, "gpus": n.total_gpus,
                          "gpus_free": n.available_gpus, "drained": n.drained,
                          "verified_at": rec.get("time"), "expires": rec.get("expires"),
                          "attempts": rec.get("attempts", 0),
                          "carried_over": bool(rec.get("carried_over"))})  # fmt: skip
        with self._lock:
            deps = [self._dep_status(d) for d in self._deployments.values()]
        return {"nodes": nodes, "deployments": deps, "restored": self.restored,
                "state_error": self._store.last_error}  # fmt: skip

    def _dep_status(self, dep: Deployment) -> dict[str, Any]:
        return {
            "name": dep.spec.name, "state": dep.state, "desired": dep.spec.replicas,
            "ready": sum(r.state == "ready" for r in dep.replicas.values()),
            "ready_s": round(dep.ready_s, 3),
            "replicas": [{"index": r.index, "node_id": r.node_id, "zone": r.zone,
                          "state": r.state, "name": r.name} for r in dep.replicas.values()],
            "events": list(dep.events),
        }  # fmt: skip

    def records(self) -> list[dict[str, Any]]:
        return self._book.dump()

    def shutdown(self, remove: bool = True) -> None:
        """Stop the threads; with ``remove`` also remove every deployment (``pool down``)."""
        self._stop.set()
        if remove:
            self.remove(None)
        close = getattr(self._backend, "close", None)
        if close:
            close()
        self._store.close()


def _failover_order(placement: Placement, dead_zone: str, dep: Deployment) -> list[dict[str, str]]:
    """Away from the dead zone and the other replicas' zones, then away from the dead zone,
    then anywhere the spec allows."""
    used = {r.zone for r in dep.replicas.values()} - {"?"}
    dead = {dead_zone} - {"?"}  # "?": never placed (restored while it was starting)
    seen, order = set(), []
    for sels in (placement.preferring_other_zones(used | dead, then_all=False),
                 placement.preferring_other_zones(dead, then_all=False), placement.candidates):  # fmt: skip
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
