"""The deployment config (YAML): tiers, models, addresses and links, routing and PII policy.

Every key is checked: unknown keys, wrong types and out-of-range values raise
:class:`SplitConfigError` naming the key path (``cloud.timeout``) and what is allowed. See
docs/split.md for the full reference and examples/serve.yaml for a commented example.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ._errors import SplitConfigError

__all__ = [
    "CloudConfig",
    "DeployConfig",
    "EdgeConfig",
    "HealthConfig",
    "PiiConfig",
    "ServerConfig",
    "load_config",
    "parse_config",
]


@dataclass
class ServerConfig:
    """The HTTP front (runs in the edge process)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_queue: int = 64  # requests admitted at once; beyond it the server answers 429
    request_timeout: float = 300.0  # seconds a request may wait for its tier before 503
    model_name: str = "tensorfabric"  # the model id clients ask for ("-edge"/"-cloud" suffixes)
    api_key: str | None = None  # literal or "env:NAME"; required when host is not loopback
    max_body_bytes: int = 1 << 20  # larger request bodies get 413

    def resolve_api_key(self) -> str | None:
        """The API key (``env:NAME`` read now); an error if one is needed and missing."""
        key = self.api_key
        if key and key.startswith("env:"):
            name = key[4:]
            key = os.environ.get(name)
            if not key:
                raise SplitConfigError(f"server.api_key: environment variable {name} is not set")
        if not key:
            from ._tls import is_loopback

            if not is_loopback(self.host):
                raise SplitConfigError(
                    f"server.api_key: the HTTP API listens on {self.host}, beyond loopback; set "
                    "server.api_key (e.g. 'env:TENSORFABRIC_API_KEY') so only your clients can use it"
                )
        return key or None


@dataclass
class EdgeConfig:
    model: str = "default"  # "default" (SmolLM2-135M-Instruct), a .gguf file or a HF folder
    host: str = "127.0.0.1"  # where the edge engine listens (the cloud dials back to it)
    port: int = 0  # fix it so a restarted remote cloud can rejoin (cloud.join)
    address_file: str | None = None  # the edge writes its engine address here (for cloud.join)
    runtime: str = "transformers"  # "transformers" (one request at a time) or "vllm" (batched)
    # transformers runtime: "none" (float32: the cloud's answers) or "int8" (torch dynamic
    # quantization: smaller, but its answers matched the cloud's on 1 of 76 prompts)
    quantize: str = "none"
    kv_space_gib: int = 1  # vllm runtime: KV cache size
    max_num_seqs: int = 32  # vllm runtime: requests run in one batch
    max_context: int = 2048
    cpus: str | None = None  # CPUs the edge process (and its vLLM worker) runs on: "1", "2-3"


@dataclass
class TlsConfig:
    """TLS on the tier link (see split/_tls.py): on by default off loopback, always pinned."""

    enabled: bool | str = "auto"  # "auto": on when a tier address is not loopback
    cert: str | None = None  # this tier's certificate (default: a generated self-signed one)
    key: str | None = None
    ca: str | None = None  # whom to trust: a CA or the peer's certificate (default: own cert)
    pin: list[str] | None = None  # sha256:HEX fingerprints the peer certificate must match
    dir: str | None = None  # where a generated pair lives (default ~/.config/tensorfabric/tls)


@dataclass
class CloudConfig:
    launch: str = "local"  # "local": serve spawns the cloud process; "remote": it runs elsewhere
    model: str = "default"
    host: str = "127.0.0.1"  # where the cloud engine listens
    port: int = 0
    address: str | None = None  # remote: the cloud engine's address (hex), or use address_file
    address_file: str | None = None  # the cloud writes its address here; the edge reads it
    links: int = 1
    timeout: float = 60.0  # deadline of one engine operation on the tier link
    keepalive: float = 0.5  # the cloud says "still working on it" this often per request
    dead_after: float = 1.5  # the edge declares the cloud gone after this long without a word
    connect_timeout: float = 10.0
    join: str | None = None  # remote cloud: an edge address (hex) or file to announce itself to
    engine: str = "auto"  # "vllm", "transformers", or "auto": vllm when installed (route mode)
    kv_space_gib: int = 1  # vLLM: KV cache size (VLLM_CPU_KVCACHE_SPACE on CPU)
    max_num_seqs: int = 64  # vLLM: requests run in one continuous batch
    max_model_len: int = 2048  # vLLM: context of the cloud model
    # prefill and decode apart: vLLM instances joined by tensorfabric's KV connector (engine
    # vllm), or tensorfabric.kv workers (engine transformers)
    disaggregated: bool = False
    cpus: str | None = None  # CPUs the cloud process (and its vLLM workers) runs on: "0", "0-1"
    record_received: str | None = None  # audit: append every byte the cloud receives to a file
    tls: TlsConfig = field(default_factory=TlsConfig)


