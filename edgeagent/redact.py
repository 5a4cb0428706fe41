"""Redaction of personal data before anything leaves the device.  Pure: no I/O, no clock.

``Redactor.redact`` replaces e-mail addresses, phone numbers, IBANs, payment card
numbers, IP addresses and user-defined patterns with placeholders such as
``<EMAIL_1>`` and returns the mapping needed to put the originals back
(``restore``) into the cloud's reply.

Invariants (property-tested in ``tests/test_redact.py``):

- ``restore(r.text, r.mapping) == text`` for every string.
- Redaction is idempotent: redacting ``r.text`` again changes nothing.  Placeholders of
  this redactor's kinds (``<EMAIL_3>``, also ones already present in the input) are
  never redacted, and a new placeholder never reuses one already present in the input.
- Each distinct value gets one placeholder (numbered in order of appearance); a value
  seen twice gets the same placeholder.  ``counts`` counts redacted spans per kind, so
  ``sum(counts.values())`` is the number of placeholders written.
- Overlapping detections are resolved once, by priority
  IBAN > card > e-mail > IP > phone > user patterns (then the longer span).  A
  detection that only partly overlaps a winner is dropped; the text left over is
  scanned again (repeatedly, until nothing new is found), so a remainder that is
  itself sensitive is still redacted.

Decisions and heuristics (false positives are preferred over leaks, within reason):

- IBAN: 2 letters, 2 check digits, then alphanumerics, with or without single spaces;
  the ISO 7064 mod-97 checksum must hold and, for registered countries, the length
  must match the country.  Checked longest-first at chunk ends, so trailing words
  don't hide an IBAN.
- Card: 13-19 digits, either one run or groups of 3-6 digits (first group 4 digits,
  as printed on cards) separated by single spaces or dashes; first digit 2-6 (Visa,
  Mastercard, Amex, Discover, JCB, Diners, UnionPay, Maestro, Mir) and the Luhn check
  must hold.  A 16-digit number that fails Luhn is not a card.
- IPv4: dotted quads validated with ``ipaddress`` (octets <= 255; zero-padded octets
  such as ``010.000.000.001`` are accepted).  A version string that *is* a valid
  IPv4 address (``1.2.3.4``) is redacted, unless glued to a word (``v1.2.3.4``).
  IPv6 (also ``::1``, ``fe80::1%eth0``, ``::ffff:1.2.3.4``) is validated with
  ``ipaddress``; hex words that form a valid address (``cafe::1``) are redacted.
- Phone: 7-15 digits.  International numbers (``+CC ...``) are accepted in any
  grouping with spaces, dots, dashes and parentheses (``+44 (0)20 7946 0958``).
  National numbers need a phone-like shape: parentheses (``(555) 123-4567``), a
  leading trunk ``0`` (``030 1234567``, ``01 23 45 67 89``, ``0301234567`` with at
  least 9 digits), dash or slash separators (``555-123-4567``, ``030/1234567``) or the
  North American 3-3-4 grouping (``555 123 4567``, ``1 555 123 4567``).  Not phones:
  dates (``2026-11-26``, ``26.11.2026``, ``11/26/2026``), times, year or clock ranges
  (``2019-2026``, ``0800-1700``), dotted quads, version strings, prices, numbers after
  ``#``, ``$``, ``€``, ``£``, a letter or a decimal point, thousands groupings
  (``100 200 300``), and plain digit runs that don't start with ``0``.
- User patterns (``extra_patterns``, name -> regex) are applied as given; empty matches
  are ignored.  Their placeholders use the upper-cased name: ``<EMPLOYEE_ID_1>``.  Names
  are letters, digits, ``_ - .`` and may not clash (ignoring case) with a built-in kind.
- Dictionary keys are never redacted nor restored; only string values are.
"""

from __future__ import annotations

import bisect
import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar, cast

__all__ = ["BUILTIN_KINDS", "Redaction", "Redactor", "restore"]

_V = TypeVar("_V")

Finder = Callable[[str], Iterator[tuple[int, int]]]
"""Yields the ``(start, end)`` spans of one kind's detections in a text."""

