"""Deployment specs: what a deployment needs, SkyPilot-shaped, read from YAML.

Example::

    name: chat
    replicas: 2
    regions: ["eu-*", us-east]      # wildcards; omitted = anywhere
    countries: [DE, FR]             # optional
    providers: [datacenter, miner]  # optional
    gpus: [H100, A100]              # candidates, most preferred first
    min_gpu_memory_gb: 40
    min_link_tier: high             # low < medium < high < ultra
    verified_only: true
    num_gpus: 1                     # per replica
    num_cpus: 0.1                   # per replica
    run:
      actor: mypkg.models:Chat      # a class by import path (or function: mypkg.fns:answer)
      args: []
      kwargs: {}
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ._errors import SpecError
from ._labels import LINK_TIERS, PROVIDER_KINDS

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?$")
_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")

_KNOWN = {
    "name", "replicas", "regions", "countries", "providers", "gpus", "min_gpu_memory_gb",
    "min_link_tier", "verified_only", "min_score", "allow_simulated", "num_gpus", "num_cpus",
    "placement_timeout_s", "start_timeout_s", "run",
}  # fmt: skip


@dataclass(frozen=True)
class RunSpec:
    """What each replica runs: a class (``actor``) or a function (``function``) by import path.

    ``serve: cloud`` (with an optional split ``config``) is shorthand for the cloud tier's
    replica class, :class:`tensorfabric.pool._tiers.CloudTierReplica`."""

    kind: str  # "actor" | "function"
    target: str  # "package.module:Name"
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSpec:
        kinds = [k for k in ("actor", "function", "serve") if k in data]
        if len(kinds) != 1:
            raise SpecError(
                "run: give exactly one of 'actor: pkg.module:Class', "
                "'function: pkg.module:func' or 'serve: cloud'"
            )
        kind = kinds[0]
        if kind == "serve":
            from ._tiers import SERVE_TIERS

            tier = str(data["serve"])
            if tier not in SERVE_TIERS:
                raise SpecError(
                    f"run.serve={tier!r}: the pool runs the {', '.join(SERVE_TIERS)} tier "
                    "(edges run on the edge devices)"
                )
            extra = set(data) - {"serve", "config"}
            if extra:
                raise SpecError(f"run: unknown field(s) {', '.join(sorted(extra))}")
            return cls("actor", SERVE_TIERS[tier], (), {"config": dict(data.get("config") or {})})
        target = str(data[kind])
        if not _TARGET.match(target):
            raise SpecError(f"run.{kind}={target!r}: use the form 'package.module:Name'")
        extra = set(data) - {kind, "args", "kwargs"}
        if extra:
            raise SpecError(f"run: unknown field(s) {', '.join(sorted(extra))}")
        return cls(kind, target, tuple(data.get("args") or ()), dict(data.get("kwargs") or {}))


@dataclass(frozen=True)
class DeploymentSpec:
    """A validated deployment spec. Build it with :meth:`from_dict` or :meth:`from_yaml`."""

    name: str
    run: RunSpec
    replicas: int = 1
    regions: tuple[str, ...] = ()
    countries: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()
    gpus: tuple[str, ...] = ()
    min_gpu_memory_gb: float = 0.0
    min_link_tier: str = "low"
    verified_only: bool = False
    min_score: float = 0.0
    allow_simulated: bool = False
    num_gpus: float = 1.0
    num_cpus: float = 0.0
    placement_timeout_s: float = 10.0
    start_timeout_s: float = 300.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeploymentSpec:
        if not isinstance(data, Mapping):
            raise SpecError("a deployment spec is a mapping (YAML object) at the top level")
        unknown = set(data) - _KNOWN
        if unknown:
            raise SpecError(
                f"unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_KNOWN))}"
            )
        for required in ("name", "run"):
            if required not in data:
                raise SpecError(f"missing required field {required!r}")
        name = str(data["name"])
        if not _NAME.match(name):
            raise SpecError(f"name={name!r}: use lowercase letters, digits and '-' (max 42)")
        spec = cls(
            name=name,
            run=RunSpec.from_dict(data["run"]),
            replicas=_int(data, "replicas", 1, minimum=1),
            regions=_strs(data, "regions"),
            countries=_strs(data, "countries"),
            providers=_strs(data, "providers"),
            gpus=_strs(data, "gpus"),
            min_gpu_memory_gb=_float(data, "min_gpu_memory_gb", 0.0),
            min_link_tier=str(data.get("min_link_tier", "low")),
            verified_only=bool(data.get("verified_only", False)),
            min_score=_float(data, "min_score", 0.0),
            allow_simulated=bool(data.get("allow_simulated", False)),
            num_gpus=_float(data, "num_gpus", 1.0),
            num_cpus=_float(data, "num_cpus", 0.0),
            placement_timeout_s=_float(data, "placement_timeout_s", 10.0, minimum=0.1),
            start_timeout_s=_float(data, "start_timeout_s", 300.0, minimum=0.1),
        )
        if spec.min_link_tier not in LINK_TIERS:
            raise SpecError(
                f"min_link_tier={spec.min_link_tier!r}: use one of {', '.join(LINK_TIERS)}"
            )
        bad = [p for p in spec.providers if p not in PROVIDER_KINDS]
        if bad:
            raise SpecError(f"providers: {bad} unknown; use {', '.join(PROVIDER_KINDS)}")
        return spec

    @classmethod
    def from_yaml(cls, path: str | Path) -> DeploymentSpec:
        import yaml  # pyyaml ships with the ray extra

        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise SpecError(f"cannot read spec {path}: {exc}") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpecError(f"{path} is not valid YAML: {exc}") from exc
        return cls.from_dict(data)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _strs(data: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = data.get(key) or ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise SpecError(f"{key}: expected a list of strings, got {type(value).__name__}")
    return tuple(str(v) for v in value)


def _float(data: Mapping[str, Any], key: str, default: float, minimum: float = 0.0) -> float:
    try:
        value = float(data.get(key, default))
    except (TypeError, ValueError):
        raise SpecError(f"{key}={data.get(key)!r}: expected a number") from None
    if value < minimum:
        raise SpecError(f"{key}={value}: must be >= {minimum}")
    return value


def _int(data: Mapping[str, Any], key: str, default: int, minimum: int = 0) -> int:
    value = data.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SpecError(f"{key}={value!r}: expected an integer >= {minimum}")
    return value
