"""Presidio, offline: its analyzer with pattern recognizers only, plus our rules.

Presidio's default :class:`AnalyzerEngine` loads a spaCy model that is not on PyPI; here it runs
with :class:`NoOpNlpEngine` (no tokens, no NER) and a registry holding Presidio's own pattern and
checksum recognizers (email, card, phone, IP, ES NIF/NIE, DE tax id, UK NINO) next to ours
(:mod:`._pii_rules`), all registered for one language tag because a prompt's language is not
known in advance. The anonymizer's ``custom`` operator puts the surrogates in.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ._pii_rules import FIRST_NAMES, PARTICLES, PLACE_HEADS, STOP, Rule, fail_closed_rules, rules

__all__ = ["KINDS", "build_analyzer", "to_kind"]

_HINT = "PII scrubbing needs Presidio: pip install 'tensorfabric[pii]'"
LANG = "en"  # the tag every recognizer is registered under (prompts come in any language)

# Presidio entity names -> ours.
_PRESIDIO_KINDS = {
    "EMAIL_ADDRESS": "EMAIL", "CREDIT_CARD": "CARD", "PHONE_NUMBER": "PHONE", "IP_ADDRESS": "IP",
    "IBAN_CODE": "IBAN", "ES_NIF": "NATIONAL_ID", "ES_NIE": "NATIONAL_ID",
    "DE_TAX_ID": "NATIONAL_ID", "UK_NINO": "NINO", "US_SSN": "SSN",
}  # fmt: skip
KINDS = (
    "EMAIL", "PHONE", "CARD", "IBAN", "IP", "SSN", "NINO", "NATIONAL_ID", "PASSPORT", "DOB",
    "ADDRESS", "PERSON", "ID",
)  # fmt: skip


def to_kind(entity_type: str) -> str:
    return _PRESIDIO_KINDS.get(entity_type, entity_type)


def _presidio() -> Any:
    try:
        import presidio_analyzer
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(_HINT) from exc
    # tldextract (Presidio's email check) would fetch the public suffix list over the network.
    logging.getLogger("tldextract").setLevel(logging.CRITICAL)
    return presidio_analyzer


def _name_words(value: str) -> str:
    """The words of a name up to the first that cannot belong to one ("maria gonzalez and")."""
    words = value.split()
    keep: list[str] = []
    for i, w in enumerate(words):
        bare = w.lower().strip(",.;:")
        particle = bare in PARTICLES and i > 0 and i + 1 < len(words)
        if bare in STOP and not particle:
            break
        keep.append(w)
        if w.endswith((",", ".", ";", ":")):
            break
    while keep and keep[-1].lower().strip(",.;:") in PARTICLES:
        keep.pop()
    if not keep:
        return ""
    return value[: value.index(keep[-1], sum(len(k) for k in keep[:-1])) + len(keep[-1])]


def _rule_recognizer(pa: Any, name: str, items: Sequence[Rule]) -> Any:
    """One Presidio recognizer that runs a list of :class:`Rule` objects."""

    class RuleRecognizer(pa.EntityRecognizer):
        def load(self) -> None:
            pass

        def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None) -> list[Any]:
            out = []
            for r in items:
                if r.kind not in entities:
                    continue
                for m in r.pattern.finditer(text):
                    start, end = m.span(r.group)
                    if r.fit is not None:
                        n = r.fit(text[start:end])
                        if n is None:
                            continue
                        end = start + n
                    while end < len(text) and text[end - 1].isalnum() and (
                        text[end].isalnum() or text[end] in "-'’" and text[end + 1 : end + 2].isalnum()
                    ):
                        end += 1  # never cut a word in two: restoring matches whole words
                    value = text[start:end]
                    if r.kind == "PERSON":
                        value = _name_words(value)
                    value = value.rstrip(" .,;:")
                    end = start + len(value)
                    if value and (r.check is None or r.check(value)):
                        out.append(pa.RecognizerResult(r.kind, start, end, r.score))
            return out

    kinds = sorted({r.kind for r in items})
    return RuleRecognizer(supported_entities=kinds, supported_language=LANG, name=name)


def _names_recognizer(pa: Any, names: Iterable[str]) -> Any:
    """Given names (built-in list plus ``pii.names``) in any case, with the surname after."""
    listed = sorted({n.strip().lower() for n in names if n.strip()} | FIRST_NAMES, key=len, reverse=True)
    alt = "|".join(re.escape(n) for n in listed)
    word = r"[^\W\d_][\w'’-]+"
    pattern = re.compile(rf"(?<![\w@.])(?:{alt})(?:[ \t]+{word}){{0,3}}(?![\w@])", re.IGNORECASE)
    place = re.compile(rf"(?i)(?:{'|'.join(PLACE_HEADS)})[ \t]+$")

    def trim(m: re.Match[str]) -> str:
        words = m.group().split()
        keep = [words[0]]
        style = (words[0].isupper(), words[0].islower())
        for w in words[1:]:
            if w.lower() in PARTICLES and w is not words[-1]:
                keep.append(w)
                continue
            if w.lower() in STOP or (w.isupper(), w.islower()) != style:
                break
            keep.append(w)
        while keep and keep[-1].lower() in PARTICLES:
            keep.pop()
        return " ".join(keep)

    class NameListRecognizer(pa.EntityRecognizer):
        def load(self) -> None:
            pass

        def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None) -> list[Any]:
            if "PERSON" not in entities:
                return []
            out = []
            for m in pattern.finditer(text):
                if place.search(text[max(0, m.start() - 8) : m.start()]):
                    continue  # "San Francisco", "São Paulo"
                if m.group().lower() in listed:  # a multi-word pii.names entry, whole
                    value = m.group()
                else:
                    value = trim(m)
                out.append(pa.RecognizerResult("PERSON", m.start(), m.start() + len(value), 0.7))
            return out

    return NameListRecognizer(supported_entities=["PERSON"], supported_language=LANG, name="NameList")


def build_analyzer(
    *, names: Iterable[str] = (), fail_closed: bool = True, extra: Sequence[Any] = ()
) -> tuple[Any, list[str]]:
    """(AnalyzerEngine, entity names) ready to run offline. ``extra``: more Presidio
    recognizers (e.g. a GLiNER or spaCy NER one where its weights are installed)."""
    pa = _presidio()
    from presidio_analyzer.nlp_engine import NoOpNlpEngine
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer, DeTaxIdRecognizer, EmailRecognizer, EsNieRecognizer, EsNifRecognizer,
        IpRecognizer, PhoneRecognizer, UkNinoRecognizer,
    )  # fmt: skip

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return re.search(r"\.[A-Za-z]{2,}$", pattern_text) is not None

    registry = pa.RecognizerRegistry(supported_languages=[LANG])
    regions = ("US", "GB", "DE", "FR", "ES", "PT", "BR", "IT", "NL", "IE", "CA", "IN", "IL", "MX")
    for rec in (
        OfflineEmailRecognizer(supported_language=LANG),
        CreditCardRecognizer(supported_language=LANG),
        PhoneRecognizer(supported_language=LANG, supported_regions=regions),
        IpRecognizer(supported_language=LANG),
        EsNifRecognizer(supported_language=LANG),
        EsNieRecognizer(supported_language=LANG),
        DeTaxIdRecognizer(supported_language=LANG),
        UkNinoRecognizer(supported_language=LANG),
        _rule_recognizer(pa, "EdgeRules", rules()),
        _names_recognizer(pa, names),
        *extra,
    ):
        registry.add_recognizer(rec)
    if fail_closed:
        registry.add_recognizer(_rule_recognizer(pa, "FailClosed", fail_closed_rules()))
    nlp = NoOpNlpEngine(models=[{"lang_code": LANG, "model_name": "none"}])
    nlp.load()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "context words need tokens": we give none on purpose
        analyzer = pa.AnalyzerEngine(registry=registry, nlp_engine=nlp, supported_languages=[LANG])
    entities = sorted({e for r in registry.recognizers for e in r.supported_entities})
    return analyzer, entities


def analyze(analyzer: Any, entities: list[str], text: str, threshold: float) -> list[Any]:
    return list(analyzer.analyze(text, language=LANG, entities=entities, score_threshold=threshold))


def overlap_free(results: Iterable[Any], kind_of: Callable[[str], str]) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, kind) spans: higher score first, then the longer span."""
    ranked = sorted(results, key=lambda r: (-r.score, -(r.end - r.start), r.start))
    taken: list[tuple[int, int, str]] = []
    for r in ranked:
        if all(r.end <= s or r.start >= e for s, e, _ in taken):
            taken.append((r.start, r.end, kind_of(r.entity_type)))
    return sorted(taken)
