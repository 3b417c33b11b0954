"""Surrogates: fake values of the same kind and format as the PII they stand in for.

A small model copies "laura.fisher@example.org" or "4556 0213 8841 9073" faithfully, where it
rewrites "<EMAIL_1>" as "[YourEmail1]". Each surrogate keeps the original's layout (separators,
length, case style) and passes the same checks (Luhn, IBAN mod-97, NIF, CPF, DNI letter,
Steuer-ID), so the cloud model sees a plausible value and the edge can map it back.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from ._pii_checks import (
    cpf_fix, cpf_valid, dni_fix, dni_valid, iban_fix, luhn_fix, pt_nif_fix, pt_nif_valid,
    steuer_id_fix, steuer_id_valid,
)  # fmt: skip

__all__ = ["make_surrogate"]

_FIRST = [
    "Laura", "Daniel", "Clara", "Hugo", "Nina", "Oscar", "Irene", "Felix", "Alma", "Bruno",
    "Vera", "Tobias", "Greta", "Milan", "Edith", "Rafael", "Ines", "Jonas", "Livia", "Marcel",
]  # fmt: skip
_LAST = [
    "Fisher", "Moreau", "Lindqvist", "Okafor", "Brandt", "Castillo", "Novak", "Haines",
    "Ferreira", "Keller", "Rossi", "Duarte", "Whitaker", "Sandoval", "Hartmann", "Lambert",
]  # fmt: skip
_STREET = ["Maple", "Cedar", "Willow", "Harbor", "Juniper", "Orchard", "Linden", "Aspen", "Birch"]
_STREET_WORDS = frozenset(
    "street st avenue ave road rd boulevard blvd lane ln drive dr parkway pkwy way court ct place "
    "pl terrace highway hwy square sq crescent close row circle cir apt apartment suite unit flat "
    "calle c/ avenida avda av rua r travessa praça praca plaza paseo camino carrer via viale largo "
    "alameda estrada rue bd chemin allée impasse quai route de del la las los da do dos das du des "
    "le l d n nº no esq dto dir bis ter of the".split()
)
_DE_SUFFIX = re.compile(r"(?i)(straße|strasse|str\.|weg|allee|platz|gasse|ring|damm|ufer)$")


def _case_like(template: str, value: str) -> str:
    if template.isupper():
        return value.upper()
    if template.islower():
        return value.lower()
    return value


def _shuffle_chars(rng: random.Random, s: str, keep: int = 0) -> str:
    """Each digit -> a random digit, each letter -> a random letter of the same case."""
    out = []
    for i, c in enumerate(s):
        if i < keep or not c.isascii():
            out.append(c)
        elif c.isdigit():
            out.append(str(rng.randrange(10)))
        elif c.isupper():
            out.append(chr(rng.randrange(26) + 65))
        elif c.islower():
            out.append(chr(rng.randrange(26) + 97))
        else:
            out.append(c)
    return "".join(out)


def _person(rng: random.Random, original: str, used: set[str]) -> str:
    n = max(1, min(3, len(original.split())))
    first = rng.choice([f for f in _FIRST if f.lower() not in used])
    rest = rng.sample(_LAST, n - 1)
    return _case_like(original, " ".join([first, *rest]))


def _email(rng: random.Random, original: str, used: set[str]) -> str:
    first = rng.choice([f for f in _FIRST if f.lower() not in used])
    value = f"{first}.{rng.choice(_LAST)}@example.org".lower()
    return value.upper() if original.isupper() else value


def _card(rng: random.Random, original: str, used: set[str]) -> str:
    return luhn_fix("4" + _shuffle_chars(rng, original[1:]) if original[:1].isdigit() else _shuffle_chars(rng, original))


def _iban(rng: random.Random, original: str, used: set[str]) -> str:
    return iban_fix(_shuffle_chars(rng, original, keep=2))


def _phone(rng: random.Random, original: str, used: set[str]) -> str:
    m = re.match(r"\s*(\+\d{1,3}|00\d{1,3})?", original)
    keep = m.end() if m else 0
    return original[:keep] + _shuffle_chars(rng, original[keep:])


def _ssn(rng: random.Random, original: str, used: set[str]) -> str:
    digits = f"{rng.randrange(100, 666):03d}{rng.randrange(1, 100):02d}{rng.randrange(1, 10000):04d}"
    it = iter(digits)
    return "".join(next(it) if c.isdigit() else c for c in original)


def _national_id(rng: random.Random, original: str, used: set[str]) -> str:
    fake = _shuffle_chars(rng, original, keep=1 if original[:1].isalpha() else 0)
    for valid, fix in ((cpf_valid, cpf_fix), (dni_valid, dni_fix), (pt_nif_valid, pt_nif_fix),
                       (steuer_id_valid, steuer_id_fix)):  # fmt: skip
        if valid(original):
            return fix(fake)
    return fake


def _ip(rng: random.Random, original: str, used: set[str]) -> str:
    if ":" in original:
        return f"2001:db8::{rng.randrange(1, 0xFFFF):x}"
    return f"{rng.choice(['192.0.2', '198.51.100', '203.0.113'])}.{rng.randrange(2, 254)}"


def _date(rng: random.Random, original: str, used: set[str]) -> str:
    def repl(m: re.Match[str]) -> str:
        g = m.group()
        if len(g) == 4:
            return str(rng.randrange(1950, 2000))
        v = int(g)
        new = rng.randrange(1, 13) if v <= 12 else rng.randrange(13, 29)
        if len(g) == 2 and v > 31:  # a two-digit year
            new = rng.randrange(50, 100)
        return f"{new:0{len(g)}d}"

    return re.sub(r"\d+", repl, original)


def _address(rng: random.Random, original: str, used: set[str]) -> str:
    def word(m: re.Match[str]) -> str:
        w = m.group()
        if w.lower().rstrip(".") in _STREET_WORDS or w.lower() in _STREET_WORDS:
            return w
        de = _DE_SUFFIX.search(w)
        if de and de.start() > 0:
            return rng.choice(_STREET) + w[de.start():].lower()
        return _case_like(w, rng.choice(_STREET))

    fake = re.sub(r"[^\W\d_][\w'’.-]+", word, original)
    return re.sub(r"\d", lambda _: str(rng.randrange(1, 10)), fake)


_MAKERS: dict[str, Callable[[random.Random, str, set[str]], str]] = {
    "PERSON": _person, "EMAIL": _email, "CARD": _card, "IBAN": _iban, "PHONE": _phone,
    "SSN": _ssn, "NATIONAL_ID": _national_id, "IP": _ip, "DOB": _date, "ADDRESS": _address,
}  # fmt: skip


def make_surrogate(kind: str, original: str, rng: random.Random, avoid: Callable[[str], bool]) -> str:
    """A fake ``kind`` value shaped like ``original``; ``avoid(candidate)`` rejects collisions
    (the same text in the prompt, another surrogate). Unknown kinds keep the shape only."""
    maker = _MAKERS.get(kind, lambda r, o, u: _shuffle_chars(r, o))
    words = {w.lower() for w in re.findall(r"\w+", original)}
    for _ in range(64):
        fake = maker(rng, original, words)
        if fake.casefold() != original.casefold() and not avoid(fake):
            return fake
    # Exhausted the pool (a huge conversation): a numbered name still looks like a value.
    return f"{maker(rng, original, words)} {rng.randrange(10**6)}"
