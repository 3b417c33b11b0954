"""PII scrubbing at the edge: realistic surrogates out, originals back in the reply.

Detection is Microsoft Presidio's analyzer running offline (pattern and checksum recognizers,
no spaCy model) plus our rules for what it lacks without NER (:mod:`._pii_rules`): names after
"my name is" / salutations / sign-offs, a case-insensitive given-name list, street addresses,
dates of birth, passports, national IDs with their check digits, and a fail-closed sweep (any
remaining run of 6+ digits, any capitalised pair after a trigger word).

Each value is replaced by a surrogate of the same kind and format (:mod:`._pii_surrogates`):
"jane.doe@example.com" -> "laura.keller@example.org", "4111 1111 1111 1111" ->
"4556 0213 8841 9073" (Luhn-valid). The mapping (:class:`PiiMapping`) never leaves the edge;
:meth:`PiiMapping.restore` and :class:`StreamRestorer` put the originals back, in any case and
with or without separators, also when a surrogate arrives split across streamed chunks.
"""

from __future__ import annotations

import random
import re
import secrets
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ._pii_checks import iban_valid, luhn_valid
from ._pii_engine import KINDS, analyze, build_analyzer, overlap_free, to_kind
from ._pii_surrogates import make_surrogate

__all__ = [
    "Entity",
    "GazetteerNameDetector",
    "NameDetector",
    "PiiMapping",
    "PiiScrubber",
    "Recognizer",
    "StreamRestorer",
    "iban_valid",
    "luhn_valid",
]

_SEP = " .-"


@dataclass(frozen=True)
class Entity:
    """One detected span: ``text[start:end]`` is a ``kind`` (EMAIL, PERSON, ADDRESS, ...)."""

    kind: str
    start: int
    end: int
    text: str


@runtime_checkable
class NameDetector(Protocol):
    """Plug-in interface for detectors without a checkable format (e.g. an NER model).

    ``detect(text)`` returns ``(start, end, kind)`` spans, ``kind`` in upper case (``PERSON``).
    It runs on the edge only, once per message, and must be thread-safe.
    """

    def detect(self, text: str) -> Iterable[tuple[int, int, str]]: ...


class GazetteerNameDetector:
    """Finds names from a list (a customer directory, staff list), whole words, any case."""

    def __init__(self, names: Iterable[str], *, kind: str = "PERSON", case_sensitive: bool = False) -> None:
        words = sorted({n.strip() for n in names if n.strip()}, key=len, reverse=True)
        flags = 0 if case_sensitive else re.IGNORECASE
        self.kind = kind
        self._re = (
            re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, words)) + r")(?!\w)", flags)
            if words
            else None
        )

    def detect(self, text: str) -> Iterable[tuple[int, int, str]]:
        if self._re is None:
            return []
        return [(m.start(), m.end(), self.kind) for m in self._re.finditer(text)]


@dataclass
class Recognizer:
    """An extra regex recognizer (``PiiScrubber(extra=[...])``), with an optional check."""

    kind: str
    pattern: re.Pattern[str]
    validate: Any = None

    def detect(self, text: str) -> Iterable[tuple[int, int, str]]:
        return [(m.start(), m.end(), self.kind) for m in self.pattern.finditer(text)
                if self.validate is None or self.validate(m.group())]  # fmt: skip


def _norm(s: str) -> str:
    return "".join(c for c in s.casefold() if c not in _SEP)


@dataclass
class PiiMapping:
    """Surrogate <-> original for one conversation. Stays at the edge.

    The same original (in any case) always gets the same surrogate, so a model can refer back
    to it; ``counts()`` says how many values of each kind were replaced.
    """

    by_original: dict[tuple[str, str], str] = field(default_factory=dict)
    by_surrogate: dict[str, str] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # "Nina" alone -> "Maria" alone
    rng: random.Random = field(default_factory=lambda: random.Random(secrets.randbits(64)))
    _pattern: re.Pattern[str] | None = field(default=None, repr=False)
    _norms: dict[str, str] = field(default_factory=dict, repr=False)

    def surrogate(self, kind: str, original: str, context: str = "") -> str:
        key = (kind, original.casefold())
        fake = self.by_original.get(key)
        if fake is None:
            taken = {_norm(s) for s in self.by_surrogate} | {_norm(o) for o in self.by_surrogate.values()}
            ctx = context.casefold()

            def avoid(cand: str) -> bool:
                n = _norm(cand)
                return n in taken or any(n.startswith(t) or t.startswith(n) for t in taken) or cand.casefold() in ctx

            fake = make_surrogate(kind, original, self.rng, avoid)
            self.counters[kind] = self.counters.get(kind, 0) + 1
            self.by_original[key] = fake
            self.by_surrogate[fake] = original
            if kind == "PERSON":
                self._alias(fake.split(), original.split(), ctx)
            elif kind == "EMAIL":  # "laura.keller" without its domain
                self._alias([fake.partition("@")[0]], [original.partition("@")[0]], ctx)
            self._pattern = None
        return fake

    def _alias(self, fw: list[str], ow: list[str], ctx: str) -> None:
        """A model often names a person by first or last name alone, or copies an address
        without its domain: map those pieces back too."""
        if len(fw) != len(ow) or len(set(fw)) < len(fw):
            return
        pairs = [(fw[0], ow[0]), (fw[-1], ow[-1])] if len(fw) > 1 else [(fw[0], ow[0])]
        for f, o in pairs:
            if f.casefold() not in ctx and f not in self.aliases:
                self.aliases[f] = o

    def _compiled(self) -> re.Pattern[str]:
        if self._pattern is None:
            alts = []
            table = {**self.aliases, **self.by_surrogate}
            for fake in sorted(table, key=len, reverse=True):
                body = "".join("[ .\\-]?" if c in _SEP else re.escape(c) for c in fake)
                alts.append(f"(?:{body})")
            self._norms = {_norm(f): o for f, o in table.items()}
            self._pattern = re.compile(r"(?<![\w])(?:" + "|".join(alts) + r")(?![\w])", re.IGNORECASE)
        return self._pattern

    def restore(self, text: str) -> str:
        """Put the originals back wherever a surrogate appears (any case, separators or not)."""
        if not self.by_surrogate:
            return text
        pat = self._compiled()
        return pat.sub(lambda m: self._norms.get(_norm(m.group()), m.group()), text)

    def could_start(self, tail: str) -> bool:
        """True if ``tail`` may be the beginning of a surrogate (stream hold-back)."""
        n = _norm(tail)
        if not n or tail[0] in _SEP:
            return False
        self._compiled()
        return any(s.startswith(n) for s in self._norms)

    @property
    def longest(self) -> int:
        return max((len(s) for s in self.by_surrogate), default=0)

    def counts(self) -> dict[str, int]:
        return dict(self.counters)

    def __len__(self) -> int:
        return len(self.by_surrogate)


