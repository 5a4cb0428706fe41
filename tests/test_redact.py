"""Redaction: what leaves the device must not carry the personal data we can recognise.

Property tests inject generated e-mails, phones, IBANs, Luhn-valid cards and IPs into
arbitrary text; unit tests pin realistic formats and the look-alikes that must survive.
"""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from edgeagent.redact import Redaction, Redactor, restore
from tests.strategies import json_values

REDACTOR = Redactor()
WITH_USER_KIND = Redactor(extra_patterns={"employee_id": r"EMP-[0-9]{5}", "anything": r"[A-Z]+"})

# --- strategies (local to this module) ----------------------------------------------

digits = st.text(alphabet=string.digits, min_size=1, max_size=1)


def n_digits(n: int) -> st.SearchStrategy[str]:
    return st.text(alphabet=string.digits, min_size=n, max_size=n)


def luhn_complete(body: str) -> str:
    """Append the check digit that makes ``body`` pass the Luhn check."""
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:  # doubled once the check digit is appended
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return body + str(-total % 10)


def _group(s: str, sizes: list[int], sep: str) -> str:
    out, i = [], 0
    for size in sizes:
        out.append(s[i : i + size])
        i += size
    return sep.join(out)


@st.composite
def cards(draw: st.DrawFn) -> str:
    prefix, length = draw(
        st.sampled_from([("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("34", 15),
                         ("37", 15), ("6011", 16), ("4", 13), ("62", 19)])
    )  # fmt: skip
    number = luhn_complete(prefix + draw(n_digits(length - len(prefix) - 1)))
    sep = draw(st.sampled_from(["", " ", "-"]))
    if sep == "" or length == 13:
        return number
    sizes = {15: [4, 6, 5], 16: [4, 4, 4, 4], 19: [4, 4, 4, 4, 3]}[length]
    return _group(number, sizes, sep)


IBAN_FORMATS = {  # country -> BBAN as (alphabet, count) runs
    "DE": [(string.digits, 18)],
    "FR": [(string.digits, 10), (string.ascii_uppercase + string.digits, 11), (string.digits, 2)],
    "GB": [(string.ascii_uppercase, 4), (string.digits, 14)],
    "NL": [(string.ascii_uppercase, 4), (string.digits, 10)],
    "BE": [(string.digits, 12)],
    "CH": [(string.digits, 5), (string.ascii_uppercase + string.digits, 12)],
}


def iban_check_digits(country: str, bban: str) -> str:
    rearranged = bban + country + "00"
    return f"{98 - int(''.join(str(int(c, 36)) for c in rearranged)) % 97:02d}"


@st.composite
def ibans(draw: st.DrawFn) -> str:
    country = draw(st.sampled_from(sorted(IBAN_FORMATS)))
    bban = "".join(
        draw(st.text(alphabet=alphabet, min_size=n, max_size=n))
        for alphabet, n in IBAN_FORMATS[country]
    )
    iban = country + iban_check_digits(country, bban) + bban
    if draw(st.booleans()):
        return iban
    return " ".join(iban[i : i + 4] for i in range(0, len(iban), 4))


emails = st.builds(
    lambda local, domain, tld: f"{local}@{domain}.{tld}",
    st.from_regex(r"[a-z0-9][a-z0-9._+-]{0,12}", fullmatch=True),
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True),
    st.from_regex(r"[a-z]{2,6}", fullmatch=True),
)