@dataclass
class PiiConfig:
    enabled: bool = True
    kinds: list[str] | None = None  # default: every built-in kind
    names: list[str] | None = None  # more names to catch, in any case (customers, staff)
    fail_closed: bool = True  # also replace leftover 6+ digit runs and capitalised pairs after a trigger
    name_detector: str | None = None  # "module:factory" returning a NameDetector (e.g. an NER model)


@dataclass
class HealthConfig:
    """Cloud health: a circuit breaker with exponential backoff probes."""

    failures_to_open: int = 1
    interval: float = 0.5  # ping period while the cloud is in use (a dead cloud shows in /health)
    backoff_initial: float = 0.5
    backoff_max: float = 2.0
    probe_timeout: float = 1.5


@dataclass
class LayerSplitConfig:
    layers_at_edge: int = 8


@dataclass
class DeployConfig:
    mode: str = "route"  # "route" (edge or cloud answers) or "layer_split"
    secret: str | None = None  # literal, or "env:NAME"; default: $TENSORFABRIC_SECRET or random
    server: ServerConfig = field(default_factory=ServerConfig)
    edge: EdgeConfig = field(default_factory=EdgeConfig)
    cloud: CloudConfig = field(default_factory=CloudConfig)
    routing: dict[str, Any] = field(default_factory=lambda: {"policy": "confidence"})
    pii: PiiConfig = field(default_factory=PiiConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    layer_split: LayerSplitConfig = field(default_factory=LayerSplitConfig)

    def resolve_secret(self) -> str:
        """The cluster secret: config literal, ``env:NAME``, $TENSORFABRIC_SECRET, else random."""
        s = self.secret
        if s and s.startswith("env:"):
            value = os.environ.get(s[4:])
            if not value:
                raise SplitConfigError(f"secret: environment variable {s[4:]} is not set")
            return value
        if s:
            return s
        env = os.environ.get("TENSORFABRIC_SECRET")
        if env:
            return env
        if self.cloud.launch == "remote":
            raise SplitConfigError(
                "secret: a remote cloud tier needs the shared secret; set secret in the config "
                "or TENSORFABRIC_SECRET on both hosts"
            )
        import secrets

        self.secret = secrets.token_hex(16)
        return self.secret


_CHOICES = {
    "mode": ("route", "layer_split"),
    "edge.quantize": ("int8", "none"),
    "edge.runtime": ("transformers", "vllm"),
    "cloud.launch": ("local", "remote"),
    "cloud.engine": ("auto", "vllm", "transformers"),
}
_POSITIVE = {
    "server.max_queue", "server.request_timeout", "edge.max_context", "cloud.links",
    "cloud.timeout", "cloud.connect_timeout", "health.failures_to_open",
    "health.backoff_initial", "health.backoff_max", "health.probe_timeout",
    "layer_split.layers_at_edge", "server.max_body_bytes", "cloud.keepalive", "cloud.dead_after",
    "health.interval", "cloud.kv_space_gib", "cloud.max_num_seqs", "cloud.max_model_len",
    "edge.kv_space_gib", "edge.max_num_seqs",
}  # fmt: skip
_ROUTING_KEYS = {
    "policy", "threshold", "metric", "probe_tokens", "edge_max_prompt_tokens",
    "edge_max_new_tokens", "allow_user_choice", "cloud_kinds", "spill",
}  # fmt: skip


def _build(cls: type, data: Any, path: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, Mapping):
        raise SplitConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise SplitConfigError(
            f"{path or 'config'}: unknown key(s) {sorted(unknown)}; allowed: {sorted(known)}"
        )
    kwargs = {}
    defaults = cls()
    for name, value in data.items():
        key = f"{path}.{name}" if path else name
        default = getattr(defaults, name)
        kwargs[name] = _check_value(key, value, default)
    return cls(**kwargs)


def _check_value(key: str, value: Any, default: Any) -> Any:
    if hasattr(default, "__dataclass_fields__"):
        return _build(type(default), value, key)
    if key == "routing":
        if not isinstance(value, Mapping):
            raise SplitConfigError("routing: expected a mapping")
        policy = value.get("policy", "confidence")
        if policy in ("confidence", "edge_only", "cloud_only"):
            bad = set(value) - _ROUTING_KEYS
            if bad:
                raise SplitConfigError(
                    f"routing: unknown key(s) {sorted(bad)}; allowed: {sorted(_ROUTING_KEYS)}"
                )
        return dict(value)
    if value is None:
        return None
    if key in ("edge.cpus", "cloud.cpus"):
        from ._cpus import parse_cpus

        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # YAML reads "cpus: 1" as a number
        if not isinstance(value, str):
            raise SplitConfigError(f"{key}: expected a CPU list like '0' or '2-3', got {value!r}")
        parse_cpus(key, value)  # the syntax here; whether this host has them, at start
        return value
    if key == "cloud.tls.enabled":
        if value != "auto" and not isinstance(value, bool):
            raise SplitConfigError(f"{key}: expected auto, true or false, got {value!r}")
        return value
    if isinstance(default, bool) or key in ("cloud.disaggregated", "pii.enabled", "pii.fail_closed"):
        if not isinstance(value, bool):
            raise SplitConfigError(f"{key}: expected true or false, got {value!r}")
    elif isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SplitConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(default, int) and not isinstance(value, int):
            raise SplitConfigError(f"{key}: expected an integer, got {value!r}")
        if key in _POSITIVE and value <= 0:
            raise SplitConfigError(f"{key}: must be positive, got {value!r}")
        if key.endswith("port") and not 0 <= value <= 65535:
            raise SplitConfigError(f"{key}: not a TCP port: {value!r}")
    elif key in ("pii.kinds", "pii.names", "cloud.tls.pin"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SplitConfigError(f"{key}: expected a list of strings")
    elif not isinstance(value, str):
        raise SplitConfigError(f"{key}: expected a string, got {value!r}")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise SplitConfigError(f"{key}: {value!r} is not one of {list(_CHOICES[key])}")
    return value


def parse_config(data: Mapping[str, Any] | None) -> DeployConfig:
    """Validate a parsed YAML mapping into a :class:`DeployConfig`."""
    cfg = _build(DeployConfig, data or {}, "")
    if cfg.cloud.launch == "remote" and not (cfg.cloud.address or cfg.cloud.address_file):
        raise SplitConfigError(
            "cloud: launch: remote needs cloud.address (hex, printed by the cloud tier) "
            "or cloud.address_file"
        )
    if cfg.cloud.engine == "vllm" and cfg.mode == "layer_split":
        raise SplitConfigError("cloud.engine: vllm cannot serve mode: layer_split (the cloud runs the "
                               "model's upper layers itself); use cloud.engine: transformers")
    if bool(cfg.cloud.tls.cert) != bool(cfg.cloud.tls.key):
        raise SplitConfigError("cloud.tls: give both cert and key, or neither")
    if cfg.cloud.keepalive * 2 > cfg.cloud.dead_after:
        raise SplitConfigError(
            f"cloud.dead_after ({cfg.cloud.dead_after}) must be at least twice cloud.keepalive "
            f"({cfg.cloud.keepalive}), or a busy cloud would read as a dead one"
        )
    if not (cfg.server.api_key or "").startswith("env:"):
        cfg.server.resolve_api_key()  # surface a missing key at load time
    from ._routing import make_policy

    make_policy(cfg.routing)  # surface policy errors at load time
    return cfg


def load_config(path: str | Path | None) -> DeployConfig:
    """Read and validate a YAML config file; ``None`` gives the defaults."""
    if path is None:
        return parse_config({})
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("config files need PyYAML: pip install 'tensorfabric[serve]'") from exc
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise SplitConfigError(f"cannot read config file {p}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SplitConfigError(f"{p}: not valid YAML: {exc}") from exc
    try:
        return parse_config(data)
    except SplitConfigError as exc:
        raise SplitConfigError(f"{p}: {exc}") from exc