BUILTIN_KINDS = ("iban", "card", "email", "ip", "phone")
"""Built-in kinds, in priority order (the earlier wins an overlap)."""


@dataclass(frozen=True)
class Redaction:
    text: str
    """The redacted text, with placeholders."""
    mapping: dict[str, str]
    """Placeholder -> original value."""
    counts: dict[str, int]
    """Kind -> number of redacted spans (for logs and metrics; never the content)."""


# --- e-mail -------------------------------------------------------------------------

_EMAIL = re.compile(
    r"(?<![\w.%+-])[\w.%+-]+@"  # local part, not starting inside a longer token
    r"(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.)+"  # domain labels
    r"[^\W\d_]{2,63}(?![\w-])"  # a letters-only top-level domain
)


def _find_emails(text: str) -> Iterator[tuple[int, int]]:
    if "@" not in text:
        return
    for m in _EMAIL.finditer(text):
        yield m.span()


# --- IBAN ---------------------------------------------------------------------------

# ISO 13616 registry: IBAN length per country.  Countries not listed accept 15-34.
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22,
    "BH": 22, "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24,
    "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
    "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27,
    "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27,
    "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20,
    "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27,
    "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28,
    "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31,
    "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip

# Country code and check digits, then up to 30 alphanumerics with optional single
# spaces; it may run into following words, the validator finds the real end.
_IBAN = re.compile(
    r"[A-Za-z](?<![A-Za-z0-9].)[A-Za-z][0-9]{2}(?: ?[A-Za-z0-9]){11,30}(?![A-Za-z0-9])"
)


def _iban_ok(compact: str) -> bool:
    compact = compact.upper()
    if not 15 <= len(compact) <= 34 or not compact[:2].isalpha():
        return False
    if _IBAN_LENGTHS.get(compact[:2], len(compact)) != len(compact):
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _find_ibans(text: str) -> Iterator[tuple[int, int]]:
    pos = 0
    while (m := _IBAN.search(text, pos)) is not None:
        start, cand = m.start(), m.group()
        want = _IBAN_LENGTHS.get(cand[:2].upper())
        pos = start + 1
        end = len(cand)
        while end > 0:  # candidate ends at chunk boundaries, longest first
            compact = cand[:end].replace(" ", "")
            if (want is None or len(compact) == want) and _iban_ok(compact):
                yield start, start + end
                pos = start + end
                break
            end = cand.rfind(" ", 0, end)


# --- payment cards ------------------------------------------------------------------

# A run of at least 13 digits with single spaces or dashes between digits.
_DIGIT_RUN = re.compile(r"[0-9](?<![0-9].)(?:[ -]?[0-9]){12,}(?![0-9])")
_DIGITS = re.compile(r"[0-9]+")


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card_ok(digits: str) -> bool:
    return 13 <= len(digits) <= 19 and "2" <= digits[0] <= "6" and _luhn_ok(digits)


def _find_cards(text: str) -> Iterator[tuple[int, int]]:
    for run in _DIGIT_RUN.finditer(text):
        groups = [(g.start(), g.end(), g.group()) for g in _DIGITS.finditer(run.group())]
        hits: list[tuple[int, int]] = []
        for i, (gstart, gend, digits) in enumerate(groups):
            if _card_ok(digits):  # one unseparated run
                hits.append((gstart, gend))
            if len(digits) != 4:
                continue
            # Printed groupings: 4-4-4-4, 4-6-5, 4-6-4, 4-4-4-4-3 ...
            for j in range(i + 1, len(groups)):
                if not 3 <= len(groups[j][2]) <= 6:
                    break
                digits += groups[j][2]
                if len(digits) > 19:
                    break
                if j - i >= 2 and _card_ok(digits):
                    hits.append((gstart, groups[j][1]))
        # Redact the union of valid windows: a neighbour group glued to a card by a
        # single space goes with it rather than leaving part of the card behind.
        hits.sort()
        base = run.start()
        merged: list[list[int]] = []
        for s, e in hits:
            if merged and s < merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        for s, e in merged:
            yield base + s, base + e


# --- IP addresses -------------------------------------------------------------------