nonzero = st.sampled_from("123456789")
phones = st.one_of(
    st.builds(  # +49 30 1234567
        lambda cc, area, sub: f"+{cc} {area} {sub}",
        st.builds(lambda a, b: a + b, nonzero, st.text(string.digits, max_size=2)),
        st.builds(lambda a, b: a + b, nonzero, st.text(string.digits, min_size=1, max_size=3)),
        n_digits(4) | n_digits(7),
    ),
    st.builds(lambda a, b, c: f"+1 {a} {b} {c}", n_digits(3), n_digits(3), n_digits(4)),
    st.builds(lambda a, b, c: f"({a}) {b}-{c}", n_digits(3), n_digits(3), n_digits(4)),
    st.builds(lambda a, b, c: f"{a}-{b}-{c}", n_digits(3), n_digits(3), n_digits(4)),
    st.builds(lambda cc, a, s: f"+{cc} (0){a} {s}", nonzero, n_digits(2), n_digits(7)),
    st.builds(  # 030 1234567
        lambda area, sub: f"0{area} {sub}",
        st.text(string.digits, min_size=1, max_size=4),
        st.text(string.digits, min_size=5, max_size=8),
    ),
    st.builds(  # 01 23 45 67 89
        lambda d, rest: f"0{d} " + " ".join(rest[i : i + 2] for i in range(0, 8, 2)),
        nonzero,
        n_digits(8),
    ),
)

ips = st.ip_addresses().map(str).filter(lambda s: s != "::")

secrets = st.one_of(emails, phones, ibans(), cards(), ips)
separators = st.sampled_from([" ", "\n", ", ", "; ", " (", ") ", ": ", " - "])


@st.composite
def texts_with_secrets(draw: st.DrawFn) -> tuple[str, list[str]]:
    """Arbitrary text with secrets injected between separators."""
    pieces: list[str] = []
    injected: list[str] = []
    for _ in range(draw(st.integers(1, 6))):
        pieces.append(draw(st.text(max_size=12)))
        pieces.append(draw(separators))
        secret = draw(secrets)
        injected.append(secret)
        pieces.append(secret)
        pieces.append(draw(separators))
    pieces.append(draw(st.text(max_size=12)))
    return "".join(pieces), injected


def placeholders_in(r: Redaction) -> list[str]:
    return [m for m in re.findall(r"<[^<>]*>", r.text) if m in r.mapping]


# --- properties ---------------------------------------------------------------------


@given(texts_with_secrets())
@example(("mail a@b.co then 4111 1111 1111 1111 12", ["a@b.co", "4111 1111 1111 1111"]))
@example(("x 1::: y", ["1::"]))
@example(
    (
        " ::2:3:4:5:6:7:8 1:2:3:4:5:6:7:: ::1:0:0:1:0:0: ",
        ["::2:3:4:5:6:7:8", "1:2:3:4:5:6:7::", "::1:0:0:1:0:0"],
    )
)
def test_no_injected_secret_survives(case: tuple[str, list[str]]) -> None:
    text, injected = case
    r = REDACTOR.redact(text)
    for secret in injected:
        assume(text.count(secret) == sum(text.count(s) for s in injected if s == secret))
        assert secret not in r.text
    assert restore(r.text, r.mapping) == text


@given(st.text() | texts_with_secrets().map(lambda c: c[0]))
def test_restore_inverts_redact(text: str) -> None:
    for redactor in (REDACTOR, WITH_USER_KIND):
        r = redactor.redact(text)
        assert restore(r.text, r.mapping) == text


@given(st.text() | texts_with_secrets().map(lambda c: c[0]))
def test_redaction_is_idempotent(text: str) -> None:
    for redactor in (REDACTOR, WITH_USER_KIND):
        once = redactor.redact(text)
        twice = redactor.redact(once.text)
        assert twice.text == once.text
        assert twice.mapping == {} and twice.counts == {}


@given(st.text() | texts_with_secrets().map(lambda c: c[0]))
def test_counts_match_spans_and_values_are_distinct(text: str) -> None:
    r = WITH_USER_KIND.redact(text)
    assert sum(r.counts.values()) == len(placeholders_in(r))
    assert set(placeholders_in(r)) == set(r.mapping)
    assert len(set(r.mapping.values())) == len(r.mapping)
    assert all(v for v in r.counts.values())
    assert set(r.counts) <= set(WITH_USER_KIND.kinds)


@given(json_values)
def test_redact_value_round_trips_json(value: object) -> None:
    redacted, mapping, counts = REDACTOR.redact_value(value)
    assert restore(redacted, mapping) == value
    assert sum(counts.values()) >= len(mapping)


