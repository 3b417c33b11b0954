"""Check digits of the formats the PII recognizers accept (and the surrogates must pass).

Each ``*_valid`` takes the matched text (separators allowed) and says whether its checksum or
range rules hold; each ``*_fix`` takes a candidate with random digits and returns it with valid
check digits, keeping its separators and case. Pure Python, no dependencies.
"""

from __future__ import annotations

import re

__all__ = [
    "cpf_fix", "cpf_valid", "dni_fix", "dni_valid", "iban_fix", "iban_valid", "luhn_fix",
    "luhn_valid", "pt_nif_fix", "pt_nif_valid", "ssn_valid", "steuer_id_fix", "steuer_id_valid",
]  # fmt: skip


def _digits(s: str) -> list[int]:
    return [int(c) for c in s if c.isdigit()]


def _replace_digits(template: str, digits: list[int]) -> str:
    """``template`` with its digits replaced, left to right, by ``digits``."""
    it = iter(digits)
    return "".join(str(next(it)) if c.isdigit() else c for c in template)


def luhn_valid(number: str) -> bool:
    """Luhn (mod 10) check over the digits of ``number``; separators are ignored."""
    digits = _digits(number)
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


def luhn_fix(number: str) -> str:
    d = _digits(number)
    for last in range(10):
        d[-1] = last
        if luhn_valid("".join(map(str, d))):
            break
    return _replace_digits(number, d)


# ISO 13616 lengths for the countries users are most likely to paste; others: 15..34 allowed.
IBAN_LENGTHS = {
    "AD": 24, "AT": 20, "BE": 16, "BG": 22, "BR": 29, "CH": 21, "CY": 28, "CZ": 24, "DE": 22,
    "DK": 18, "EE": 20, "ES": 24, "FI": 18, "FR": 27, "GB": 22, "GR": 27, "HR": 21, "HU": 28,
    "IE": 22, "IS": 26, "IT": 27, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MT": 31,
    "NL": 18, "NO": 15, "PL": 28, "PT": 25, "RO": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27,
    "TR": 26,
}  # fmt: skip


def _iban_remainder(s: str) -> int:
    rearranged = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97


def iban_valid(iban: str) -> bool:
    """ISO 13616 check (any case): known country length (where listed), mod-97 remainder 1."""
    s = re.sub(r"[\s-]", "", iban).upper()
    if not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]{11,30}", s):
        return False
    want = IBAN_LENGTHS.get(s[:2])
    if want is not None and len(s) != want:
        return False
    return _iban_remainder(s) == 1


def iban_fix(iban: str) -> str:
    """Recompute the two check digits (positions 3-4) of ``iban``, keeping its layout."""
    s = re.sub(r"[\s-]", "", iban).upper()
    check = 98 - _iban_remainder(s[:2] + "00" + s[4:])
    out, seen = [], 0
    for c in iban:
        if c.isalnum():
            if seen in (2, 3):
                c = f"{check:02d}"[seen - 2]
            seen += 1
        out.append(c)
    return "".join(out)


def ssn_valid(s: str) -> bool:
    """US SSN: not area 000/666/9xx, group 00 or serial 0000 (the SSA's never-issued rules)."""
    d = "".join(c for c in s if c.isdigit())
    if len(d) != 9:
        return False
    area, group, serial = d[:3], d[3:5], d[5:]
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _nif_check(d: list[int]) -> int:
    r = 11 - sum(x * w for x, w in zip(d[:8], range(9, 1, -1))) % 11
    return 0 if r >= 10 else r


def pt_nif_valid(s: str) -> bool:
    """Portuguese NIF: 9 digits, a known first digit, mod-11 check digit."""
    d = _digits(s)
    return len(d) == 9 and d[0] in (1, 2, 3, 5, 6, 8, 9) and _nif_check(d) == d[8]


def pt_nif_fix(s: str) -> str:
    d = _digits(s)
    d[0] = d[0] if d[0] in (1, 2, 3, 5, 6, 8, 9) else 2
    d[8] = _nif_check(d)
    return _replace_digits(s, d)


def _cpf_checks(d: list[int]) -> tuple[int, int]:
    a = sum(x * w for x, w in zip(d[:9], range(10, 1, -1))) * 10 % 11 % 10
    b = sum(x * w for x, w in zip(d[:9] + [a], range(11, 1, -1))) * 10 % 11 % 10
    return a, b


def cpf_valid(s: str) -> bool:
    """Brazilian CPF: 11 digits (not all equal) with two mod-11 check digits."""
    d = _digits(s)
    return len(d) == 11 and len(set(d)) > 1 and _cpf_checks(d) == (d[9], d[10])


def cpf_fix(s: str) -> str:
    d = _digits(s)
    d[9], d[10] = _cpf_checks(d)
    return _replace_digits(s, d)


_DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"


def _dni_number(s: str) -> tuple[int, str] | None:
    t = re.sub(r"[\s-]", "", s).upper()
    m = re.fullmatch(r"([XYZ]?)(\d{7,8})([A-Z])", t)
    if m is None:
        return None
    prefix = "XYZ".index(m.group(1)) if m.group(1) else None
    number = m.group(2) if prefix is None else str(prefix) + m.group(2)
    return int(number), m.group(3)


def dni_valid(s: str) -> bool:
    """Spanish DNI (8 digits + letter) or NIE (X/Y/Z + 7 digits + letter), letter = n mod 23."""
    parsed = _dni_number(s)
    return parsed is not None and _DNI_LETTERS[parsed[0] % 23] == parsed[1]


def dni_fix(s: str) -> str:
    parsed = _dni_number(s)
    if parsed is None:
        return s
    letter = _DNI_LETTERS[parsed[0] % 23]
    return s[:-1] + (letter if s[-1].isupper() else letter.lower())


def _steuer_check(d: list[int]) -> int:
    product = 10
    for x in d[:10]:
        total = (x + product) % 10 or 10
        product = total * 2 % 11
    return (11 - product) % 10


def steuer_id_valid(s: str) -> bool:
    """German Steuer-ID: 11 digits, no leading 0, ISO 7064 MOD 11,10 check digit."""
    d = _digits(s)
    return len(d) == 11 and d[0] != 0 and _steuer_check(d) == d[10]


def steuer_id_fix(s: str) -> str:
    d = _digits(s)
    d[0] = d[0] or 1
    d[10] = _steuer_check(d)
    return _replace_digits(s, d)