_IPV4 = re.compile(r"[0-9](?<![\w.].)[0-9]{0,2}\.(?:[0-9]{1,3}\.){2}[0-9]{1,3}(?!\w|\.[0-9])")
_IPV6 = re.compile(
    # Up to 8 colons in a valid address (::2:3:4:5:6:7:8), one more if a colon follows.
    r"(?<![\w:.%])(?:[0-9A-Fa-f]{0,4}:){2,9}"
    r"(?:(?:[0-9]{1,3}\.){3}[0-9]{1,3}|[0-9A-Fa-f]{1,4})?"
    r"(?:%[0-9A-Za-z_-]+)?"  # zone id
    r"(?![\w:]|\.[0-9])"
)
_HEX_DIGIT = re.compile(r"[0-9A-Fa-f]")


def _ipv4_ok(cand: str) -> bool:
    try:
        ipaddress.IPv4Address(".".join(str(int(octet)) for octet in cand.split(".")))
    except ValueError:
        return False
    return True


def _ipv6_ok(cand: str) -> bool:
    if _HEX_DIGIT.search(cand.partition("%")[0]) is None:  # "::" alone is punctuation
        return False
    try:
        ipaddress.IPv6Address(cand)
    except ValueError:
        return False
    return True


def _find_ips(text: str) -> Iterator[tuple[int, int]]:
    for m in _IPV4.finditer(text):
        if _ipv4_ok(m.group()):
            yield m.span()
    if text.count(":") < 2:
        return
    for m in _IPV6.finditer(text):
        cand = m.group()
        if _ipv6_ok(cand):
            yield m.span()
        elif cand.endswith(":") and _ipv6_ok(cand[:-1]):
            yield m.start(), m.end() - 1  # "at 2001:db8::1: ..." -- a trailing colon


# --- phone numbers ------------------------------------------------------------------

_PHONE_START = re.compile(
    r"[+(0-9]"
    r"(?<![\w+#@$€£%\\/-].)(?<![0-9][.,].)"  # not inside a word, number, price or path
    r"(?=(?:[ ()./+-]{0,3}[0-9]){6})"  # 7 digits or so ahead
)
_PHONE = re.compile(
    r"(?:\+[0-9]{1,3}[ .-]?)?"  # country code
    r"(?:\([0-9]{1,5}\)[ -]?)?"  # (area code) or (0)
    r"[0-9]{1,12}(?:[ ./-][0-9]{1,12}){0,7}"
    r"(?![\w@]|[.,:/-]?[0-9])"  # not followed by more of a number
)
_PHONE_PARTS = re.compile(r"(\+[0-9]{1,3}[ .-]?)?(\([0-9]{1,5}\)[ -]?)?(.*)", re.DOTALL)
_PHONE_SEP = re.compile(r"[ ./-]")
_DATE_START = re.compile(
    r"(?:[0-9]{4}[./-][0-9]{1,2}[./-][0-9]{1,2}|[0-9]{1,2}[./-][0-9]{1,2}[./-][0-9]{4})(?![0-9])"
)


def _is_range(groups: list[str], seps: list[str]) -> bool:
    """Two 4-digit groups that read as years (2019-2026) or clock times (0800-1700)."""
    if seps not in (["-"], ["/"]) or any(len(g) != 4 for g in groups):
        return False
    years = all(g[:2] in ("19", "20") for g in groups)
    clock = all(int(g[:2]) <= 24 and int(g[2:]) < 60 for g in groups)
    return years or clock


def _shape_ok(country: str, area: str, groups: list[str], seps: list[str], n: int) -> bool:
    """Whether digit ``groups`` joined by ``seps`` (after an optional ``+CC`` and
    ``(area)``), ``n`` digits in all, read as a phone number."""
    uniform = seps[1:] if seps[:1] == ["/"] else seps  # 030/123 4567
    if len(set(uniform)) > 1:  # 555-123-4567 2026-11-26 is two things
        return False
    if country:
        return True
    if area:
        return all(len(g) >= 2 for g in groups)
    if _is_range(groups, seps) or any(len(g) < 2 for g in groups[1:]):
        return False
    dotted_quad = len(groups) == 4 and all(len(g) <= 3 for g in groups)
    if "." in seps and (len(groups[0]) < 2 or dotted_quad):
        return False  # version strings, dotted quads
    if len(groups) == 1:
        return groups[0].startswith("0") and n >= 9  # 0301234567; not an order number
    if groups[0].startswith("0") or seps[0] in "-/":
        return True
    lengths = [len(g) for g in groups]
    return lengths == [3, 3, 4] or (lengths == [1, 3, 3, 4] and groups[0] == "1")