@given(st.lists(secrets, min_size=1, max_size=4), st.sampled_from(["<EMAIL_1>", "<IP_2>"]))
def test_existing_placeholder_text_is_not_reused(values: list[str], literal: str) -> None:
    text = f"{literal} " + " and ".join(values) + f" {literal}"
    r = REDACTOR.redact(text)
    assert literal not in r.mapping
    assert r.text.startswith(literal + " ") and r.text.endswith(" " + literal)
    assert restore(r.text, r.mapping) == text


# --- realistic examples -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("john.doe+orders@example.co.uk", "email"),
        ("jürgen.müller@beispiel.de", "email"),
        ("DE89 3704 0044 0532 0130 00", "iban"),
        ("DE89370400440532013000", "iban"),
        ("FR14 2004 1010 0505 0001 3M02 606", "iban"),
        ("GB82 WEST 1234 5698 7654 32", "iban"),
        ("NL91ABNA0417164300", "iban"),
        ("4111 1111 1111 1111", "card"),  # Visa test number
        ("4012888888881881", "card"),
        ("5555-5555-5555-4444", "card"),  # Mastercard
        ("2223003122003222", "card"),  # Mastercard 2-series
        ("3782 822463 10005", "card"),  # Amex
        ("371449635398431", "card"),
        ("+49 30 1234567", "phone"),
        ("(555) 123-4567", "phone"),
        ("555-123-4567", "phone"),
        ("+1 555 123 4567", "phone"),
        ("+1 (555) 123-4567", "phone"),
        ("+44 (0)20 7946 0958", "phone"),
        ("+33 6 12 34 56 78", "phone"),
        ("030 1234567", "phone"),
        ("030/1234567", "phone"),
        ("01 23 45 67 89", "phone"),
        ("0301234567", "phone"),
        ("555 123 4567", "phone"),
        ("1-800-555-1234", "phone"),
        ("192.168.1.10", "ip"),
        ("1.2.3.4", "ip"),  # also a version-like string: we redact valid IPv4
        ("2001:db8::8a2e:370:7334", "ip"),
        ("::1", "ip"),
        ("fe80::1%eth0", "ip"),
    ],
)
def test_realistic_values_are_redacted(value: str, kind: str) -> None:
    text = f"Hello, reach me at {value}. Thanks!"
    r = REDACTOR.redact(text)
    label = f"<{kind.upper()}_1>"
    assert r.text == f"Hello, reach me at {label}. Thanks!"
    assert r.mapping == {label: value}
    assert r.counts == {kind: 1}


@pytest.mark.parametrize(
    "text",
    [
        "Delivery on 2026-11-26 at 12:30, or 26.11.2026 / 11/26/2026 at 12:30:45",
        "Order #12345 and #1234567890 shipped",
        "Order 12345678 costs 12.50 EUR, total 1,234,567.89 or 1.234.567,00",
        "Upgrade to version 10.0.19041.1 or v1.2.3.4 or 2.0.1",
        "Between 100 200 300 and 400 people, 1 000 000 in total",
        "ISBN 978-3-16-148410-0",
        "Valid 2019-2026, open 0800-1700",
        "Card 4111 1111 1111 1112 fails Luhn",  # 16 digits, not Luhn: not a card
        "Bad IBAN GB00 WEST 1234 5698 7654 32",
        "Not an address: 256.1.1.1 or 12:30:45 or std::vector or a :: b",
        "Score 3 - 2, room 101, 5 items",
    ],
)
def test_look_alikes_are_kept(text: str) -> None:
    r = REDACTOR.redact(text)
    assert r.text == text
    assert r.mapping == {} and r.counts == {}


def test_same_value_same_placeholder() -> None:
    r = REDACTOR.redact("a@x.org wrote to b@x.org; cc a@x.org")
    assert r.text == "<EMAIL_1> wrote to <EMAIL_2>; cc <EMAIL_1>"
    assert r.counts == {"email": 3}
    assert r.mapping == {"<EMAIL_1>": "a@x.org", "<EMAIL_2>": "b@x.org"}


