"""A corpus of personal data in many formats and scripts, each value in a sentence.

Deterministic (no randomness): the same cases on every run, for the leak test
(``tests/test_pii_corpus.py``) and the benchmark (``benchmarks/bench_redact.py``).
Every number is checked here as what it claims to be (Luhn for cards, ISO 7064 for
IBANs, ``ipaddress`` for IPs), so a case that is not PII cannot pass as a leak.

Sentence templates contain no digits and no ``@``: whatever digit or ``@`` is left
after redaction came from the value, which is how the test counts partial leaks.
"""

from __future__ import annotations

import ipaddress
import unicodedata
from dataclasses import dataclass

from stdnum import iban as stdnum_iban
from stdnum import luhn

__all__ = ["Case", "corpus", "leaked"]


@dataclass(frozen=True)
class Case:
    kind: str
    value: str
    text: str
    region: str = "US"


TEMPLATES = [
    "Please contact me at {v} tomorrow.",
    "Mi dato es {v}, gracias.",
    "Meine Angabe: {v}.",
    "Voici le numéro {v} pour le dossier",
    "连络信息是{v}，谢谢",
    "連絡先は{v}です。",
    "Мои данные: {v}",
    "بياناتي {v} شكرا",
    "({v})",
    "{v}",
    "line one\n{v}\nline three",
    "Note: «{v}» — urgent!",
]

# -- e-mail --------------------------------------------------------------------------

EMAILS = [
    "john.doe@example.com",
    "john.doe+orders@example.co.uk",
    "JANE_SMITH@Example.ORG",
    "a@b.io",
    "first-last@sub.domain-name.example.net",
    "user.name1987@mail.example.com",
    "o'brien@example.ie",
    "jürgen.müller@beispiel.de",
    "françois@exemple.fr",
    "josé.garcía@ejemplo.es",
    "info@münchen.de",
    "kontakt@bücher.example",
    "用户@例子.广告",
    "δοκιμή@παράδειγμα.δοκιμή",
    "иван@почта.рф",
    "support@xn--mnchen-3ya.de",
    "admin@example.xn--p1ai",
    "ｍａｉｌ＠ｅｘａｍｐｌｅ．ｃｏｍ",  # full-width
    "name@example\u3002com",  # ideographic full stop
    "test\u200b@example.com",  # zero-width space
]

# -- phones --------------------------------------------------------------------------

PHONES_US = [
    "(555) 123-4567",
    "555-123-4567",
    "555.123.4567",
    "555 123 4567",
    "5551234567",  # plain 10 digits (issue 9)
    "2125550123",
    "+1 555 123 4567",
    "+1-212-555-0123",
    "+1 (555) 123-4567",
    "1-800-555-1234",
    "1 (800) 555-1234",
    "+15551234567",
    "011 44 20 7946 0958",  # US exit code
    "555\u2013123\u20134567",  # en dashes
    "555\u00a0123\u00a04567",  # no-break spaces
    "５５５-１２３-４５６７",  # full-width
    "٥٥٥ ١٢٣ ٤٥٦٧",  # Arabic-Indic digits
    "(555)\u2009123\u20114567",  # thin space, non-breaking hyphen
]
PHONES_INTL = [
    "+44 20 7946 0958",
    "+44 (0)20 7946 0958",
    "+44 7700 900123",
    "+49 30 1234567",
    "+49 (0)30 1234567",
    "+49 151 23456789",
    "+33 6 12 34 56 78",
    "+33612345678",
    "+81 3-1234-5678",
    "+81 90-1234-5678",
    "+91 98765 43210",
    "+86 138 0013 8000",
    "+61 2 9876 5432",
    "+55 11 91234-5678",
    "+7 495 123-45-67",
    "+34 612 34 56 78",
    "+39 06 1234 5678",
    "+31 20 123 4567",
    "+48 22 123 45 67",
    "+972 3-123-4567",
    "+27 21 123 4567",
    "+82 2-1234-5678",
    "+90 212 123 45 67",
    "+353 1 234 5678",
    "+46 8 123 456 78",
    "+९१ ९८७६५ ४३२१०",  # Devanagari digits
    "+44\u00a020\u00a07946\u00a00958",
    "＋４９ ３０ １２３４５６７",
]
PHONES_NATIONAL = {  # region -> numbers in that region's national format
    "DE": ["030 1234567", "030/1234567", "0301234567", "0151 23456789", "030-123456-78"],
    "FR": ["01 23 45 67 89", "06 12 34 56 78", "01.23.45.67.89", "0612345678"],
    "GB": ["020 7946 0958", "07700 900123", "0161 496 0000", "(020) 7946 0958"],
    "IN": ["098765 43210", "09876543210"],
    "JP": ["03-1234-5678", "090-1234-5678"],
    "BR": ["(11) 91234-5678", "(21) 3123-4567"],
    "AU": ["(02) 9876 5432", "0412 345 678"],
    "US": ["(212) 555-0123", "212-555-0123"],
}

# -- cards ---------------------------------------------------------------------------


def luhn_complete(body: str) -> str:
    return body + luhn.calc_check_digit(body)


CARD_NUMBERS = [
    "4111111111111111",  # Visa test
    "4012888888881881",
    "4222222222222",  # Visa, 13 digits
    "5555555555554444",  # Mastercard
    "5105105105105100",
    "2223003122003222",  # Mastercard 2-series
    "378282246310005",  # Amex
    "371449635398431",
    "6011111111111117",  # Discover
    "3530111333300000",  # JCB
    "6200000000000005",  # UnionPay
    luhn_complete("620000000000000000"),  # UnionPay, 19 digits
    luhn_complete("220012345678901"),  # Mir
    luhn_complete("676770000000000"),  # Maestro
]
GROUPINGS = {13: [4, 4, 5], 15: [4, 6, 5], 16: [4, 4, 4, 4], 19: [4, 4, 4, 4, 3]}
SEPARATORS = [" ", "-", ".", "\u00a0", "  ", "/", "_", "\u2009", " - ", "\u2013", "\u3000"]
FULLWIDTH = str.maketrans("0123456789", "０１２３４５６７８９")
ARABIC_INDIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")
DEVANAGARI = str.maketrans("0123456789", "०१२३४५६७८९")