def _phone_length(cand: str) -> int:
    """Length of the longest prefix of ``cand`` that is a phone number; 0 if none.

    The whole candidate is tried first; a shorter reading must end before a space
    (``555-123-4567 2026-11-26``).
    """
    parts = _PHONE_PARTS.fullmatch(cand)
    if parts is None:  # pragma: no cover -- the pattern matches any string
        return 0
    country, area, rest = parts.group(1) or "", parts.group(2) or "", parts.group(3)
    if not country and not area and _DATE_START.match(cand):
        return 0
    groups = _PHONE_SEP.split(rest)
    seps = _PHONE_SEP.findall(rest)
    n = sum(ch.isdigit() for ch in country + area) + len(rest) - len(seps)
    length = len(cand)
    for k in range(len(groups), 0, -1):
        if n < 7:
            break
        cut_ok = k == len(groups) or seps[k - 1] == " "
        if n <= 15 and cut_ok and _shape_ok(country, area, groups[:k], seps[: k - 1], n):
            return length
        n -= len(groups[k - 1])
        length -= len(groups[k - 1]) + 1
    return 0


def _find_phones(text: str) -> Iterator[tuple[int, int]]:
    pos = 0
    while (hint := _PHONE_START.search(text, pos)) is not None:
        start = hint.start()
        pos = start + 1
        m = _PHONE.match(text, start)
        if m is not None and (length := _phone_length(m.group())):
            yield start, start + length
            pos = start + length


def _regex_finder(rx: re.Pattern[str]) -> Finder:
    def find(text: str) -> Iterator[tuple[int, int]]:
        for m in rx.finditer(text):
            if m.end() > m.start():
                yield m.span()

    return find


_BUILTIN_FINDERS: dict[str, Finder] = {
    "iban": _find_ibans,
    "card": _find_cards,
    "email": _find_emails,
    "ip": _find_ips,
    "phone": _find_phones,
}
_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # as config.py's TOPIC_SEGMENT
_ANGLED = re.compile(r"<[^<>]*>")


@dataclass(frozen=True)
class _Detector:
    kind: str
    label: str
    find: Finder