class PiiScrubber:
    """Finds PII with Presidio (offline) and our rules, and replaces it with surrogates.

    ``kinds``: restrict to these kinds (default: all of :data:`KINDS`). ``names``: extra given
    or full names to catch in any case. ``fail_closed``: also replace remaining 6+ digit runs
    and capitalised pairs after a trigger word. ``name_detector`` / ``extra``: plug-ins (an NER
    model, more regexes). ``threshold``: Presidio's minimum score.
    """

    def __init__(
        self,
        *,
        kinds: Sequence[str] | None = None,
        names: Iterable[str] = (),
        fail_closed: bool = True,
        name_detector: NameDetector | None = None,
        extra: Sequence[Any] = (),
        threshold: float = 0.35,
    ) -> None:
        wanted = set(KINDS) if kinds is None else {k.upper() for k in kinds}
        unknown = wanted - set(KINDS)
        if unknown:
            from ._errors import SplitConfigError

            raise SplitConfigError(f"unknown PII kinds {sorted(unknown)}; known kinds: {list(KINDS)}")
        self.kinds = wanted
        self.threshold = threshold
        self.detectors: list[Any] = [d for d in [name_detector, *extra] if d is not None]
        self._analyzer, self._entities = build_analyzer(names=names, fail_closed=fail_closed)
        self._lock = threading.Lock()  # Presidio's engines are not documented thread-safe

    def find(self, text: str) -> list[Entity]:
        """Non-overlapping entities, left to right."""
        with self._lock:
            results = analyze(self._analyzer, self._entities, text, self.threshold)
        pa = __import__("presidio_analyzer")
        for det in self.detectors:
            for start, end, kind in det.detect(text):
                results.append(pa.RecognizerResult(kind.upper(), start, end, 0.9))
        spans = overlap_free(results, to_kind)
        out = []
        for s, e, k in spans:
            if k == "PHONE" and s > 0 and text[s - 1] == "+":
                s -= 1  # Presidio's span leaves out the "+" of the country code
            if k in self.kinds or k not in KINDS:
                out.append(Entity(k, s, e, text[s:e]))
        return out

    def scrub(self, text: str, mapping: PiiMapping | None = None) -> tuple[str, PiiMapping]:
        """Return ``text`` with every entity replaced by its surrogate, and the mapping."""
        mapping = mapping if mapping is not None else PiiMapping()
        out, pos = [], 0
        for e in self.find(text):
            out.append(text[pos : e.start])
            out.append(mapping.surrogate(e.kind, e.text, text))
            pos = e.end
        out.append(text[pos:])
        return "".join(out), mapping


class StreamRestorer:
    """Restores surrogates in a stream of text chunks; a surrogate may span chunks.

    ``feed(chunk)`` returns the text that is safe to emit now; a trailing piece that could still
    grow into a surrogate (``"laura.fi"``) is held back until the next chunk or :meth:`flush`.
    """

    def __init__(self, mapping: PiiMapping) -> None:
        self.mapping = mapping
        self._held = ""

    def feed(self, chunk: str) -> str:
        text = self._held + chunk
        if not self.mapping.by_surrogate:
            self._held = ""
            return text
        # A surrogate that ends exactly at the end might still continue (separators): hold it.
        window = 2 * self.mapping.longest + 4
        cut = len(text)
        for start in range(max(0, len(text) - window), len(text)):
            if (start == 0 or not text[start - 1].isalnum()) and self.mapping.could_start(text[start:]):
                cut = start
                break
        self._held = text[cut:]
        return self.mapping.restore(text[:cut])

    def flush(self) -> str:
        text, self._held = self._held, ""
        return self.mapping.restore(text)
