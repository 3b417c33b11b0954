"""Client side of the pool: connect to the cluster, talk to the controller, call deployments."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

from ._errors import ControllerUnavailable, PoolError, ReplicaUnavailable
from ._records import load_factor
from ._spec import DeploymentSpec

NAMESPACE = "tensorfabric-pool"
CONTROLLER = "controller"


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("the GPU pool needs Ray: pip install 'tensorfabric[ray]'") from exc
    return ray


def _first(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def connect(address: str | None = None) -> None:
    """Join the Ray cluster at ``address`` as a driver (``auto``: the local node's cluster)."""
    ray = _ray()
    if ray.is_initialized():
        return
    try:
        ray.init(address=address or "auto", namespace=NAMESPACE, log_to_driver=False)
    except ConnectionError as exc:
        raise PoolError(
            f"cannot reach a Ray cluster at {address or 'auto'}: {exc}. Start one with "
            "'tensorfabric pool up' or pass --address HOST:PORT"
        ) from exc


def controller(create: bool = True, state_file: str | None = None,
               verify_ttl_s: float | None = None) -> Any:
    """The pool controller actor (created on the head node if ``create`` and absent).

    ``state_file`` (the head's checkpoint) and ``verify_ttl_s`` apply only when this call
    creates the controller; a running one keeps its own."""
    ray = _ray()
    if not create:
        try:
            return ray.get_actor(CONTROLLER, namespace=NAMESPACE)
        except ValueError:
            raise PoolError(
                "no pool controller runs on this cluster; start it with 'tensorfabric pool up'"
            ) from None
    from ._controller import PoolController
    from ._records import VERIFY_TTL_S

    return (
        ray.remote(PoolController)
        .options(
            name=CONTROLLER, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
            num_cpus=0, max_concurrency=32, max_restarts=-1,
            resources={"node:__internal_head__": 0.001},  # never on an untrusted worker
        )  # fmt: skip
        .remote(state_file, verify_ttl_s or VERIFY_TTL_S)
    )


class Pool:
    """A connected view of the pool: verify nodes, deploy specs, read status, remove."""

    def __init__(self, address: str | None = None, *, create: bool = True,
                 state_file: str | None = None, verify_ttl_s: float | None = None) -> None:  # fmt: skip
        connect(address)
        self._ray = _ray()
        self.controller = controller(create, state_file, verify_ttl_s)

    def _get(self, ref: Any, timeout: float) -> Any:
        exc_ = self._ray.exceptions
        try:
            return self._ray.get(ref, timeout=timeout)
        except exc_.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, PoolError):
                raise cause from None  # the controller's own message, without Ray's wrapping
            raise
        except exc_.GetTimeoutError:
            raise PoolError(
                f"the pool controller did not answer within {timeout:g} s (it may still be "
                "working: 'tensorfabric pool status' shows deployments and their events)"
            ) from None
        except (exc_.ActorUnavailableError, exc_.ActorDiedError) as exc:
            # After a head restart with GCS fault tolerance the controller's old node is dead
            # but not yet declared so; Ray restarts the controller on the new head shortly.
            raise ControllerUnavailable(
                f"the pool controller is not reachable (restarting with its head?): {_first(exc)}"
            ) from None

    def verify_pending(self, wait: float = 900.0) -> dict[str, dict[str, Any]]:
        """Verify the nodes that are due (never checked, expiring, or rejoined)."""
        return self._get(self.controller.verify_pending.remote(), wait)

    def verify(self, node_id: str, timeout: float | None = None, attempts: int = 3,
               wait: float = 900.0) -> dict[str, Any]:  # fmt: skip
        """Check one node now (id or join id, or a unique prefix). ``timeout`` is the first
        attempt's (default: load-aware); retries back off and get at least the default."""
        return self._get(self.controller.verify.remote(node_id, timeout, attempts), wait)

    def verify_many(self, node_ids: list[str] | None = None, timeout: float | None = None,
                    attempts: int = 3, wait: float = 900.0) -> dict[str, dict[str, Any]]:  # fmt: skip
        """Check these nodes (every alive pool node with ``None``) now."""
        return self._get(self.controller.verify_many.remote(node_ids, timeout, attempts), wait)

    def deploy(self, spec: DeploymentSpec | dict[str, Any] | str | Path,
               timeout: float | None = None) -> DeploymentHandle:  # fmt: skip
        """Place ``spec`` (a spec, a dict, or a YAML path) and wait until every replica answers;
        ``timeout`` defaults to what its replicas may take to be placed and started, one after
        the other, scaled by this machine's load (the controller's own waits are bounded)."""
        if isinstance(spec, (str, Path)):
            spec = DeploymentSpec.from_yaml(spec)
        elif isinstance(spec, dict):
            spec = DeploymentSpec.from_dict(spec)
        if timeout is None:
            per_replica = spec.placement_timeout_s + spec.start_timeout_s
            timeout = 60.0 + spec.replicas * per_replica * load_factor()
        self._get(self.controller.deploy.remote(_spec_dict(spec)), timeout)
        return DeploymentHandle(self, spec.name)

    def handle(self, name: str) -> DeploymentHandle:
        return DeploymentHandle(self, name)

    def status(self, timeout: float = 30.0) -> dict[str, Any]:
        return self._get(self.controller.status.remote(), timeout)

    def down(self, name: str | None = None, timeout: float = 60.0) -> list[str]:
        return self._get(self.controller.remove.remote(name), timeout)