def test_placeholder_already_in_text_is_skipped_and_kept() -> None:
    text = "Template says <EMAIL_1>; real one is a@x.org"
    r = REDACTOR.redact(text)
    assert r.text == "Template says <EMAIL_1>; real one is <EMAIL_2>"
    assert restore(r.text, r.mapping) == text


def test_iban_wins_over_card_and_phone() -> None:
    r = REDACTOR.redact("IBAN DE89 3704 0044 0532 0130 00 please")
    assert r.counts == {"iban": 1}


def test_card_wins_over_phone_and_email_keeps_the_rest() -> None:
    r = REDACTOR.redact("pay 4111111111111111x@y.com")
    assert r.text == "pay <CARD_1><EMAIL_1>"
    assert restore(r.text, r.mapping) == "pay 4111111111111111x@y.com"


def test_phone_next_to_date_is_found() -> None:
    r = REDACTOR.redact("2026-11-26 555-123-4567 2026-11-26")
    assert r.text == "2026-11-26 <PHONE_1> 2026-11-26"


def test_iban_followed_by_words_and_another_iban() -> None:
    text = "DE89 3704 0044 0532 0130 00 GB82 WEST 1234 5698 7654 32 ABCD"
    assert REDACTOR.redact(text).text == "<IBAN_1> <IBAN_2> ABCD"


def test_kinds_can_be_restricted() -> None:
    r = Redactor(kinds=["email"]).redact("a@x.org +49 30 1234567")
    assert r.text == "<EMAIL_1> +49 30 1234567"


def test_extra_patterns() -> None:
    patterns = {"employee_id": r"EMP-[0-9]{5}", "empty": r"x*", "room-no.": r"R[0-9]{3}"}
    r = Redactor(extra_patterns=patterns).redact("EMP-12345 mailed a@x.org about EMP-54321 R101")
    assert r.text == "<EMPLOYEE_ID_1> mailed <EMAIL_1> about <EMPLOYEE_ID_2> <ROOM-NO._1>"
    assert r.counts == {"employee_id": 2, "email": 1, "room-no.": 1}
    assert restore(r.text, r.mapping) == "EMP-12345 mailed a@x.org about EMP-54321 R101"


