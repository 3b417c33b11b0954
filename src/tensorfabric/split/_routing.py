"""Routing policies: decide whether the edge answers a request or escalates it to the cloud.

A policy sees a :class:`RouteRequest` (sizes, the user's explicit choice, PII counts) and may
decide up front (:meth:`RoutingPolicy.pre_route`). If it returns ``None`` the edge model runs a
short *probe* (the first ``probe_tokens`` tokens of its answer, with their log-probabilities) and
:meth:`RoutingPolicy.after_probe` decides from that measurable signal. This is the cascade of
FrugalGPT / Hybrid LLM with the scorer replaced by the edge model's own token confidence, plus
RouteLLM-style threshold calibration (:func:`calibrate_threshold`).

Every decision carries a ``reason``; the server returns it in the response (``tensorfabric``
field and ``x-tensorfabric-*`` headers) and counts it in Prometheus metrics.
"""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ._errors import SplitConfigError

__all__ = [
    "ConfidencePolicy",
    "Decision",
    "FixedPolicy",
    "Probe",
    "RouteRequest",
    "RoutingPolicy",
    "calibrate_threshold",
    "make_policy",
    "task_kind",
]

Tier = Literal["edge", "cloud"]

TASK_KINDS = ("fact", "math", "translate", "chat", "write", "explain", "summarize", "advice", "code",
              "reasoning")  # fmt: skip
#: Defaults from ``bench/routing_calibrate.py`` on the shipped prompt set
#: (``split/data/routing_prompts.json``) for the float32 edge model (vLLM run, 2026-11-30): the
#: threshold keeps 80% of the prompts at the edge; every kind's edge answers matched the cloud's,
#: so no kind goes to the cloud unprobed. docs/benchmarks/serve_vllm.md has the run.
DEFAULT_THRESHOLD = -0.98
DEFAULT_CLOUD_KINDS: tuple[str, ...] = ()


@dataclass(frozen=True)
class RouteRequest:
    """What a policy may look at. ``explicit`` is the user's choice (``edge``/``cloud``) or None."""

    prompt_tokens: int
    max_tokens: int
    explicit: Tier | None = None
    pii_counts: Mapping[str, int] = field(default_factory=dict)
    stream: bool = False
    text: str = ""  # the last user message (scrubbed): what cheap classifiers look at


@dataclass(frozen=True)
class Probe:
    """The edge model's first tokens for this request and their log-probabilities (natural log)."""

    token_ids: Sequence[int]
    logprobs: Sequence[float]
    finished: bool  # the probe already hit a stop token: the edge answer is complete

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else 0.0

    @property
    def min_logprob(self) -> float:
        return min(self.logprobs) if self.logprobs else 0.0


@dataclass(frozen=True)
class Decision:
    """Where a request is answered and why. ``confidence`` is the probe score when one ran."""

    tier: Tier
    reason: str
    confidence: float | None = None


#: Task kinds by the first rule that matches the (lower-cased) last user message. A cheap
#: classifier: a few regular expressions, microseconds per prompt, run before any model.
_KIND_RULES: tuple[tuple[str, str], ...] = (
    ("code", r"\b(python|javascript|sql|function|code|git|regex|compile|bash)\b"),
    ("translate", r"\btranslat|\bhow do you say\b|\bin (spanish|french|german|italian|portuguese)\b"),
    ("summarize", r"\bsummar|\btl;?dr\b"),
    ("write", r"^(write|compose|draft|suggest a name)\b|\b(poem|haiku|limerick|story|email|essay)\b"),
    ("explain", r"^(explain|describe|why|how does|how do|what are the (main )?differences?)\b|\bdifference between\b"),
    ("math", r"\d\s*[-+*/x%]\s*\d|\b(times|plus|minus|divided|square root|percent|\d+%)\b"),
    ("reasoning", r"\b(if all|which is heavier|what comes next|cost[s]? \$|explain briefly)\b"),
    ("advice", r"^(how can i|how do i|what should i|give (me )?(three|\d) (tips|ideas))\b"),
    ("fact", r"^(what|who|which|where|when|name|how many)\b"),
    ("chat", r""),
)


def task_kind(text: str) -> str:
    """The task kind of a prompt (``fact``, ``math``, ``translate``, ``chat``, ``write``,
    ``explain``, ``summarize``, ``advice``, ``code``, ``reasoning``) by keyword rules."""
    import re

    t = " ".join(text.lower().split())
    for kind, rule in _KIND_RULES:
        if re.search(rule, t):
            return kind
    return "chat"


class RoutingPolicy(ABC):
    """Pluggable routing. Subclass it and name it in the config as ``module:Class``.

    Implementations must be cheap and thread-safe; they run on the edge for every request.
    """

    #: tokens the edge generates before :meth:`after_probe` is asked (0: never probe)
    probe_tokens: int = 0

    @abstractmethod
    def pre_route(self, req: RouteRequest) -> Decision | None:
        """Decide before running any model, or return None to ask for a probe."""

    def after_probe(self, req: RouteRequest, probe: Probe) -> Decision:
        """Decide from the edge model's probe. The default keeps the request at the edge."""
        return Decision("edge", "probe", probe.mean_logprob)


