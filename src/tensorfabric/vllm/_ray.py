"""vLLM servers as Ray actors: ``DisaggCluster(ray_address=...)`` / ``vllm-disagg
--ray-address`` place each prefill and decode instance on a node of a Ray cluster.

Each instance is one actor (``num_cpus`` CPUs of its node, spread over the nodes where Ray
can) that starts ``python -m vllm.entrypoints.openai.api_server`` on its node, bound to the
node's IP address, with the connector's engine on the same address; the proxy stays with the
caller and reaches the servers (and the servers reach each other) at those addresses.
"""

from __future__ import annotations

from typing import Any

from .._errors import ConfigError
from ._launch import VllmServer, VllmStartError


NAMESPACE = "tensorfabric-vllm"   # where the instances' actors are named


class _VllmActor:
    """Lives on a Ray node: one vLLM server process (its own process group) and its log."""

    def __init__(self, model: str | None, kw: dict[str, Any]) -> None:
        import ray

        from ._model import hf_folder

        host = ray.util.get_node_ip_address()
        cfg = kw.get("kv_transfer_config")
        if cfg is not None:
            cfg = dict(cfg)
            cfg["kv_connector_extra_config"] = {**cfg["kv_connector_extra_config"], "host": host}
            kw["kv_transfer_config"] = cfg
        # no port given: the server picks one and picks again if it is taken before vLLM binds it
        self.server = VllmServer(hf_folder(model), host=host, **kw)
        self.server.start()

    def url(self) -> str:
        return self.server.url

    def wait_ready(self, timeout: float) -> str:
        self.server.wait_ready(timeout)
        return self.server.url

    def alive(self) -> bool:
        return self.server.alive

    def log_tail(self) -> str:
        return self.server.log_tail()

    def stop(self) -> None:
        self.server.stop()


class RayVllmServer:
    """The caller's handle on a :class:`_VllmActor`, with the part of VllmServer's interface
    that :class:`DisaggCluster` uses (``start``, ``wait_ready``, ``url``, ``alive``,
    ``stop``)."""

    def __init__(self, model: str | None, *, num_cpus: float = 1.0, name: str | None = None,
                 **kw: Any) -> None:
        self.model, self.kw, self.num_cpus, self.name = model, kw, num_cpus, name
        self.actor: Any = None
        self.url = ""

    def start(self) -> RayVllmServer:
        import ray

        cls = ray.remote(_VllmActor).options(num_cpus=self.num_cpus, scheduling_strategy="SPREAD",
                                             max_restarts=0, name=self.name,
                                             namespace=NAMESPACE if self.name else None)
        self.actor = cls.remote(self.model, self.kw)
        return self

    def wait_ready(self, timeout: float = 600.0) -> RayVllmServer:
        import ray

        try:
            self.url = ray.get(self.actor.wait_ready.remote(timeout), timeout=timeout + 60)
        except ray.exceptions.GetTimeoutError:
            raise VllmStartError(f"a vLLM actor did not start within {timeout:.0f} s") from None
        except ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None) or exc
            raise VllmStartError(f"a vLLM actor failed to start: {cause}") from None
        return self

    @property
    def alive(self) -> bool:
        import ray

        try:
            return bool(ray.get(self.actor.alive.remote(), timeout=30))
        except ray.exceptions.RayError:
            return False

    def stop(self, grace: float = 20.0) -> None:
        import ray

        if self.actor is None:
            return
        try:
            ray.get(self.actor.stop.remote(), timeout=grace + 30)
        except ray.exceptions.RayError:
            pass
        ray.kill(self.actor, no_restart=True)
        self.actor = None


def connect(address: str) -> None:
    """Join the Ray cluster at ``address`` ("auto" or host:port) unless already connected."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError("--ray-address needs Ray: pip install 'tensorfabric[ray]'") from exc
    if not address:
        raise ConfigError("ray_address must be 'auto' or the head's host:port")
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
