"""Writes pii_corpus.jsonl (prompts with labelled PII) and pii_clean.jsonl (prompts without).

Run once: ``python tests/data/make_pii_corpus.py``; the files are committed. The library never
reads them: they measure it (tests/unit/test_pii_corpus.py, bench/pii_scrub.py).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

R = random.Random(20261130)
HERE = Path(__file__).parent


def luhn_complete(prefix: str, n: int) -> str:
    digits = prefix + "".join(str(R.randrange(10)) for _ in range(n - len(prefix) - 1))
    for last in "0123456789":
        s = digits + last
        tot = 0
        for i, c in enumerate(reversed(s)):
            d = int(c) * (2 if i % 2 else 1)
            tot += d - 9 if d > 9 else d
        if tot % 10 == 0:
            return s


def group(s: str, sizes: list[int], sep: str = " ") -> str:
    out, i = [], 0
    for k in sizes:
        out.append(s[i:i + k])
        i += k
    return sep.join(out)


def card() -> str:
    num = luhn_complete(R.choice(["4", "51", "55", "37", "6011"]), 16)
    return R.choice([group(num, [4, 4, 4, 4]), group(num, [4, 4, 4, 4], "-"), num])


def iban() -> str:
    cc, n = R.choice([("DE", 18), ("GB", 18), ("ES", 20), ("PT", 21), ("FR", 23), ("NL", 14)])
    body = ("".join(R.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4)) if cc in ("GB", "NL") else "")
    body += "".join(str(R.randrange(10)) for _ in range(n - len(body)))
    chk = 98 - int("".join(str(int(c, 36)) for c in body + cc + "00")) % 97
    s = f"{cc}{chk:02d}{body}"
    return R.choice([s, " ".join(s[i:i + 4] for i in range(0, len(s), 4))])


def cpf() -> str:
    d = [R.randrange(10) for _ in range(9)]
    a = sum(x * w for x, w in zip(d, range(10, 1, -1))) * 10 % 11 % 10
    b = sum(x * w for x, w in zip(d + [a], range(11, 1, -1))) * 10 % 11 % 10
    s = "".join(map(str, d + [a, b]))
    return R.choice([f"{s[:3]}.{s[3:6]}.{s[6:9]}-{s[9:]}", s])


def nif() -> str:
    d = [R.choice([1, 2, 2, 5])] + [R.randrange(10) for _ in range(7)]
    r = 11 - sum(x * w for x, w in zip(d, range(9, 1, -1))) % 11
    s = "".join(map(str, d + [0 if r >= 10 else r]))
    return R.choice([s, f"{s[:3]} {s[3:6]} {s[6:]}"])


def dni() -> str:
    n = R.randrange(10**7, 10**8)
    return f"{n}{'TRWAGMYFPDXBNJZSQVHLCKE'[n % 23]}"


def nie() -> str:
    p = R.randrange(3)
    n = R.randrange(10**6, 10**7)
    return f"{'XYZ'[p]}{n}{'TRWAGMYFPDXBNJZSQVHLCKE'[int(str(p) + str(n)) % 23]}"


def steuer() -> str:
    while True:
        d = [R.randrange(1, 10)] + [R.randrange(10) for _ in range(9)]
        product = 10
        for x in d:
            total = (x + product) % 10 or 10
            product = total * 2 % 11
        s = "".join(map(str, d + [(11 - product) % 10]))
        return R.choice([s, f"{s[:2]} {s[2:5]} {s[5:8]} {s[8:]}"])


def ssn() -> str:
    s = f"{R.randrange(100, 666):03d}{R.randrange(1, 100):02d}{R.randrange(1, 10000):04d}"
    return R.choice([f"{s[:3]}-{s[3:5]}-{s[5:]}", f"{s[:3]} {s[3:5]} {s[5:]}"])


def cc_pt() -> str:
    return f"{R.randrange(10**7, 10**8)} {R.randrange(10)} {R.choice(['ZZ', 'ZX', 'AB', 'YY'])}{R.randrange(10)}"


def phone() -> str:
    return R.choice([
        f"+1 ({R.randrange(201, 989)}) {R.randrange(200, 999)}-{R.randrange(1000, 9999)}",
        f"+44 20 {R.randrange(7000, 7999)} {R.randrange(1000, 9999)}",
        f"+34 6{R.randrange(10, 99)} {R.randrange(100, 999)} {R.randrange(100, 999)}",
        f"+351 91{R.randrange(0, 9)} {R.randrange(100, 999)} {R.randrange(100, 999)}",
        f"+49 30 {R.randrange(1000000, 9999999)}",
        f"+33 6 {R.randrange(10, 99)} {R.randrange(10, 99)} {R.randrange(10, 99)} {R.randrange(10, 99)}",
        f"({R.randrange(201, 989)}) {R.randrange(200, 999)}-{R.randrange(1000, 9999)}",
        f"+55 11 9{R.randrange(1000, 9999)}-{R.randrange(1000, 9999)}",
    ])


def passport() -> str:
    return R.choice([
        f"{R.choice('ABCXKPLMN')}{R.randrange(10**6, 10**7)}",
        f"{R.randrange(10**8, 10**9)}",
        f"{R.choice(['AA', 'PA', 'XD', 'CB'])}{R.randrange(10**5, 10**6)}",
        f"C{R.choice('0123456789FGHJK')}{R.choice('0123456789FGHJK')}X00T{R.randrange(10, 99)}",
    ])


def ip() -> str:
    if R.random() < 0.7:
        return f"{R.choice([10, 172, 192, 85, 203])}.{R.randrange(0, 255)}.{R.randrange(0, 255)}.{R.randrange(1, 254)}"
    return f"2001:db8:{R.randrange(1, 0xffff):x}::{R.randrange(1, 0xffff):x}"


FIRST = ["Maria", "Siobhan", "Bartholomew", "Yolanda", "Thaddeus", "Ngozi", "Xiomara", "Leopold",
         "Ingrid", "Joaquim", "Anneliese", "Rhiannon", "Desmond", "Soledad", "Gonçalo", "Mirela",
         "Aurelio", "Benedikt", "Hortense", "Cosima", "Peter", "Sarah", "Juan", "Ana", "Lukas"]
LAST = ["Gonzalez", "O'Brien", "Featherstone", "Kowalczyk", "Abernathy", "Okonkwo", "Villalobos",
        "Brandauer", "Lindqvist", "Magalhães", "Pfeiffer", "Thistlewood", "Castellanos",
        "Nakamura", "da Silva", "Van der Berg", "Schmidt", "Pereira", "Dubois", "Moreno"]


def name() -> str:
    return f"{R.choice(FIRST)} {R.choice(LAST)}"


def dob() -> str:
    d, m, y = R.randrange(1, 29), R.randrange(1, 13), R.randrange(1940, 2005)
    months = {"en": ["January", "March", "July", "October"], "es": ["marzo", "julio"],
              "pt": ["março", "julho"], "de": ["März", "Juli"], "fr": ["mars", "juillet"]}
    return R.choice([f"{d:02d}/{m:02d}/{y}", f"{y}-{m:02d}-{d:02d}", f"{d}.{m}.{y}",
                     f"{d} {R.choice(months['en'])} {y}", f"{R.choice(months['en'])} {d}, {y}"])


def address(lang: str) -> str:
    n = R.randrange(1, 2500)
    if lang == "en":
        return f"{n} {R.choice(['Amphitheatre', 'Elm', 'Baker', 'Old Mill', 'Sunset', 'Lakeview', 'Cherry Tree'])} {R.choice(['Parkway', 'Street', 'Avenue', 'Road', 'Lane', 'Drive', 'Blvd', 'Court'])}"
    if lang == "es":
        return f"{R.choice(['Calle', 'Avenida', 'Paseo'])} {R.choice(['Mayor', 'de Alcalá', 'del Prado', 'Gran Vía', 'San Bernardo'])} {n % 200 + 1}"
    if lang == "pt":
        return f"{R.choice(['Rua', 'Avenida', 'Travessa'])} {R.choice(['Augusta', 'da Liberdade', 'do Carmo', 'Paulista', 'das Flores'])} {n % 300 + 1}"
    if lang == "de":
        return f"{R.choice(['Haupt', 'Goethe', 'Linden', 'Bahnhof', 'Schiller'])}{R.choice(['straße', 'str.', 'weg', 'allee', 'platz'])} {n % 120 + 1}"
    return f"{n % 90 + 1} {R.choice(['rue', 'avenue', 'boulevard'])} {R.choice(['de la Paix', 'Victor Hugo', 'des Lilas', 'du Bac', 'Saint-Michel'])}"


T = {
    "EMAIL": ["Please send the invoice to {v}.", "Mi correo es {v}, escríbeme.", "O meu email é {v}.",
              "Schreiben Sie an {v} bitte.", "Contact me at {v} for details.", "reply to {v} asap"],
    "PHONE": ["Call me on {v} tomorrow.", "Mi teléfono: {v}", "Ligue para {v} depois das 18h.",
              "Meine Nummer ist {v}.", "Appelez-moi au {v}.", "my cell is {v}, text first"],
    "CARD": ["Charge my card {v} for the order.", "Mi tarjeta es {v}, caduca 09/27.",
             "Cartão {v}, validade 11/26.", "Kreditkarte: {v}", "card number {v} please refund"],
    "IBAN": ["Transfer it to IBAN {v}.", "Mi IBAN es {v}.", "O meu IBAN: {v}", "Bitte auf {v} überweisen.",
             "iban {v} thanks"],
    "IP": ["The server at {v} keeps timing out.", "Blocked login from {v} last night.",
           "Mi router tiene la IP {v}."],
    "SSN": ["My SSN is {v}, do I need it for the W-2?", "social security number {v}",
            "Employee SSN: {v}"],
    "NATIONAL_ID": ["O meu NIF é {nif}.", "Contribuinte n.º {nif}, por favor.", "CPF {cpf} para a nota fiscal.",
                    "Meu CPF é {cpf}.", "Mi DNI es {dni}.", "NIE {nie} para el contrato.",
                    "Meine Steuer-ID lautet {steuer}.", "Steueridentifikationsnummer {steuer}",
                    "Cartão de Cidadão {ccpt}", "número de documento {dni}"],
    "PASSPORT": ["My passport number is {v}.", "passport no. {v}, expires 2030", "Número de pasaporte: {v}",
                 "Passaporte {v}", "Reisepassnummer {v}", "numéro de passeport {v}"],
    "DOB": ["I was born {v}.", "Date of birth: {v}", "DOB {v}", "Fecha de nacimiento: {v}",
            "Nascida em {v}.", "Geboren am {v}.", "Né le {v}.", "born on {v} in Lisbon"],
    "ADDRESS": ["I live at {en}.", "Ship it to {en}, please.", "Vivo en {es}.", "Enviar a {es}, Madrid.",
                "Moro na {pt}, Lisboa.", "Entregar na {pt}.", "Ich wohne in der {de} in Berlin.",
                "Lieferadresse: {de}", "J'habite au {fr}, Paris.", "home address: {en}, Springfield"],
    "PERSON": ["Hi, my name is {v} and I need help with my account.", "Me llamo {v}.",
               "Meu nome é {v}.", "Ich heiße {v}.", "Je m'appelle {v}.", "Dear {v},\nthe report is attached.",
               "Hola {v}, ¿cómo estás?", "Olá {v}, tudo bem?", "Hallo {v}, danke für die Nachricht.",
               "Thanks for the help.\n\nBest regards,\n{v}", "Saludos,\n{v}", "Mit freundlichen Grüßen\n{v}",
               "Cordialement,\n{v}", "I am {v}, the new tenant.", "name: {v}", "Patient: {v}, 54 years old",
               "Please forward this to Mr. {v}.", "Cumprimentos,\n{v}", "this is {v} from accounting"],
}
CASES = ["same", "same", "same", "lower", "upper"]


def render(kind: str) -> tuple[str, list[dict[str, str]]]:
    tpl = R.choice(T[kind])
    labels = []
    if kind == "NATIONAL_ID":
        fills = {"nif": nif, "cpf": cpf, "dni": dni, "nie": nie, "steuer": steuer, "ccpt": cc_pt}
        key = next(k for k in fills if "{" + k + "}" in tpl)
        v = fills[key]()
        text = tpl.replace("{" + key + "}", v)
    elif kind == "ADDRESS":
        lang = next(k for k in ("en", "es", "pt", "de", "fr") if "{" + k + "}" in tpl)
        v = address(lang)
        text = tpl.replace("{" + lang + "}", v)
    else:
        v = {"EMAIL": lambda: f"{R.choice(FIRST).lower()}.{R.choice(LAST).lower().replace(' ', '')}@{R.choice(['gmail.com', 'example.com', 'outlook.pt', 'web.de', 'empresa.es'])}".replace("'", ""),
             "PHONE": phone, "CARD": card, "IBAN": iban, "IP": ip, "SSN": ssn, "PASSPORT": passport,
             "DOB": dob, "PERSON": name}[kind]()
        text = tpl.replace("{v}", v)
    labels.append({"kind": kind, "value": v})
    case = R.choice(CASES)
    if kind in ("EMAIL", "IP") and case == "upper":
        case = "same"
    if case == "lower":
        text, labels = text.lower(), [{"kind": lab["kind"], "value": lab["value"].lower()} for lab in labels]
    elif case == "upper":
        text, labels = text.upper(), [{"kind": lab["kind"], "value": lab["value"].upper()} for lab in labels]
    return text, labels


def mixed() -> tuple[str, list[dict[str, str]]]:
    n, e, p = name(), f"{R.choice(FIRST).lower()}{R.randrange(10, 99)}@gmail.com", phone()
    a = address("en")
    text = f"Hello, I am {n}. You can reach me at {e} or {p}; my address is {a}."
    return text, [{"kind": "PERSON", "value": n}, {"kind": "EMAIL", "value": e},
                  {"kind": "PHONE", "value": p}, {"kind": "ADDRESS", "value": a}]


CLEAN = """What is the capital of France?
Explain how photosynthesis works in simple terms.
Write a haiku about autumn leaves.
How many minutes are in 3.5 hours?
Translate "good morning" into Spanish, Portuguese and German.
What's the difference between TCP and UDP?
Summarise the plot of Romeo and Juliet in two sentences.
Give me a recipe for a vegetarian lasagna.
Is 97 a prime number?
Convert 72 degrees Fahrenheit to Celsius.
¿Cuál es la montaña más alta de España?
Qual é a capital do Brasil?
Wie funktioniert ein Elektromotor?
Quelle est la population de Paris en 2020?
The meeting is on 2024-03-15 at 10:30 in Room B.
Our revenue grew from 1,200,000 to 1,450,000 euros last year.
Write a Python function that reverses a list.
What year did the Berlin Wall fall?
Recommend three books about machine learning.
How do I set up a virtual environment with venv?
Explain the rules of chess castling.
What does HTTP status 404 mean?
Why is the sky blue?
List the planets of the solar system in order.
How far is it from New York to Los Angeles by car?
What is the boiling point of water at sea level?
Give me five tips for better sleep.
Compare Python and JavaScript for web backends.
What are the main causes of inflation?
How do vaccines train the immune system?
Write a limerick about a cat named after a planet.
Calculate 15% of 240.
What is the Pythagorean theorem?
Describe the water cycle for a ten-year-old.
Plan a three-day trip to Lisbon.
Qué significa la palabra "sobremesa"?
Como se faz pão de queijo?
Was ist der Unterschied zwischen "seit" und "seid"?
Comment dit-on "thank you" en japonais?
Sort these numbers: 42, 7, 19, 3, 88.
Explain what a hash map is.
What is the speed of light in km/s?
How does compound interest work? Use 1000 at 5% for 10 years.
Name three famous paintings by Van Gogh.
What is the GDP of Germany roughly?
Suggest a name for a bakery.
How do I center a div in CSS?
What is the square root of 144?
Write a SQL query that counts orders per customer.
How many bones are in the human body?
What happened in 1969 on the Moon?
Explain the difference between weather and climate.
Why do leaves change colour in autumn?
Give me a workout plan for beginners.
What are black holes?
How do I make cold brew coffee?
What is the tallest building in the world?
What is the Great Barrier Reef?
Write an email subject line for a product launch.
How does a bill become a law in the United States?
Explain Newton's three laws.
What is the difference between affect and effect?
What does the acronym NASA stand for?
How many players are on a football team?
Tell me a fun fact about octopuses.
What is the capital of Australia?
Explain recursion with an example.
How long does it take to boil an egg?
What is the currency of Japan?
Write a short story opening set in San Francisco.
What is the chemical formula of table salt?
Explain the Monty Hall problem.
What is 2 to the power of 20?
Translate "where is the train station" into French.
What is the meaning of the word "serendipity"?
How does GPS work?
Describe the French Revolution in three bullet points.
Give me a packing list for a ski trip.
How do solar panels generate electricity?
What is the difference between RAM and storage?
Explain what an API is to a non-programmer.
Which is bigger, a kilometre or a mile?
What are the symptoms of dehydration?
How do I write a cover letter?
What is Docker used for?
Suggest a playlist for a road trip.
What is the population of Tokyo?
How do bees make honey?
What is a haiku?
Explain the offside rule in football.
How do I convert a string to an integer in Java?
What is the longest river in South America?
Why do cats purr?
What is machine learning in one paragraph?
List five synonyms for "happy".
How many continents are there?
Explain the difference between a virus and a bacterium.
What time zone is Madrid in?
Describe the taste of a mango.
How does a refrigerator keep food cold?"""


def main() -> None:
    kinds = list(T)
    rows = []
    for i in range(168):
        rows.append(render(kinds[i % len(kinds)]))
    for _ in range(12):
        rows.append(mixed())
    with open(HERE / "pii_corpus.jsonl", "w") as f:
        for text, labels in rows:
            f.write(json.dumps({"text": text, "pii": labels}, ensure_ascii=False) + "\n")
    clean = [line for line in CLEAN.splitlines() if line.strip()]
    assert len(clean) >= 100, len(clean)
    with open(HERE / "pii_clean.jsonl", "w") as f:
        for text in clean[:100]:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