def _group(number: str, sizes: list[int], sep: str) -> str:
    out, i = [], 0
    for size in sizes:
        out.append(number[i : i + size])
        i += size
    return sep.join(out)


def _cards() -> list[str]:
    out: list[str] = []
    for i, number in enumerate(CARD_NUMBERS):
        sizes = GROUPINGS[len(number)]
        out.append(number)
        for j in range(3):  # three separators per number, rotating through all of them
            out.append(_group(number, sizes, SEPARATORS[(3 * i + j) % len(SEPARATORS)]))
    out += [
        "4111 1111 1111 1111".translate(FULLWIDTH),
        "4111111111111111".translate(FULLWIDTH),
        "5555-5555-5555-4444".translate(ARABIC_INDIC),
        "3782 822463 10005".translate(DEVANAGARI),
        "4111 11 1111 1111 11",  # odd grouping
        "4 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1",  # digit by digit
        "4111\u200b1111\u200b1111\u200b1111",  # zero-width spaces
        "4111*1111*1111*1111",
    ]
    return out


# -- IBANs ---------------------------------------------------------------------------

IBAN_NUMBERS = [
    "DE89370400440532013000",
    "GB82WEST12345698765432",
    "FR1420041010050500013M02606",
    "NL91ABNA0417164300",
    "BE68539007547034",
    "CH9300762011623852957",
    "ES9121000418450200051332",
    "IT60X0542811101000000123456",
    "AT611904300234573201",
    "PL61109010140000071219812874",
    "SE4550000000058398257466",
    "NO9386011117947",
    "DK5000400440116243",
    "FI2112345600000785",
    "IE29AIBK93115212345678",
    "PT50000201231234567890154",
    "LU280019400644750000",
    "CZ6508000000192000145399",
    "HU42117730161111101800000000",
    "SA0380000000608010167519",
    "BR1800360305000010009795493C1",
    "TR330006100519786457841326",
]


def _ibans() -> list[str]:
    out: list[str] = []
    for i, number in enumerate(IBAN_NUMBERS):
        out.append(number if i % 2 else number.lower())
        out.append(" ".join(number[k : k + 4] for k in range(0, len(number), 4)))
    out.append("DE89\u00a03704\u00a00044\u00a00532\u00a00130\u00a000")
    out.append("DE89-3704-0044-0532-0130-00")
    out.append("DE89370400440532013000".translate(FULLWIDTH))
    return out


# -- IP addresses --------------------------------------------------------------------

IPS = [
    "192.168.1.10",
    "10.0.0.1",
    "172.16.254.3",
    "8.8.8.8",
    "255.255.255.255",
    "203.0.113.195",
    "010.000.000.001",
    "１９２．１６８．０．１",
    "2001:db8::8a2e:370:7334",
    "2001:0db8:0000:0000:0000:ff00:0042:8329",
    "::1",
    "fe80::1%eth0",
    "::ffff:192.0.2.1",
    "2606:4700:4700::1111",
    "FE80::0202:B3FF:FE1E:8329",
]


def _check(kind: str, value: str) -> None:
    plain = "".join(
        str(unicodedata.decimal(c)) if unicodedata.decimal(c, None) is not None else c
        for c in unicodedata.normalize("NFKC", value)
    )
    digits = "".join(c for c in plain if c.isdigit())
    if kind == "card":
        assert luhn.is_valid(digits), value
    elif kind == "iban":
        assert stdnum_iban.is_valid(plain.replace("\u00a0", " "), check_country=False), value
    elif kind == "ip":
        address = plain.partition("%")[0]
        if ":" not in address:  # zero-padded octets are still an address to a reader
            address = ".".join(str(int(octet)) for octet in address.split("."))
        ipaddress.ip_address(address)


def corpus() -> list[Case]:
    """All cases: every value in two or three of the sentence templates."""
    values: list[tuple[str, str, str]] = []
    values += [("email", v, "US") for v in EMAILS]
    values += [("phone", v, "US") for v in PHONES_US + PHONES_INTL]
    values += [("phone", v, region) for region, vs in PHONES_NATIONAL.items() for v in vs]
    values += [("card", v, "US") for v in _cards()]
    values += [("iban", v, "US") for v in _ibans()]
    values += [("ip", v, "US") for v in IPS]
    cases: list[Case] = []
    for i, (kind, value, region) in enumerate(values):
        _check(kind, value)
        for k in range(2):
            template = TEMPLATES[(i * 5 + k * 7) % len(TEMPLATES)]
            cases.append(Case(kind, value, template.format(v=value), region))
    return cases


def leaked(case: Case, redacted: str) -> bool:
    """Whether any of the value survived: the value itself, or any digit or ``@``
    outside placeholders (the templates have none), or a hex group of an IPv6."""
    if case.value in redacted:
        return True
    outside = []
    for i, part in enumerate(redacted.split("<")):
        head, sep, tail = part.partition(">")
        outside.append(tail if i and sep and head.replace("_", "").isalnum() else part)
    rest = unicodedata.normalize("NFKC", "".join(outside))
    if any(c.isdigit() or unicodedata.decimal(c, None) is not None for c in rest):
        return True
    return "@" in rest or (case.kind == "ip" and "::" in rest)
