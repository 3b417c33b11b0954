"""PII scrubbing at the edge: typed, numbered placeholders out, originals back in the reply.

Nothing here needs torch or a model. Built-in recognizers are regular expressions backed by a
checksum or range check where the format has one (Luhn for card numbers, ISO 13616 mod-97 for
IBANs, the SSA rules for US SSNs, octet ranges for IPv4, :mod:`ipaddress` for IPv6), so a random
16-digit number is not taken for a card. Person names have no such structure: a name detector is
an optional plug-in (:class:`NameDetector`), e.g. a gazetteer of customer names or a Presidio /
GLiNER wrapper.

The mapping from placeholder to original (:class:`PiiMapping`) never leaves the edge process.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

__all__ = [
    "Entity",
    "GazetteerNameDetector",
    "NameDetector",
    "PiiMapping",
    "PiiScrubber",
    "Recognizer",
    "StreamRestorer",
    "default_recognizers",
    "iban_valid",
    "luhn_valid",
]

PLACEHOLDER_RE = re.compile(r"<([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*)_(\d+)>")
_MAX_PLACEHOLDER = 40  # longest "<KIND_n>" a stream restorer holds back for


@dataclass(frozen=True)
class Entity:
    """One detected span: ``text[start:end]`` is a ``kind`` (EMAIL, PHONE, CARD, ...)."""

    kind: str
    start: int
    end: int
    text: str


@runtime_checkable
class NameDetector(Protocol):
    """Plug-in interface for detectors without a checkable format (names, places).

    ``detect(text)`` returns ``(start, end, kind)`` spans, ``kind`` in upper case (``PERSON``).
    It runs on the edge only, once per message, and must be thread-safe.
    """

    def detect(self, text: str) -> Iterable[tuple[int, int, str]]: ...


class GazetteerNameDetector:
    """Finds names from a list (a customer directory, staff list), whole words only.

    Case-sensitive by default, because "Rose" the name and "rose" the verb differ.
    """

    def __init__(
        self, names: Iterable[str], *, kind: str = "PERSON", case_sensitive: bool = True
    ) -> None:
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


# ----------------------------------------------------------------------------- checksums


def luhn_valid(number: str) -> bool:
    """Luhn (mod 10) check over the digits of ``number``; separators are ignored."""
    digits = [int(c) for c in number if c.isdigit()]
    if len(digits) < 2:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


# ISO 13616 lengths for the countries users are most likely to paste; others: 15..34 allowed.
_IBAN_LENGTHS = {
    "AD": 24, "AT": 20, "BE": 16, "BG": 22, "CH": 21, "CY": 28, "CZ": 24, "DE": 22, "DK": 18,
    "EE": 20, "ES": 24, "FI": 18, "FR": 27, "GB": 22, "GR": 27, "HR": 21, "HU": 28, "IE": 22,
    "IS": 26, "IT": 27, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MT": 31, "NL": 18,
    "NO": 15, "PL": 28, "PT": 25, "RO": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "TR": 26,
}  # fmt: skip


def iban_valid(iban: str) -> bool:
    """ISO 13616 check: known country length (where listed) and mod-97 remainder 1."""
    s = re.sub(r"[\s-]", "", iban).upper()
    if not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]{11,30}", s):
        return False
    want = _IBAN_LENGTHS.get(s[:2])
    if want is not None and len(s) != want:
        return False
    rearranged = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


# ----------------------------------------------------------------------------- recognizers


@dataclass
class Recognizer:
    """A regex for candidates plus an optional ``validate(match_text) -> bool`` check.

    ``trim(match_text) -> int | None`` may shorten a greedy match to its valid length.
    """

    kind: str
    pattern: re.Pattern[str]
    validate: Callable[[str], bool] | None = None
    trim: Callable[[str], int | None] | None = None

    def find(self, text: str) -> list[Entity]:
        out = []
        for m in self.pattern.finditer(text):
            start, end = m.start(), m.end()
            if self.trim is not None:
                n = self.trim(m.group())
                if n is None:
                    continue
                end = start + n
            span = text[start:end]
            if self.validate is None or self.validate(span):
                out.append(Entity(self.kind, start, end, span))
        return out


def _iban_trim(candidate: str) -> int | None:
    """Cut a greedy IBAN match to its country's length (counting alphanumerics only)."""
    want = _IBAN_LENGTHS.get(candidate[:2].upper())
    if want is None:
        return len(candidate.rstrip())
    seen = 0
    for i, c in enumerate(candidate):
        if c.isalnum():
            seen += 1
            if seen == want:
                return i + 1
    return None


def _ssn_valid(s: str) -> bool:
    d = re.sub(r"\D", "", s)
    area, group, serial = d[:3], d[3:5], d[5:]
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _phone_valid(s: str) -> bool:
    digits = sum(c.isdigit() for c in s)
    if s.startswith("+"):
        return 8 <= digits <= 15
    # Without a country code ask for a separator-rich 9+ digit shape, so dates, years and
    # amounts ("2024-01-15", "1,000,000") stay untouched.
    # "ddd-dd-dddd" is the SSN shape (its own recognizer validates it).
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}.*|\d{3}[- ]\d{2}[- ]\d{4}", s):
        return False
    return 9 <= digits <= 15


def _ipv6_valid(s: str) -> bool:
    if s.count(":") < 2:
        return False
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return True


_NINO_BAD_PREFIX = {"BG", "GB", "NK", "KN", "TN", "NT", "ZZ"}
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"