class FixedPolicy(RoutingPolicy):
    """Always the same tier (``edge_only``, ``cloud_only``); explicit user choice still wins."""

    def __init__(self, tier: Tier, *, allow_user_choice: bool = True) -> None:
        self.tier = tier
        self.allow_user_choice = allow_user_choice

    def pre_route(self, req: RouteRequest) -> Decision | None:
        if self.allow_user_choice and req.explicit is not None:
            return Decision(req.explicit, "user_choice")
        return Decision(self.tier, f"{self.tier}_only")


class ConfidencePolicy(RoutingPolicy):
    """The default: user choice, then size rules, then the edge model's token confidence.

    - ``explicit`` choice (model name or header) wins when ``allow_user_choice``.
    - Requests over ``edge_max_prompt_tokens`` or asking more than ``edge_max_new_tokens`` go to
      the cloud (``reason="size"``); the edge model is small and its context short.
    - Otherwise the edge generates ``probe_tokens`` tokens; if their mean (or min, per
      ``metric``) log-probability is at least ``threshold`` the edge keeps the request
      (``reason="confident"``), else it escalates (``reason="low_confidence"``).
    """

    def __init__(
        self,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        metric: Literal["mean", "min"] = "mean",
        probe_tokens: int = 8,
        edge_max_prompt_tokens: int = 1024,
        edge_max_new_tokens: int = 512,
        allow_user_choice: bool = True,
        cloud_kinds: Sequence[str] = DEFAULT_CLOUD_KINDS,
        spill: bool = True,
    ) -> None:
        if metric not in ("mean", "min"):
            raise SplitConfigError(f"routing.metric must be 'mean' or 'min', got {metric!r}")
        if probe_tokens < 1:
            raise SplitConfigError("routing.probe_tokens must be at least 1")
        if not math.isfinite(threshold) or threshold > 0:
            raise SplitConfigError(
                f"routing.threshold is a log-probability (<= 0), got {threshold!r}"
            )
        if isinstance(cloud_kinds, str) or not all(isinstance(k, str) for k in cloud_kinds):
            raise SplitConfigError("routing.cloud_kinds must be a list of task kinds")
        unknown = set(cloud_kinds) - set(TASK_KINDS)
        if unknown:
            raise SplitConfigError(f"routing.cloud_kinds: unknown kind(s) {sorted(unknown)}; known: {list(TASK_KINDS)}")
        self.threshold = float(threshold)
        self.metric = metric
        self.probe_tokens = int(probe_tokens)
        self.edge_max_prompt_tokens = int(edge_max_prompt_tokens)
        self.edge_max_new_tokens = int(edge_max_new_tokens)
        self.allow_user_choice = allow_user_choice
        self.cloud_kinds = frozenset(cloud_kinds)
        self.spill = bool(spill)  # the edge server sends auto requests on while the edge is full

    def pre_route(self, req: RouteRequest) -> Decision | None:
        if self.allow_user_choice and req.explicit is not None:
            return Decision(req.explicit, "user_choice")
        if req.prompt_tokens > self.edge_max_prompt_tokens:
            return Decision("cloud", "size")
        if req.max_tokens > self.edge_max_new_tokens:
            return Decision("cloud", "size")
        if req.text and self.cloud_kinds and task_kind(req.text) in self.cloud_kinds:
            return Decision("cloud", "task_kind")
        return None

    def score(self, probe: Probe) -> float:
        return probe.mean_logprob if self.metric == "mean" else probe.min_logprob

    def after_probe(self, req: RouteRequest, probe: Probe) -> Decision:
        s = self.score(probe)
        if s >= self.threshold:
            return Decision("edge", "confident", s)
        return Decision("cloud", "low_confidence", s)


def calibrate_threshold(scores: Sequence[float], edge_share: float) -> float:
    """The threshold that keeps ``edge_share`` of requests with these probe scores at the edge.

    RouteLLM's calibration idea: pick the threshold from a sample of real prompts so that a
    target share of traffic goes to each tier.
    """
    if not 0.0 <= edge_share <= 1.0:
        raise SplitConfigError(f"edge_share must be within [0, 1], got {edge_share}")
    if not scores:
        raise SplitConfigError("calibrate_threshold needs at least one score")
    ordered = sorted(scores, reverse=True)
    keep = round(edge_share * len(ordered))
    if keep <= 0:
        return min(0.0, ordered[0] + 1e-6) if ordered[0] < 0 else 0.0
    return min(0.0, ordered[keep - 1])


def make_policy(spec: Mapping[str, Any]) -> RoutingPolicy:
    """Build a policy from the config's ``routing`` section (already validated)."""
    kind = spec.get("policy", "confidence")
    opts = {k: v for k, v in spec.items() if k != "policy"}
    if kind == "confidence":
        return ConfidencePolicy(**opts)
    if kind in ("edge_only", "cloud_only"):
        return FixedPolicy("edge" if kind == "edge_only" else "cloud", **opts)
    if isinstance(kind, str) and ":" in kind:
        module, _, attr = kind.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise SplitConfigError(
                f"routing.policy {kind!r} could not be imported ({exc}); "
                "name a RoutingPolicy subclass as 'package.module:ClassName'"
            ) from exc
        policy = cls(**opts)
        if not isinstance(policy, RoutingPolicy):
            raise SplitConfigError(f"routing.policy {kind!r} is not a RoutingPolicy subclass")
        return policy
    raise SplitConfigError(
        f"unknown routing.policy {kind!r}: use confidence, edge_only, cloud_only or module:Class"
    )
