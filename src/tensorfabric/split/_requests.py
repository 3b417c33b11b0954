"""What one edge request is and yields: the request, its route, its end; stop strings; the
scrubber the config asks for. Used by the edge tier (:mod:`._edge`) and the HTTP layer."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from ._config import DeployConfig
from ._errors import SplitConfigError
from ._pii import NameDetector, PiiScrubber
from ._routing import Decision

__all__ = ["ChatRequest", "Done", "RouteInfo", "StopCutter", "build_scrubber"]


@dataclass
class ChatRequest:
    messages: list[dict[str, str]]
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stream: bool = False
    explicit: str | None = None  # "edge" | "cloud" | None
    stop: list[str] = field(default_factory=list)  # cut the answer at the first of these


class StopCutter:
    """Applies ``stop`` strings to streamed text: emits what is safe, holds back what could be
    the start of a stop string, and reports when one was hit (text after it is dropped)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.keep = max((len(s) for s in self.stops), default=1) - 1
        self._held = ""
        self.hit = False

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        if self.hit:
            return ""
        text = self._held + text
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.hit, self._held = True, ""
            return text[: min(cuts)]
        safe = len(text) - self.keep if self.keep else len(text)
        self._held = text[max(safe, 0):]
        return text[: max(safe, 0)]

    def flush(self) -> str:
        text, self._held = self._held, ""
        return "" if self.hit else text


@dataclass
class RouteInfo:
    decision: Decision
    degraded: bool
    pii: dict[str, int]
    prompt_tokens: int


@dataclass
class Done:
    tier: str  # who produced the answer: edge | cloud | cloud+edge (edge finished it)
    reason: str
    degraded: bool
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    confidence: float | None = None
    pii: dict[str, int] = field(default_factory=dict)
    cloud_error: str | None = None


def build_scrubber(cfg: DeployConfig) -> PiiScrubber | None:
    p = cfg.pii
    if not p.enabled:
        return None
    detector: NameDetector | None = None
    if p.name_detector:
        module, _, attr = p.name_detector.partition(":")
        try:
            detector = getattr(importlib.import_module(module), attr)()
        except (ImportError, AttributeError, ValueError) as exc:
            raise SplitConfigError(
                f"pii.name_detector {p.name_detector!r} could not be loaded ({exc}); "
                "name a factory as 'package.module:function'"
            ) from exc
    return PiiScrubber(kinds=p.kinds, names=p.names or (), fail_closed=p.fail_closed,
                       name_detector=detector)