def _walk(value: object, fn: Callable[[str], str]) -> object:
    """Apply ``fn`` to every string in a JSON-like value; keys and other scalars stay."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {k: _walk(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v, fn) for v in value]
    if isinstance(value, tuple):
        return tuple(_walk(v, fn) for v in value)
    return value


class Redactor:
    """Finds personal data in text and replaces it with placeholders.

    Immutable after construction; safe to share between threads.
    """

    def __init__(
        self,
        kinds: Iterable[str] = ("email", "phone", "iban", "card", "ip"),
        extra_patterns: dict[str, str] | None = None,
    ) -> None:
        wanted = set(kinds)
        unknown = wanted - set(BUILTIN_KINDS)
        if unknown:
            raise ValueError(f"unknown redaction kind(s): {sorted(unknown)}")
        detectors = [_Detector(k, k.upper(), _BUILTIN_FINDERS[k]) for k in BUILTIN_KINDS]
        detectors = [d for d in detectors if d.kind in wanted]
        taken = {k.upper() for k in BUILTIN_KINDS}
        for name, pattern in (extra_patterns or {}).items():
            if not _NAME.fullmatch(name):
                raise ValueError(f"extra pattern name {name!r}: use letters, digits, _ - .")
            if name.upper() in taken:
                raise ValueError(f"extra pattern name {name!r}: clashes with another kind")
            taken.add(name.upper())
            try:
                rx = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"extra pattern {name!r} does not compile: {exc}") from exc
            detectors.append(_Detector(name, name.upper(), _regex_finder(rx)))
        self._detectors = tuple(detectors)
        self.kinds = tuple(d.kind for d in detectors)
        """Enabled kinds, in priority order."""
        labels = "|".join(re.escape(d.label) for d in detectors) or "(?!)"
        # Placeholders of our kinds: never redacted, and their numbers are taken.
        self._placeholder = re.compile(rf"<(?:{labels})_[0-9]{{1,6}}>")

    def redact(self, text: str) -> Redaction:
        """Redact one text."""
        session = _Session(self, self._placeholder.findall(text))
        return Redaction(session.redact(text), session.mapping, session.counts)

    def redact_value(self, value: _V) -> tuple[_V, dict[str, str], dict[str, int]]:
        """Redact every string in a JSON-like value (dict keys are left as they are).

        One mapping covers the whole value: the same e-mail in two fields gets the same
        placeholder.  Lists, tuples and dicts are rebuilt (dict subclasses come back as
        ``dict``); numbers, booleans and None are returned as they are.
        """
        existing: list[str] = []

        def collect(s: str) -> str:
            existing.extend(self._placeholder.findall(s))
            return s

        _walk(value, collect)
        session = _Session(self, existing)
        redacted = cast(_V, _walk(value, session.redact))
        return redacted, session.mapping, session.counts

    def _spans(self, text: str) -> list[tuple[int, int, _Detector]]:
        """Non-overlapping detections in ``text``, sorted by start."""
        protected = [m.span() for m in self._placeholder.finditer(text)]
        protected_starts = [s for s, _ in protected]
        candidates: list[tuple[int, int, int, int, _Detector]] = []
        for rank, det in enumerate(self._detectors):
            for s, e in det.find(text):
                i = bisect.bisect_left(protected_starts, e)
                if i and protected[i - 1][1] > s:
                    continue
                candidates.append((rank, s - e, s, e, det))
        candidates.sort(key=lambda c: c[:3])
        starts: list[int] = []
        chosen: list[tuple[int, int, _Detector]] = []
        for _rank, _neg_len, s, e, det in candidates:
            i = bisect.bisect_left(starts, e)
            if i and chosen[i - 1][1] > s:
                continue  # overlaps a span of higher priority
            starts.insert(i, s)
            chosen.insert(i, (s, e, det))
        return chosen


class _Session:
    """Placeholder bookkeeping for one ``redact`` or ``redact_value`` call."""

    def __init__(self, redactor: Redactor, existing: Iterable[str]) -> None:
        self._redactor = redactor
        self._reserved = set(existing)
        self._by_value: dict[str, str] = {}
        self._next: dict[str, int] = {}
        self.mapping: dict[str, str] = {}
        self.counts: dict[str, int] = {}

    def redact(self, text: str) -> str:
        # Rescan until nothing new is found: removing a span changes its neighbours'
        # context (``4111111111111111x@y.com`` leaves ``x@y.com``).  Each round turns
        # at least one unprotected character into a protected placeholder, so it ends.
        while spans := self._redactor._spans(text):
            pieces: list[str] = []
            last = 0
            for s, e, det in spans:
                pieces.append(text[last:s])
                pieces.append(self._placeholder(det.label, text[s:e]))
                self.counts[det.kind] = self.counts.get(det.kind, 0) + 1
                last = e
            pieces.append(text[last:])
            text = "".join(pieces)
        return text

    def _placeholder(self, label: str, value: str) -> str:
        found = self._by_value.get(value)
        if found is not None:
            return found
        index = self._next.get(label, 1)
        while (placeholder := f"<{label}_{index}>") in self._reserved:
            index += 1
        self._next[label] = index + 1
        self._by_value[value] = placeholder
        self.mapping[placeholder] = value
        return placeholder


def restore(value: _V, mapping: Mapping[str, str]) -> _V:
    """Put the original values back into every string of a JSON-like value.

    One pass per string, so a restored value is never itself rewritten.  Placeholders
    not in ``mapping`` (a literal ``<EMAIL_1>`` in the original text) stay as they are.
    Dict keys are left as they are.
    """
    if not mapping:
        return value

    def sub(s: str) -> str:
        if "<" not in s:
            return s
        return _ANGLED.sub(lambda m: mapping.get(m.group(), m.group()), s)

    return cast(_V, _walk(value, sub))