def _spec_dict(spec: DeploymentSpec) -> dict[str, Any]:
    d = spec.as_dict()
    run = d.pop("run")
    d["run"] = {run["kind"]: run["target"], "args": list(run["args"]), "kwargs": run["kwargs"]}
    for key in ("regions", "countries", "providers", "gpus"):
        d[key] = list(d[key])
    return d


class DeploymentHandle:
    """Calls a deployment's replicas round-robin; a call whose replica dies is retried on
    another (after failover, on the replacement) until ``timeout``.

    Calls must be safe to repeat: a request may run twice if its replica died after
    running it but before answering.
    """

    def __init__(self, pool: Pool, name: str) -> None:
        self._pool, self.name = pool, name
        self._replicas: list[Any] = []
        self._refreshed = 0.0
        self._rr = itertools.count()
        self._lock = threading.Lock()
        self.retries = 0  # calls re-sent after a replica failed (for tests and status)
        self.refresh_s = 1.0  # how often to ask the controller for the current replicas

    def _refresh(self) -> list[Any]:
        reps = self._pool._get(self._pool.controller.replica_handles.remote(self.name), 30.0)
        with self._lock:
            self._replicas, self._refreshed = list(reps), time.monotonic()
        return reps

    def call(self, *args: Any, method: str | None = None, timeout: float = 60.0,
             attempt_timeout: float = 10.0, **kwargs: Any) -> Any:  # fmt: skip
        ray = self._pool._ray
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            reps = self._replicas
            if not reps or time.monotonic() - self._refreshed > self.refresh_s:
                reps = self._refresh()  # picks up replacements and new replicas
            if not reps:
                time.sleep(0.2)  # every replica is being replaced
                self._refresh()
                continue
            actor = reps[next(self._rr) % len(reps)]
            try:
                ref = actor.call.remote(method, args, kwargs)
                return ray.get(ref, timeout=max(0.1, min(attempt_timeout, deadline - time.monotonic())))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                last = exc
                self.retries += 1
                with self._lock:
                    if actor in self._replicas:
                        self._replicas.remove(actor)
        raise ReplicaUnavailable(
            f"deployment {self.name!r}: no replica answered within {timeout:g} s "
            f"(last error: {type(last).__name__ if last else 'none'}); "
            "see 'tensorfabric pool status'"
        )
