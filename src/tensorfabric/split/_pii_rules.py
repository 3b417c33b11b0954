"""What Presidio lacks offline: context-triggered names, addresses, dates of birth, passports,
national IDs (PT NIF/CC, BR CPF, ES DNI/NIE, DE Steuer-ID, US SSN), IBANs in any case, name lists,
and the fail-closed sweep. Each rule is a regex (case-insensitive where the format allows) with
an optional check; :mod:`._pii_engine` wraps them as Presidio recognizers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from ._pii_checks import cpf_valid, dni_valid, iban_valid, pt_nif_valid, ssn_valid, steuer_id_valid

__all__ = ["FIRST_NAMES", "PARTICLES", "PLACE_HEADS", "STOP", "Rule", "fail_closed_rules", "rules"]

I = re.IGNORECASE  # noqa: E741 - the usual short name for the flag


@dataclass(frozen=True)
class Rule:
    """``pattern`` finds candidates; group ``group`` is the value; ``check`` may veto it."""

    kind: str
    pattern: re.Pattern[str]
    group: int = 0
    check: Callable[[str], bool] | None = None
    score: float = 0.85
    fit: Callable[[str], int | None] | None = None  # shortens a greedy match to a valid length


def _iban_fit(candidate: str) -> int | None:
    """The longest prefix of a greedy IBAN match that is a valid IBAN (ends on a character)."""
    ends = [i + 1 for i, c in enumerate(candidate) if c.isalnum()]
    for end in reversed(ends[14:]):
        if iban_valid(candidate[:end]):
            return end
    return None


# Words that never start or continue a name (several languages): a trigger followed by one of
# these is a sentence, not a name ("I am going", "soy de Madrid").
STOP = frozenset("""
a an the and or but if of in on at to for from with by as is are was were be been am not no yes
so very really just also too here there this that these those it its i me my you your we our
they them he she his her going trying looking writing calling glad happy sorry sure fine good
new interested having getting working living based ok okay tired back done ready
said says asked told wrote called has had will would can could lives works wants needs sent
when whenever if after before later tomorrow today tonight now asap anytime please maybe again soon
mr mrs ms dr prof sr sra srta herr frau mme mlle miss sir madam dona don señor señora senhor senhora
y o de del la el los las un una en con por para que es soy estoy muy no si
e ou do da dos das um uma em com por para que é sou estou muito não sim
und oder der die das ein eine in mit von für zu ist bin nicht ja sehr
et ou le la les un une en avec pour de que est suis très pas oui
""".split())  # fmt: skip
_PARTICLES = r"(?:de|da|do|dos|das|del|della|di|la|le|van|von|der|den|du|dal|bin|al|y)"
PARTICLES = frozenset(_PARTICLES[3:-1].split("|"))
_UP, _LO = "A-ZÀ-ÖØ-Þ", "a-zß-öø-ÿ"
# a capitalised (or upper-case) word, double-barrelled too ("Uzoma-Prescott", "O'Brien")
_CAP = rf"[{_UP}](?:[{_LO}'’]+(?:-[{_UP}]?[{_LO}'’]+)*|[{_UP}'’]+(?:-[{_UP}'’]+)*)"
_ANY = r"[^\W\d_][\w'’-]*"  # a word in any case
_CAP_NAME = rf"{_CAP}(?:[ \t]+(?:(?i:{_PARTICLES})[ \t]+){{0,2}}{_CAP}){{0,3}}"
_ANY_NAME = rf"{_ANY}(?:[ \t]+{_ANY}){{0,4}}"

# Triggers after which the next words are a name whatever their case.
_STRONG = [
    r"my (?:full )?name is", r"my name's", r"(?:full )?name\s*:", r"call me", r"i am called",
    r"me llamo", r"mi nombre (?:completo )?es", r"nombre\s*:", r"meu nome (?:completo )?é",
    r"me chamo", r"chamo-me", r"nome\s*:", r"ich heiße", r"ich heisse", r"mein name ist",
    r"je m'appelle", r"je m’appelle", r"mon nom est", r"je me nomme", r"nom\s*:",
    r"patient(?: name)?\s*:", r"customer(?: name)?\s*:", r"signed\s*:?", r"the patient is",
    r"la paciente es", r"el paciente es",
]  # fmt: skip
# Triggers after which only capitalised words are taken (the words alone are too common).
_WEAK = [
    r"i am", r"i'm", r"i’m", r"this is", r"it's", r"soy", r"sou", r"ich bin", r"je suis",
    r"dear", r"hi", r"hello", r"hey", r"hola", r"olá", r"ola", r"querid[oa]", r"estimad[oa]",
    r"prezad[oa]", r"car[oa]", r"liebe[r]?", r"hallo", r"sehr geehrte[r]? (?:frau|herr)",
    r"bonjour", r"cher", r"chère", r"salut", r"mr\.?", r"mrs\.?", r"ms\.?", r"miss", r"dr\.?",
    r"prof\.?", r"sr\.?", r"sra\.?", r"herr", r"frau", r"mme\.?", r"dona", r"don", r"señor",
    r"señora", r"senhor", r"senhora", r"monsieur", r"madame", r"with", r"from", r"contact",
    r"call me", r"ask for", r"speak to", r"talk to", r"named", r"called", r"client", r"customer",
    r"patient", r"tenant", r"employee", r"colleague", r"friend", r"son", r"daughter", r"wife",
    r"husband", r"mother", r"father", r"boss", r"manager",
]  # fmt: skip
_SIGNOFF = [
    r"regards", r"best regards", r"kind regards", r"warm regards", r"best", r"thanks",
    r"thank you", r"cheers", r"sincerely", r"yours(?: truly| sincerely)?", r"saludos",
    r"un saludo", r"atentamente", r"cumprimentos", r"atenciosamente", r"abraços", r"beijos",
    r"mit freundlichen grüßen", r"viele grüße", r"liebe grüße", r"grüße", r"lg", r"mfg",
    r"cordialement", r"bien à vous", r"bisous", r"amitiés", r"--", r"—",
]  # fmt: skip

_MONTHS = (
    "january|february|march|april|may|june|july|august|september|october|november|december|"
    "jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec|"
    "enero|febrero|marzo|abril|mayo|junio|julio|agosto|septiembre|setiembre|octubre|noviembre|diciembre|"
    "janeiro|fevereiro|março|maio|junho|julho|setembro|outubro|novembro|dezembro|"
    "januar|jänner|februar|märz|mai|juni|juli|oktober|dezember|"
    "janvier|février|mars|avril|juin|juillet|août|septembre|octobre|novembre|décembre"
)
_DATE = (
    rf"(?:\d{{1,2}}[./-]\d{{1,2}}[./-](?:\d{{4}}|\d{{2}})|\d{{4}}-\d{{1,2}}-\d{{1,2}}"
    rf"|\d{{1,2}}(?:st|nd|rd|th|º|\.)?\s+(?:de\s+)?(?:{_MONTHS})\.?,?\s+(?:de\s+)?\d{{4}}"
    rf"|(?:{_MONTHS})\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}})"
)
_DOB_TRIGGER = (
    r"born|birth ?date|date of birth|d\.?o\.?b\.?|birthday|nacid[oa]|nací|fecha de nacimiento|"
    r"f\. nac\.?|nascid[oa]|nasci|data de nascimento|geboren|geb\.|geburtsdatum|geburtstag|"
    r"née?|date de naissance|anniversaire"
)
_STREET_EN = (
    r"street|st|avenue|ave|road|rd|boulevard|blvd|lane|ln|drive|dr|parkway|pkwy|way|court|ct|"
    r"place|pl|terrace|highway|hwy|square|sq|crescent|close|row|circle|cir"
)
_STREET_PREFIX = (
    r"calle|c/|avenida|avda\.?|av\.|rua|r\.|travessa|praça|praca|plaza|paseo|camino|carrer|"
    r"via|viale|largo|alameda|estrada|rue|boulevard|bd|chemin|allée|impasse|quai|route|place"
)
_STREET_DE = r"straße|strasse|str\.|weg|allee|platz|gasse|ring|damm|ufer"
_PASSPORT = (
    r"passport|pasaporte|passaporte|reisepass(?:nummer)?|passnummer|pass-nr\.?|passeport|"
    r"passaporto"
)


_HONORIFIC = (
    r"(?:(?i:mr|mrs|ms|dr|prof|sr|sra|srta|herr|frau|mme|mlle|miss|sir|madam|dona|don|señor|"
    r"señora|senhor|senhora|monsieur|madame)\.?[ \t]+)?"
)


def _names(trigger: list[str], name: str, flags: int = 0) -> re.Pattern[str]:
    alt = "|".join(trigger)
    return re.compile(rf"(?<![\w])(?i:{alt})[ \t]*,?[ \t]+{_HONORIFIC}({name})", flags)


def rules() -> list[Rule]:
    """The rules, each tagged with the kind it finds."""
    not_stop = lambda s: s.split()[0].lower() not in STOP  # noqa: E731
    return [
        Rule("PERSON", _names(_STRONG, _ANY_NAME), 1, not_stop),
        Rule("PERSON", _names(_WEAK, _CAP_NAME), 1, not_stop),
        Rule("PERSON", re.compile(rf"(?im)^[ \t]*(?:{'|'.join(_SIGNOFF)})[ \t]*[,!.]?[ \t]*\n[ \t]*({_CAP_NAME}|{_ANY_NAME})[ \t]*$"), 1, not_stop),
        Rule("PERSON", re.compile(rf"(?i)(?:{'|'.join(_SIGNOFF)}),[ \t]+({_CAP_NAME})(?=[ \t]*(?:$|[.\n]))", re.M), 1, not_stop),
        Rule("DOB", re.compile(rf"(?i)(?:{_DOB_TRIGGER})\b[^\n\d]{{0,30}}?({_DATE})"), 1),
        Rule("ADDRESS", re.compile(rf"(?i)\b\d{{1,5}}[a-z]?,?\s+(?:[\w'.-]+\s+){{1,4}}?(?:{_STREET_EN})\b\.?(?:,?\s+(?:apt|apartment|suite|unit|flat|#)\.?\s*\w+)?"), 0,
             lambda s: any(c.isalpha() for c in s.split()[1])),
        Rule("ADDRESS", re.compile(rf"(?i)(?<!\w)(?:{_STREET_PREFIX})\s+(?:[^\W\d][\w'’.-]*\s+){{0,5}}?(?:n\.?[ºo°]\s*)?,?\s*\d{{1,5}}[a-z]?\b"), 0),
        Rule("ADDRESS", re.compile(r"(?i)\b\d{1,4}(?:\s?(?:bis|ter))?,?\s+(?:rue|avenue|boulevard|chemin|allée|impasse|quai|route|place)\s+(?:(?:de|du|des|la|le|l'|d')\s*)*[^\W\d][\w'’-]*(?:\s+[^\W\d][\w'’-]*){0,3}"), 0),
        Rule("ADDRESS", re.compile(rf"(?i)\b[^\W\d_][\w-]*(?:{_STREET_DE})\s+\d{{1,4}}[a-z]?\b"), 0),
        Rule("PASSPORT", re.compile(rf"(?i)(?:{_PASSPORT})\b[^\n\d]{{0,25}}?\b([a-z]{{0,3}}\d[a-z0-9]{{4,9}})\b"), 1),
        Rule("IBAN", re.compile(r"(?i)(?<![a-z0-9])[a-z]{2}\d{2}(?:[ -]?[a-z0-9]){11,30}(?![a-z0-9])"), 0, iban_valid, 0.9, _iban_fit),
        Rule("SSN", re.compile(r"(?<![\d-])\d{3}([- ])\d{2}\1\d{4}(?![\d-])"), 0, ssn_valid),
        Rule("SSN", re.compile(r"(?i)(?:ssn|social security(?: number| no\.?)?)\D{0,15}?(?<!\d)(\d{9})(?!\d)"), 1, ssn_valid),
        Rule("NATIONAL_ID", re.compile(r"(?<![\d.-])\d{3}\.\d{3}\.\d{3}-\d{2}(?![\d-])|(?<!\d)\d{11}(?!\d)"), 0, cpf_valid),
        Rule("NATIONAL_ID", re.compile(r"(?<![\d])\d{3} ?\d{3} ?\d{3}(?![\d])"), 0, pt_nif_valid, 0.6),
        Rule("NATIONAL_ID", re.compile(r"(?i)(?<![\w])\d{8} ?\d ?[a-z]{2}\d(?![\w])"), 0),
        Rule("NATIONAL_ID", re.compile(r"(?i)(?<![\w])[xyz]?[- ]?\d{7,8}[- ]?[a-z](?![\w])"), 0, dni_valid),
        Rule("NATIONAL_ID", re.compile(r"(?<![\d])[1-9]\d ?\d{3} ?\d{3} ?\d{3}(?![\d])"), 0, steuer_id_valid, 0.6),
    ]  # fmt: skip


# Capitalised pairs that are places, not people ("New York", "San Francisco").
PLACE_HEADS = frozenset(
    "new san santa los las saint st north south east west united great hong buenos rio são sao "
    "mount lake port fort el la le costa sri puerto hot".split()
)


def fail_closed_rules() -> list[Rule]:
    """The sweep after everything else: digit runs of 6+ and capitalised pairs after a
    trigger word (any of the name triggers, or a preposition that often introduces a person)."""
    triggers = "|".join(_STRONG + _WEAK + ["to", "for", "by", "cc", "attn", "para", "für", "pour"])
    pair = rf"({_CAP}\s+(?:{_PARTICLES}\s+)?{_CAP})"
    return [
        Rule("ID", re.compile(r"(?<![\w.])\d{6,}(?![\w])|(?<![\w.])\d{2,4}(?:[ .-]\d{2,4}){2,}(?![\w])"), 0,
             lambda s: sum(c.isdigit() for c in s) >= 6 and not re.fullmatch(r"\d{4}-\d{1,2}-\d{1,2}|\d{1,2}\.\d{1,2}\.\d{2,4}", s), 0.36),
        Rule("PERSON", re.compile(rf"(?<![\w])(?i:{triggers})[ \t]*,?[ \t]+{pair}"), 1,
             lambda s: s.split()[0].lower() not in PLACE_HEADS | STOP, 0.36),
    ]  # fmt: skip


# Common given names (several languages), matched whole-word in any case, then an optional
# surname. Names that are also everyday words (Will, May, Grace, Mark, Rose, June) are left out.
FIRST_NAMES = frozenset("""
james john robert michael william david richard joseph thomas charles christopher daniel
matthew anthony donald steven paul andrew joshua kenneth kevin brian george timothy ronald
edward jason jeffrey ryan jacob gary nicholas eric jonathan stephen larry justin scott brandon
benjamin samuel gregory alexander patrick raymond dennis jerry tyler aaron jose adam nathan
henry zachary douglas peter kyle noah ethan jeremy walter keith roger terry sean gerald carl
harold dylan arthur lawrence jesse bryan billy bruce gabriel joe logan alan juan albert willie
elijah randy wayne vincent liam oliver lucas mason mary patricia jennifer linda elizabeth
barbara susan jessica sarah karen lisa nancy betty sandra margaret ashley kimberly emily donna
michelle amanda melissa deborah stephanie rebecca sharon laura cynthia dorothy amy kathleen
angela shirley brenda emma anna pamela nicole samantha katherine christine helen debra rachel
carolyn janet maria catherine heather diane olivia julie joyce ruth lauren kelly christina joan
evelyn judith andrea hannah megan cheryl jacqueline martha teresa sara janice ann kathryn
abigail sophia frances jean alice judy isabella julia beverly denise marilyn danielle brittany
diana natalie sophie charlotte mia amelia harper ella chloe zoe lily maría josé antonio manuel
francisco javier carlos alejandro miguel rafael pedro pablo sergio fernando jorge luis alberto
álvaro alvaro diego adrián adrian raúl raul enrique ramón ramon vicente andrés andres joaquín
joaquin carmen ana isabel cristina marta lucía lucia paula elena raquel beatriz nuria silvia
irene claudia inés ines valentina joão joao antónio paulo tiago rui nuno ricardo bruno andré
andre gonçalo goncalo rodrigo duarte afonso tomás tomas vasco gustavo eduardo fábio fabio
mariana inês joana catarina rita leonor matilde margarida carolina francisca luísa luisa
gabriela fernanda juliana camila larissa letícia leticia adriana vanessa hans klaus jürgen
jurgen wolfgang andreas stefan uwe dieter günter gunter helmut horst karl heinz werner lukas
leon finn jonas felix maximilian ursula monika petra sabine renate helga karin brigitte ingrid
gisela anja katrin susanne birgit heike stefanie lena lea emilia marie pierre michel philippe
alain nicolas christophe françois francois éric sébastien sebastien julien laurent olivier
thierry frédéric frederic stéphane stephane nathalie isabelle sylvie françoise francoise
valérie valerie sandrine céline celine aurélie aurelie camille chloé manon léa inès mohammed
mohamed ahmed ali omar fatima aisha wei ming hiroshi yuki priya rahul arjun
""".split())  # fmt: skip