def default_recognizers() -> list[Recognizer]:
    """The built-in recognizers, in priority order (earlier wins on overlapping spans)."""
    return [
        Recognizer("EMAIL", re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")),
        Recognizer("IBAN", re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]){11,30}"), iban_valid, _iban_trim),
        Recognizer("CARD", re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])"), luhn_valid),
        Recognizer("SSN", re.compile(r"(?<![\d-])\d{3}[- ]\d{2}[- ]\d{4}(?![\d-])"), _ssn_valid),
        Recognizer("NINO", re.compile(r"(?<![A-Za-z0-9])[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D](?![A-Za-z0-9])"),
                   lambda s: s[:2] not in _NINO_BAD_PREFIX),
        Recognizer("IP", re.compile(rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\d.]*\d)")),
        Recognizer("IP", re.compile(r"(?<![0-9A-Fa-f:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![0-9A-Fa-f:])"), _ipv6_valid),
        Recognizer("PHONE", re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,4}(?![\w])"), _phone_valid),
    ]  # fmt: skip


# ----------------------------------------------------------------------------- mapping


@dataclass
class PiiMapping:
    """Placeholder <-> original for one conversation. Stays at the edge.

    The same original always gets the same placeholder, so a model can refer back to it.
    """

    by_original: dict[tuple[str, str], str] = field(default_factory=dict)
    by_placeholder: dict[str, str] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)

    def placeholder(self, kind: str, original: str) -> str:
        key = (kind, original)
        ph = self.by_original.get(key)
        if ph is None:
            n = self.counters.get(kind, 0) + 1
            self.counters[kind] = n
            ph = f"<{kind}_{n}>"
            self.by_original[key] = ph
            self.by_placeholder[ph] = original
        return ph

    def restore(self, text: str) -> str:
        """Put the originals back; placeholders this mapping never issued stay as they are."""
        if not self.by_placeholder:
            return text
        return PLACEHOLDER_RE.sub(lambda m: self.by_placeholder.get(m.group(), m.group()), text)

    def counts(self) -> dict[str, int]:
        return dict(self.counters)

    def __len__(self) -> int:
        return len(self.by_placeholder)


class PiiScrubber:
    """Replaces PII with typed placeholders (``<EMAIL_1>``) and records the mapping.

    ``kinds``: restrict to these entity kinds (default: all). ``name_detector``: optional plug-in.
    ``extra``: more :class:`Recognizer` objects, checked after the built-in ones.
    """

    def __init__(
        self,
        *,
        kinds: Sequence[str] | None = None,
        name_detector: NameDetector | None = None,
        extra: Sequence[Recognizer] = (),
    ) -> None:
        recs = default_recognizers() + list(extra)
        if kinds is not None:
            wanted = {k.upper() for k in kinds}
            known = {r.kind for r in recs} | {"PERSON"}
            unknown = wanted - known
            if unknown:
                from ._errors import SplitConfigError

                raise SplitConfigError(
                    f"unknown PII kinds {sorted(unknown)}; known kinds: {sorted(known)}"
                )
            recs = [r for r in recs if r.kind in wanted]
        self.recognizers = recs
        self.name_detector = name_detector

    def find(self, text: str) -> list[Entity]:
        """Non-overlapping entities, left to right; on overlap the earlier recognizer wins."""
        found: list[tuple[int, Entity]] = []
        for prio, rec in enumerate(self.recognizers):
            found.extend((prio, e) for e in rec.find(text))
        if self.name_detector is not None:
            prio = len(self.recognizers)
            for start, end, kind in self.name_detector.detect(text):
                found.append((prio, Entity(kind.upper(), start, end, text[start:end])))
        found.sort(key=lambda pe: (pe[0], pe[1].start))
        taken: list[Entity] = []
        for _, e in found:
            if all(e.end <= t.start or e.start >= t.end for t in taken):
                taken.append(e)
        return sorted(taken, key=lambda e: e.start)

    def scrub(self, text: str, mapping: PiiMapping | None = None) -> tuple[str, PiiMapping]:
        """Return ``text`` with every entity replaced, and the (updated) mapping."""
        mapping = mapping if mapping is not None else PiiMapping()
        out, pos = [], 0
        for e in self.find(text):
            out.append(text[pos : e.start])
            out.append(mapping.placeholder(e.kind, e.text))
            pos = e.end
        out.append(text[pos:])
        return "".join(out), mapping


class StreamRestorer:
    """Restores placeholders in a stream of text chunks; a placeholder may span chunks.

    ``feed(chunk)`` returns the text that is safe to emit now; a trailing piece that could still
    grow into a placeholder (``"<EMA"``) is held back until the next chunk or :meth:`flush`.
    """

    _PARTIAL = re.compile(r"<(?:[A-Z][A-Z0-9_]*(?:\d+)?)?$")

    def __init__(self, mapping: PiiMapping) -> None:
        self.mapping = mapping
        self._held = ""

    def feed(self, chunk: str) -> str:
        text = self._held + chunk
        cut = text.rfind("<")
        if cut != -1 and len(text) - cut <= _MAX_PLACEHOLDER and ">" not in text[cut:]:
            if self._PARTIAL.fullmatch(text[cut:]) or text[cut:] == "<":
                self._held = text[cut:]
                return self.mapping.restore(text[:cut])
        self._held = ""
        return self.mapping.restore(text)

    def flush(self) -> str:
        text, self._held = self._held, ""
        return self.mapping.restore(text)
