"""The connector's settings: vLLM's ``kv_connector_extra_config`` read and checked once."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

from .._errors import ConfigError

#: the module path and class name vLLM loads (``--kv-transfer-config``)
CONNECTOR_MODULE = "tensorfabric.vllm"
CONNECTOR_NAME = "TensorFabricConnector"

_KNOWN = {"secret", "host", "transports", "shm_kv", "timeout", "hold_s", "heartbeat_s", "name",
          "stats_file", "push_layers", "push_wait_s"}


@dataclass(frozen=True)
class ConnectorSettings:
    """``secret``: the cluster secret (else ``$TENSORFABRIC_SECRET``); every prefill and decode
    instance needs the same one. ``host``: the address this instance's engine listens on and
    that peers dial (use the host's reachable address across hosts). ``transports``: the
    engine's transports (``shm`` between instances on one host, ``tcp`` otherwise).
    ``shm_kv``: place vLLM's KV cache in the engine's shared memory, so a same-host prefill
    instance writes it with one copy. Shared memory cannot be mapped write-only, so this grants
    the prefill instance that a decode instance pulls from read access to the whole KV buffer
    as well; ``shm_kv: false`` keeps the grant write-only (transfers then go over tcp, also on
    one host). ``timeout``: seconds a KV transfer may take before the
    decode instance gives up and recomputes. ``hold_s``: seconds a prefill instance keeps a
    finished request's blocks for its decode instance. ``heartbeat_s``: how often a decode
    instance checks that the prefill instance it waits on is alive. ``stats_file``: append one
    JSON line per transfer (event, request, bytes, seconds) to this file. ``push_layers``: in
    push mode (the proxy sends both requests at once), how many layers a prefill instance
    computes between two writes to the decode instance (1: every layer on its own).
    ``push_wait_s``: how long a decode instance waits, in push mode, for a prefill instance
    that is alive but has not finished the prompt (its queue and the prefill itself).
    """

    secret: str
    host: str = "127.0.0.1"
    transports: tuple[str, ...] = ("shm", "tcp")
    shm_kv: bool = True
    timeout: float = 30.0
    hold_s: float = 60.0
    heartbeat_s: float = 0.5
    name: str | None = None
    stats_file: str | None = None
    push_layers: int = 4
    push_wait_s: float = 600.0

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any] | None) -> ConnectorSettings:
        extra = dict(extra or {})
        unknown = set(extra) - _KNOWN
        if unknown:
            raise ConfigError(f"unknown tensorfabric connector option(s) {sorted(unknown)}; "
                              f"known: {sorted(_KNOWN)}")
        secret = extra.get("secret") or os.environ.get("TENSORFABRIC_SECRET")
        if not secret:
            raise ConfigError("the tensorfabric KV connector needs a cluster secret: set "
                              "kv_connector_extra_config.secret or $TENSORFABRIC_SECRET "
                              "(the same on every prefill and decode instance)")
        return cls(
            secret=str(secret),
            host=str(extra.get("host", "127.0.0.1")),
            transports=tuple(extra.get("transports", ("shm", "tcp"))),
            shm_kv=bool(extra.get("shm_kv", True)),
            timeout=_positive("timeout", extra.get("timeout", 30.0)),
            hold_s=_positive("hold_s", extra.get("hold_s", 60.0)),
            heartbeat_s=_positive("heartbeat_s", extra.get("heartbeat_s", 0.5)),
            name=extra.get("name"),
            stats_file=extra.get("stats_file"),
            push_layers=_count("push_layers", extra.get("push_layers", 4)),
            push_wait_s=_positive("push_wait_s", extra.get("push_wait_s", 600.0)),
        )


def _positive(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number of seconds, got {value!r}") from None
    if not v > 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")
    return v


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
    return value


def kv_transfer_config(role: str, *, secret: str | None = None, host: str = "127.0.0.1",
                       recompute_on_failure: bool = True, **options: Any) -> dict[str, Any]:
    """The ``--kv-transfer-config`` dict that loads this connector into vLLM.

    ``role``: ``"prefill"`` (kv_producer), ``"decode"`` (kv_consumer) or ``"both"``.
    ``secret``: the cluster secret; leave it out to have every instance read
    ``$TENSORFABRIC_SECRET`` (keeps it off command lines). ``recompute_on_failure``: a failed
    KV load makes the decode instance recompute the prompt (vLLM's
    ``kv_load_failure_policy="recompute"``) instead of failing the request.
    """
    roles = {"prefill": "kv_producer", "decode": "kv_consumer", "both": "kv_both"}
    if role not in roles:
        raise ConfigError(f"role must be one of {sorted(roles)}, got {role!r}")
    extra = {"host": host, **options}
    if secret is not None:
        extra["secret"] = secret
    ConnectorSettings.from_extra({"secret": "checked-later", **extra})  # fail here, not in vLLM
    return {
        "kv_connector": CONNECTOR_NAME,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": roles[role],
        "kv_load_failure_policy": "recompute" if recompute_on_failure else "fail",
        "kv_connector_extra_config": extra,
    }