def test_builtin_kind_beats_user_pattern() -> None:
    r = Redactor(extra_patterns={"word": r"\S+@\S+"}).redact("to a@x.org")
    assert r.counts == {"email": 1}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"extra_patterns": {"ticket": "(unclosed"}}, "ticket"),
        ({"extra_patterns": {"bad name": "x"}}, "bad name"),
        ({"extra_patterns": {"Email": "x"}}, "Email"),
        ({"extra_patterns": {"a": "x", "A": "y"}}, "'A'"),
        ({"kinds": ["email", "ssn"]}, "ssn"),
    ],
)
def test_bad_configuration_raises(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Redactor(**kwargs)  # type: ignore[arg-type]


def test_redact_value_walks_json_and_keeps_keys() -> None:
    value = {
        "from": "a@x.org",
        "a@x.org": ["call +49 30 1234567", 3, None, True, 1.5, {"to": "a@x.org"}],
    }
    redacted, mapping, counts = REDACTOR.redact_value(value)
    assert redacted == {
        "from": "<EMAIL_1>",
        "a@x.org": ["call <PHONE_1>", 3, None, True, 1.5, {"to": "<EMAIL_1>"}],
    }
    assert counts == {"email": 2, "phone": 1}
    assert restore(redacted, mapping) == value


def test_redact_value_avoids_placeholders_anywhere_in_the_value() -> None:
    redacted, mapping, _ = REDACTOR.redact_value(["a@x.org", {"k": "literal <EMAIL_1>"}])
    assert redacted == ["<EMAIL_2>", {"k": "literal <EMAIL_1>"}]
    assert mapping == {"<EMAIL_2>": "a@x.org"}


def test_restore_on_cloud_reply() -> None:
    reply = {"label": "billing", "contact": "<EMAIL_1>", "note": "<PHONE_9> unknown", "n": 2}
    restored = restore(reply, {"<EMAIL_1>": "a@x.org"})
    assert restored == {
        "label": "billing",
        "contact": "a@x.org",
        "note": "<PHONE_9> unknown",
        "n": 2,
    }


def test_restore_is_a_single_pass() -> None:
    assert restore("<X_1>", {"<X_1>": "<X_2>", "<X_2>": "boom"}) == "<X_2>"


def test_escalation_numbers_placeholders_once_across_input_and_local_answer() -> None:
    r = Redactor()
    (red_in, red_local), mapping, _ = r.redact_value(["mail a@x.org", {"to": "b@y.org"}])
    assert red_in != "mail a@x.org" and red_local["to"] != "b@y.org"
    assert restore(red_local, mapping) == {"to": "b@y.org"}
    assert restore(red_in, mapping) == "mail a@x.org"


# --- issue 9: formats that reached the cloud, and the normalised view ---------------

FULLWIDTH = str.maketrans(string.digits, "０１２３４５６７８９")
ARABIC_INDIC = str.maketrans(string.digits, "٠١٢٣٤٥٦٧٨٩")
DEVANAGARI = str.maketrans(string.digits, "०१२३४५६७८९")


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("4111.1111.1111.1111", "card"),
        ("4111\u00a01111\u00a01111\u00a01111", "card"),
        ("4111  1111  1111  1111", "card"),
        ("４１１１ １１１１ １１１１ １１１１", "card"),
        ("４１１１１１１１１１１１１１１１", "card"),
        ("5551234567", "phone"),
        ("555\u00a0123\u00a04567", "phone"),
        ("٥٥٥-١٢٣-٤٥٦٧", "phone"),
        ("4111\u200b1111\u200b1111\u200b1111", "card"),
        ("DE89\u00a03704\u00a00044\u00a00532\u00a00130\u00a000", "iban"),
        ("ｍａｉｌ＠ｅｘａｍｐｌｅ．ｃｏｍ", "email"),
        ("１９２．１６８．０．１", "ip"),
    ],
)
def test_formats_that_leaked_are_redacted_and_restored(value: str, kind: str) -> None:
    text = f"Hello, reach me at {value}. Thanks!"
    r = REDACTOR.redact(text)
    label = f"<{kind.upper()}_1>"
    assert r.text == f"Hello, reach me at {label}. Thanks!"
    assert r.mapping == {label: value}
    assert restore(r.text, r.mapping) == text


@given(
    cards(),
    st.sampled_from([None, FULLWIDTH, ARABIC_INDIC, DEVANAGARI]),
    st.sampled_from([" ", ".", "\u00a0", "  ", "-", "\u2009", "/", "_", "\u2013"]),
)
def test_cards_in_any_digits_with_any_separator(
    card: str, digits: dict[int, str] | None, sep: str
) -> None:
    value = card.replace(" ", sep).replace("-", sep)
    if digits is not None:
        value = value.translate(digits)
    text = f"card: {value} thanks"
    r = REDACTOR.redact(text)
    assert r.text == "card: <CARD_1> thanks"
    assert restore(r.text, r.mapping) == text


def test_phone_region_decides_national_formats() -> None:
    assert Redactor(region="DE").redact("ruf an: 030 12345678").text == "ruf an: <PHONE_1>"
    assert Redactor(region="GB").redact("call 020 7946 0958").text == "call <PHONE_1>"
    assert Redactor().redact("call 2125550123 now").text == "call <PHONE_1> now"
    with pytest.raises(ValueError, match="XX"):
        Redactor(region="XX")


def test_user_pattern_the_linear_engine_cannot_run_is_rejected() -> None:
    with pytest.raises(ValueError, match="RE2"):
        Redactor(extra_patterns={"ticket": r"T-(?!0)[0-9]+"})


def test_lone_surrogates_do_not_break_redaction() -> None:
    text = "a@x.org \ud800 +49 30 1234567"
    r = REDACTOR.redact(text)
    assert r.text == "<EMAIL_1> \ud800 <PHONE_1>"
    assert restore(r.text, r.mapping) == text
