"""What the controller asks of the cluster, in one place: Ray here, a simulation in the bench.

The controller (:mod:`._controller`) decides; a backend carries the decisions out. The Ray
backend reads ``ray.nodes()``, reserves one-bundle placement groups with label selectors,
starts replica actors, pings them and runs the verification probe. ``bench/pool_scale.py``
injects a simulated backend with the same methods to drive the real controller code with
thousands of nodes.

Replicas and their placement groups are *detached* and *named*, so they outlive the
controller: a restarted controller finds them by name and adopts them instead of starting
them again.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from . import _labels as L
from ._client import NAMESPACE
from ._compile import NodeView
from ._replica import ReplicaHost
from ._spec import DeploymentSpec
from ._verify import NodeProbe

VERIFY_BYTES = 16 * 2**20
# A node's turn at the head's link lasts at most this share of its attempt's timeout (four
# writes of VERIFY_BYTES: ~1 s at 100 MB/s): a hung or hostile node cannot hold the others'
# link probes for its whole attempt.
LINK_TURN_SHARE = 0.25
NODE_LOSS_GRACE_S = 20.0  # how long to wait for Ray to declare a failed replica's node dead


class NodeLost(Exception):
    """The node under a starting replica died (not the replica's code)."""

    def __init__(self, node_id: str, detail: str = "") -> None:
        super().__init__(f"node {node_id[:12]} was lost{': ' + detail if detail else ''}")
        self.node_id = node_id


class StartTimeout(Exception):
    """A replica's constructor was still running (on a live node) when its start timeout ran out."""

    def __init__(self, node_id: str, timeout: float) -> None:
        super().__init__(f"its constructor was still running on node {node_id[:12]} after "
                         f"{timeout:.0f} s")
        self.node_id, self.timeout = node_id, timeout


class RayBackend:
    """The live Ray cluster this process is connected to."""

    def __init__(self) -> None:
        self._replica_cls: Any = ray.remote(ReplicaHost)
        self._probe_cls: Any = ray.remote(NodeProbe)
        self._engine: Any = None
        self._engine_lock = threading.Lock()
        # link probes share the head's ingress: one at a time, so each measures its own link
        self._link_lock = threading.Lock()

    # ----------------------------------------------------------------- nodes
    def nodes(self) -> list[NodeView]:
        from ray._private.state import available_resources_per_node

        avail = available_resources_per_node()
        return [
            NodeView(
                node_id=n["NodeID"], alive=bool(n["Alive"]), labels=dict(n.get("Labels") or {}),
                total_gpus=float(n.get("Resources", {}).get("GPU", 0.0)),
                available_gpus=float(avail.get(n["NodeID"], {}).get("GPU", 0.0)),
                is_head="node:__internal_head__" in n.get("Resources", {}),
            )  # fmt: skip
            for n in ray.nodes()
        ]

    def alive_ids(self) -> set[str]:
        return {n["NodeID"] for n in ray.nodes() if n["Alive"]}

    # -------------------------------------------------------------- replicas
    def reserve(self, bundle: dict[str, float], selector: dict[str, str], wait_s: float,
                name: str) -> Any | None:  # fmt: skip
        """A one-bundle placement group on a node matching ``selector``, or None in time."""
        pg = placement_group([bundle or {"CPU": 0.001}], bundle_label_selector=[selector],
                             name=name, lifetime="detached")  # fmt: skip
        if pg.wait(wait_s):
            return pg
        remove_placement_group(pg)
        return None

    def pg_node(self, pg: Any) -> str:
        from ray.util import placement_group_table

        return str(placement_group_table(pg).get("bundles_to_node_id", {}).get(0, ""))

    def start(self, pg: Any, spec: DeploymentSpec, index: int, name: str) -> Any:
        return self._replica_cls.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, 0),
            num_gpus=spec.num_gpus, num_cpus=spec.num_cpus, max_concurrency=8,
            name=name, namespace=NAMESPACE, lifetime="detached",
        ).remote(spec.run.kind, spec.run.target, spec.run.args, spec.run.kwargs,
                 spec.name, index)  # fmt: skip

    def ready(self, actor: Any, timeout: float, node_id: str) -> dict[str, Any]:
        """Wait for the replica's constructor; raise NodeLost if its node died meanwhile."""
        try:
            return ray.get(actor.ready.remote(), timeout=timeout)
        except ray.exceptions.RayActorError as exc:
            if exc.actor_init_failed:
                raise  # the replica's own code failed
            if self.wait_node_dead(node_id, NODE_LOSS_GRACE_S):
                raise NodeLost(node_id, "it died while the replica started") from None
            raise
        except ray.exceptions.GetTimeoutError:
            if node_id not in self.alive_ids():
                raise NodeLost(node_id, "it died while the replica started") from None
            raise StartTimeout(node_id, timeout) from None

    def wait_node_dead(self, node_id: str, grace_s: float) -> bool:
        deadline = time.monotonic() + grace_s
        while True:
            if node_id not in self.alive_ids():
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)

    def ping(self, actors: dict[Any, Any], timeout: float) -> dict[Any, str]:
        """``key -> "ok" | "miss" | "dead: <error>"`` for each replica actor."""
        if not actors:
            return {}  # ray.wait refuses an empty list (a deployment with no replica left)
        refs = {k: a.ping.remote() for k, a in actors.items()}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
        done = set(ready)
        out = {}
        for k, ref in refs.items():
            if ref not in done:
                out[k] = "miss"
                continue
            try:
                ray.get(ref, timeout=0)
                out[k] = "ok"
            except Exception as exc:
                out[k] = f"dead: {type(exc).__name__}"
        return out

    def find(self, name: str, pg_name: str) -> tuple[Any, Any] | None:
        """A replica actor and its placement group by name (after a controller restart)."""
        try:
            actor = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return None
        try:
            pg = ray.util.get_placement_group(pg_name)
        except ValueError:
            pg = None
        return actor, pg

    def discard(self, actor: Any, pg: Any) -> None:
        for fn, obj in ((lambda a: ray.kill(a, no_restart=True), actor), (remove_placement_group, pg)):
            if obj is None:
                continue
            try:
                fn(obj)
            except Exception:
                pass

    # ---------------------------------------------------------- verification
    def measure(self, view: NodeView, timeout: float) -> tuple[dict[str, Any], str | None]:
        """Run the probes on ``view``'s node; (measurements, sha256 of what landed here).

        A :class:`NodeProbe` actor on the node measures it and readies its link probe (the
        slow part on a busy node: the actor's start, its imports, its connection); only then
        does it wait for the head's link (one node at a time) and write, for at most
        ``LINK_TURN_SHARE`` of ``timeout``."""
        import tensorfabric as tf

        deadline = time.monotonic() + timeout
        left = lambda: max(0.1, deadline - time.monotonic())  # noqa: E731
        buf = None
        eng = self._get_engine()
        probe = self._probe_cls.options(
            label_selector={L.NODE_ID: view.node_id}, num_cpus=0, max_restarts=0,
            max_task_retries=0).remote()
        try:
            measured = ray.get(probe.node.remote(view.labels, eng.address,
                                                 VERIFY_BYTES, timeout), timeout=left())
            if "error" in measured:
                return measured, None
            if not self._link_lock.acquire(timeout=left()):
                raise TimeoutError(f"other nodes' link probes held the head for {timeout:.0f} s")
            try:
                turn = min(left(), max(1.0, timeout * LINK_TURN_SHARE))
                ends = time.monotonic() + turn  # one deadline for the whole turn
                in_turn = lambda: max(0.1, ends - time.monotonic())  # noqa: E731
                buf = eng.alloc(VERIFY_BYTES, access=tf.Access.REMOTE_WRITE)
                imm = int.from_bytes(os.urandom(4), "little") | 1
                landed = eng.expect(imm, 1, timeout=turn)
                measured.update(ray.get(probe.link.remote(buf.descriptor().to_bytes(), imm, turn),
                                        timeout=in_turn()))
                sha = None
                if "error" not in measured:
                    landed.wait(in_turn())
                    sha = hashlib.sha256(buf.array.tobytes()).hexdigest()
            finally:
                if buf is not None:  # before the next node's turn: nothing more lands here
                    eng.unregister(buf)
                self._link_lock.release()
            return measured, sha
        except Exception as exc:  # node died or hung: the caller retries
            kind = "timeout" if isinstance(exc, (ray.exceptions.GetTimeoutError, TimeoutError)) else "error"
            return {"error": f"{type(exc).__name__}: {exc}", "kind": kind}, None
        finally:
            try:
                ray.kill(probe, no_restart=True)  # a hung probe too
            except Exception:
                pass

    def _get_engine(self) -> Any:
        with self._engine_lock:
            if self._engine is None:
                import tensorfabric as tf

                self._engine = tf.Engine(host=ray.util.get_node_ip_address(), port=0, name="pool")
            return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
