"""Redaction of personal data before anything leaves the device.  Pure: no I/O, no clock.

``Redactor.redact`` replaces e-mail addresses, phone numbers, IBANs, payment card
numbers, IP addresses and user-defined patterns with placeholders such as
``<EMAIL_1>`` and returns the mapping needed to put the originals back
(``restore``) into the cloud's reply.

Invariants (property-tested in ``tests/test_redact.py``):

- ``restore(r.text, r.mapping) == text`` for every string: a placeholder stands for
  the exact original characters (full-width digits, no-break spaces and all).
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
- Time is linear in the input for the built-in kinds and user patterns (RE2, no
  backtracking; a fixed number of candidate windows per digit or word), except for
  the rescans above, one per nested overlap.

Matching runs on a normalised view of the text, so the same number written in another
script or with other separators is found: NFKC (full-width ``４１１１`` and ``＠``
become ASCII), every Unicode decimal digit becomes its ASCII digit (``٤١١١``), every
Unicode space becomes a space and every dash a hyphen, and invisible format characters
(zero-width space, soft hyphen, BOM) are dropped.  Spans found in the view are mapped
back to the original characters, which is what gets replaced and restored.

Decisions and heuristics (false positives are preferred over leaks, within reason):

- IBAN: 2 letters, 2 check digits, then alphanumerics, in groups separated by at most
  two spaces, dashes or dots.  Validated by ``python-stdnum`` (ISO 7064 mod-97 and the
  IBAN registry's length and format for the country, without the national check
  digits, so a mistyped-but-plausible account is still redacted).  A country the
  registry does not know is not an IBAN (``flight ab123 and my …`` passes mod-97).
  Checked longest-first at group ends, so trailing words don't hide an IBAN.
- Card: 13-19 digits, first digit 2-6 (Visa, Mastercard, Amex, Discover, JCB, Diners,
  UnionPay, Maestro, Mir), Luhn check (``python-stdnum``).  Either one run of digits or
  any grouping with separators of one to three characters among space, ``. - _ / \\ ,
  : ; | * ~`` (``4111.1111.1111.1111``, ``4111  1111 1111 1111``, ``4111 11 1111
  1111 11``).  Every window of consecutive groups is tried; neighbouring groups glued
  to a valid window go with it.  A 16-digit number that fails Luhn is not a card.
- IPv4: dotted quads validated with ``ipaddress`` (octets <= 255; zero-padded octets
  such as ``010.000.000.001`` are accepted).  A version string that *is* a valid
  IPv4 address (``1.2.3.4``) is redacted, unless glued to a word (``v1.2.3.4``) or to
  more dotted digits.  IPv6 (also ``::1``, ``fe80::1%eth0``, ``::ffff:1.2.3.4``) is
  validated with ``ipaddress``; hex words that form a valid address (``cafe::1``) are
  redacted.
- Phone: found by ``phonenumbers`` (Google's libphonenumber metadata) with leniency
  POSSIBLE: international numbers (``+44 20 7946 0958``) for every country, national
  ones in the format of the configured ``region`` (default ``US``: ``555 123 4567``,
  ``5551234567``; ``DE``: ``030 1234567``) and international ones dialled with that
  region's exit code (``0049 30 …`` for ``DE``, ``011 49 30 …`` for ``US``).  At least
  7 digits.  A safety net catches what the numbering plans do not allow but people
  write: ``+CC`` and 7-15 digits in any grouping, and national numbers of other
  countries by their leading trunk ``0`` (``030 1234567``, ``01 23 45 67 89``,
  ``0301234567``: 7-15 digits in groups of two or more joined by one kind of
  separator; at least 9 digits unseparated).  Not phones (our filters on top of the
  library's): numbers after ``#``, ``$``, ``€``, ``£``, ``%``, ``\\``, ``/``, a letter,
  or a decimal point; numbers followed by a decimal part; dates (``2026-11-26``,
  ``26.11.2026``), year or clock ranges (``2019-2026``, ``0800-1700``), thousands
  groupings (``1 000 000``, ``1.234.567``) and dotted quads.
- User patterns (``extra_patterns``, name -> RE2 pattern) are applied as given; empty
  matches are ignored.  Their placeholders use the upper-cased name:
  ``<EMPLOYEE_ID_1>``.  Names are letters, digits, ``_ - .`` and may not clash
  (ignoring case) with a built-in kind.  User patterns see the normalised view too.
- Dictionary keys are never redacted nor restored; only string values are.
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
import re
import string
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar, cast

import phonenumbers
from stdnum import iban as stdnum_iban
from stdnum import luhn as stdnum_luhn

from edgeagent import regex

__all__ = ["BUILTIN_KINDS", "DEFAULT_REGION", "Redaction", "Redactor", "check_region", "restore"]

_V = TypeVar("_V")

Finder = Callable[[str], Iterator[tuple[int, int]]]
"""Yields the ``(start, end)`` spans of one kind's detections in a (normalised) text."""

BUILTIN_KINDS = ("iban", "card", "email", "ip", "phone")
"""Built-in kinds, in priority order (the earlier wins an overlap)."""

DEFAULT_REGION = "US"
"""Phone region used when none is configured (ISO 3166 alpha-2)."""


def check_region(region: str) -> str:
    """``region`` upper-cased if ``phonenumbers`` knows it; ValueError otherwise."""
    code = region.strip().upper()
    if code not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(f"unknown phone region {region!r}: use an ISO 3166 code such as US, DE")
    return code


@dataclass(frozen=True)
class Redaction:
    text: str
    """The redacted text, with placeholders."""
    mapping: dict[str, str]
    """Placeholder -> original value."""
    counts: dict[str, int]
    """Kind -> number of redacted spans (for logs and metrics; never the content)."""


# --- normalisation ------------------------------------------------------------------

# Tokenizers (one character class, repeated) run on Python's ``re``: a single class
# cannot backtrack, so they are linear there too, and they cost ~0.3 us per match where
# google-re2's Python wrapper costs ~20 us (adversarial inputs have thousands).  Every
# pattern with alternation, nesting or bounded repeats runs on RE2 (``regex``).
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
_DIGITS = re.compile(r"[0-9]+")
_NON_DIGITS = re.compile(r"[^0-9]+")
_ALNUM = re.compile(r"[A-Za-z0-9]+")


@functools.lru_cache(maxsize=8192)
def _fold(ch: str) -> str:
    """The normalised form of one non-ASCII character (possibly empty or several)."""
    category = unicodedata.category(ch)
    if category == "Cs":
        return "\ufffd"  # a lone surrogate
    if category == "Cf":
        return ""  # zero-width space/joiners, soft hyphen, BOM, bidi marks
    out = []
    for c in unicodedata.normalize("NFKC", ch):
        if c.isascii():
            out.append(c)
            continue
        digit = unicodedata.decimal(c, None)
        cat = unicodedata.category(c)
        if digit is not None:
            out.append(str(digit))
        elif cat == "Zs" or c in "\u2028\u2029\x85":
            out.append(" ")
        elif cat == "Pd" or c == "\u2212":  # dashes, the minus sign
            out.append("-")
        elif c in "\u3002\uff61":  # ideographic full stops (IDNA label separators)
            out.append(".")
        elif cat != "Cf":
            out.append(c)
    return "".join(out)


def _normalise(text: str) -> tuple[str, list[int] | None]:
    """The matching view of ``text`` and, unless it is ``text`` itself, the index in
    ``text`` of the character each view character comes from (non-decreasing)."""
    if text.isascii():
        return text, None
    parts: list[str] = []
    src: list[int] = []
    pos = 0
    for m in _NON_ASCII.finditer(text):
        a, b = m.span()
        if a > pos:
            parts.append(text[pos:a])
            src.extend(range(pos, a))
        for i in range(a, b):
            folded = _fold(text[i])
            parts.append(folded)
            src.extend([i] * len(folded))
        pos = b
    parts.append(text[pos:])
    src.extend(range(pos, len(text)))
    return "".join(parts), src


# --- e-mail -------------------------------------------------------------------------

_EMAIL = regex.compile(
    r"[\p{L}\p{N}\p{M}.%+_-]+@"  # local part (leftmost match: starts where the token does)
    r"(?:[\p{L}\p{N}](?:[\p{L}\p{N}\p{M}-]{0,61}[\p{L}\p{N}\p{M}])?\.)+"  # domain labels
    r"(?:[xX][nN]--[a-zA-Z0-9-]{1,59}|\p{L}[\p{L}\p{M}]{1,62})"  # TLD: punycode or letters
)


def _find_emails(text: str) -> Iterator[tuple[int, int]]:
    if "@" not in text:
        return
    for m in _EMAIL.finditer(text):
        yield m.span()


# --- IBAN ---------------------------------------------------------------------------

_IBAN_GAP = frozenset(" -.")


def _iban_ok(compact: str) -> bool:
    if not 15 <= len(compact) <= 34:
        return False
    return bool(stdnum_iban.is_valid(compact, check_country=False))


def _find_ibans(text: str) -> Iterator[tuple[int, int]]:
    chunks = [m.span() for m in _ALNUM.finditer(text)]
    i = 0
    while i < len(chunks):
        s, e = chunks[i]
        if not (text[s : s + 2].isalpha() and e - s >= 2):
            i += 1
            continue
        # Chunks i..j joined by short gaps, at most 34 characters.
        parts = [text[s:e].upper()]
        total = e - s
        j = i + 1
        while j < len(chunks) and total < 34:
            gap = text[chunks[j - 1][1] : chunks[j][0]]
            if len(gap) > 2 or not _IBAN_GAP.issuperset(gap):
                break
            total += chunks[j][1] - chunks[j][0]
            parts.append(text[chunks[j][0] : chunks[j][1]].upper())
            j += 1
        head = "".join(parts)[:4]
        found = False
        if len(head) == 4 and head[2:].isdigit():
            for k in range(len(parts), 0, -1):  # longest first
                if _iban_ok("".join(parts[:k])):
                    yield s, chunks[i + k - 1][1]
                    i += k
                    found = True
                    break
        if not found:
            i += 1


# --- payment cards ------------------------------------------------------------------

# Digit groups joined by separators of one to three characters.
_DIGIT_RUN = regex.compile(r"[0-9]+(?:[ ./\\,:;|*~_-]{1,3}[0-9]+)*")
_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)  # Luhn: 2*d with its digits summed


def _find_cards(text: str) -> Iterator[tuple[int, int]]:
    for run in _DIGIT_RUN.finditer(text):
        base = run.start()
        if run.end() - base < 13:
            continue
        groups = [g.span() for g in _DIGITS.finditer(run.group())]
        digits = "".join(run.group()[a:b] for a, b in groups)
        # Prefix sums for the Luhn sum of any slice: p[par][k] sums digits[:k], doubling
        # the digits whose index has parity `par`.  A slice ending at index `last` doubles
        # the digits of the other parity than `last`.
        p: tuple[list[int], list[int]] = ([0], [0])
        for idx, ch in enumerate(digits):
            d = ord(ch) - 48
            p[0].append(p[0][-1] + (_DOUBLED[d] if idx % 2 == 0 else d))
            p[1].append(p[1][-1] + (_DOUBLED[d] if idx % 2 == 1 else d))
        offsets = [0]  # digit index where each group starts
        for a, b in groups:
            offsets.append(offsets[-1] + b - a)
        hits: list[tuple[int, int]] = []
        for i in range(len(groups)):
            first = offsets[i]
            if not "2" <= digits[first] <= "6":
                continue
            for j in range(i, len(groups)):
                n = offsets[j + 1] - first
                if n > 19:
                    break
                if n < 13:
                    continue
                last = offsets[j + 1] - 1
                sums = p[1 - last % 2]
                if (sums[last + 1] - sums[first]) % 10 == 0 and stdnum_luhn.is_valid(
                    digits[first : last + 1]
                ):
                    hits.append((groups[i][0], groups[j][1]))
        # Redact the union of valid windows: a neighbour group glued to a card goes with
        # it rather than leaving part of the card behind.
        hits.sort()
        merged: list[list[int]] = []
        for s, e in hits:
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        for s, e in merged:
            yield base + s, base + e


# --- IP addresses -------------------------------------------------------------------

_IPV4 = regex.compile(r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}")
_IPV6 = regex.compile(
    # Up to 8 colons in a valid address (::2:3:4:5:6:7:8), one more if a colon follows.
    r"(?:[0-9A-Fa-f]{0,4}:){2,9}"
    r"(?:(?:[0-9]{1,3}\.){3}[0-9]{1,3}|[0-9A-Fa-f]{1,4})?"
    r"(?:%[0-9A-Za-z_-]+)?"  # zone id
)


def _is_word(ch: str) -> bool:
    """Glued to a word: ASCII letters, digits, ``_``.  Letters of other scripts are
    not (Japanese and Chinese write ``電話は555-123-4567です`` without spaces)."""
    return ch.isascii() and (ch.isalnum() or ch == "_")


def _ipv4_ok(cand: str) -> bool:
    try:
        ipaddress.IPv4Address(".".join(str(int(octet)) for octet in cand.split(".")))
    except ValueError:
        return False
    return True


def _ipv6_ok(cand: str) -> bool:
    if not any(c in string.hexdigits for c in cand.partition("%")[0]):  # "::" alone
        return False
    try:
        ipaddress.IPv6Address(cand)
    except ValueError:
        return False
    return True


def _find_ips(text: str) -> Iterator[tuple[int, int]]:
    n = len(text)
    for m in _IPV4.finditer(text):
        s, e = m.span()
        before = text[s - 1] if s else ""
        if before and (_is_word(before) or before == "."):
            continue  # v1.2.3.4, 1.2.3.4.5 (the match starts inside a longer token)
        after = text[e : e + 2]
        if after[:1] and (_is_word(after[0]) or (after[0] == "." and after[1:2].isdigit())):
            continue
        if _ipv4_ok(m.group()):
            yield s, e
    if text.count(":") < 2:
        return
    for m in _IPV6.finditer(text):
        s, e = m.span()
        before = text[s - 1] if s else ""
        if before and (_is_word(before) or before in ":.%"):
            continue
        after = text[e : e + 2] if e < n else ""
        if after[:1] and (_is_word(after[0]) or after[0] == ":"):
            continue
        if after[:1] == "." and after[1:2].isdigit():
            continue
        cand = m.group()
        if _ipv6_ok(cand):
            yield s, e
        elif cand.endswith(":") and _ipv6_ok(cand[:-1]):
            yield s, e - 1  # "at 2001:db8::1: ..." -- a trailing colon


# --- phone numbers ------------------------------------------------------------------

_PHONE_BEFORE_NOT = frozenset("#$€£%\\/@")
_PHONE_DATE = regex.compile(
    r"^(?:[0-9]{4}[./-][0-9]{1,2}[./-][0-9]{1,2}|[0-9]{1,2}[./-][0-9]{1,2}[./-][0-9]{2,4})$"
)
_PHONE_MIN_DIGITS = 7


def _not_a_phone(text: str, s: int, e: int) -> bool:
    """Our filters on top of ``phonenumbers``: what reads as something else."""
    raw = text[s:e]
    before = text[s - 1] if s else ""
    if before and (_is_word(before) or before in _PHONE_BEFORE_NOT):
        return True
    if s >= 2 and before in ".," and text[s - 2].isdigit():
        return True  # the decimal part of a number
    after = text[e : e + 2]
    if after[:1] in (".", ",") and after[1:2].isdigit():
        return True  # followed by a decimal part
    if after[:1] and _is_word(after[0]):
        return True
    if raw.startswith(("+", "(")):
        return False  # international or with an area code: a phone
    digits = sum(c.isdigit() for c in raw)
    if digits < _PHONE_MIN_DIGITS:
        return True
    if _PHONE_DATE.fullmatch(raw):
        return True
    groups = [m.group() for m in _DIGITS.finditer(raw)]
    seps = {m.group() for m in _NON_DIGITS.finditer(raw)}
    if len(groups) == 2 and seps <= {"-", "/"} and all(len(g) == 4 for g in groups):
        years = all(g[:2] in ("19", "20") for g in groups)
        clock = all(int(g[:2]) <= 24 and int(g[2:]) < 60 for g in groups)
        if years or clock:
            return True  # 2019-2026, 0800-1700
    thousands = len(groups) >= 3 and all(len(g) == 3 for g in groups[1:])
    if thousands and len(groups[0]) <= 3 and not groups[0].startswith("0"):
        return True  # 1 000 000, 1.234.567, 100 200 300
    return len(groups) == 4 and seps == {"."} and all(len(g) <= 3 for g in groups)


# The safety net behind phonenumbers (which knows real numbering plans, so it misses
# numbers that are possible elsewhere or made up): ``+CC`` and any grouping, an
# ``(area)`` code, or a leading trunk (or exit) prefix 0, then digit groups.
_FALLBACK_PHONE = regex.compile(
    r"(?:\+[0-9]{1,3}[ .-]?(?:\(0\)[ ]?)?|\([0-9]{1,5}\)[ -]?|0)"
    r"[0-9]*(?:[ ]?/[ ]?[0-9]+)?(?:[ .-][0-9]+){0,7}"
)


def _fallback_shape_ok(raw: str) -> bool:
    groups = [m.group() for m in _DIGITS.finditer(raw)]
    n = sum(len(g) for g in groups)
    if not _PHONE_MIN_DIGITS <= n <= 15:
        return False
    if raw.startswith("+"):
        return True
    rest = raw.partition(")")[2].lstrip(" -") if raw.startswith("(") else raw
    groups = [m.group() for m in _DIGITS.finditer(rest)]
    seps = {m.group() for m in _NON_DIGITS.finditer(rest.replace("/", " ", 1))}
    if len(seps) > 1 or any(len(g) < 2 for g in groups[1:]):
        return False  # 555-123-4567 2026 is two things
    if raw.startswith("("):
        return len(groups[0]) >= 2
    return len(groups) > 1 or n >= 9  # 0301234567; shorter runs are order numbers


def _possible_in(region: str) -> Callable[[str], bool]:
    def possible(raw: str) -> bool:
        try:
            return phonenumbers.is_possible_number(phonenumbers.parse(raw, region))
        except phonenumbers.NumberParseException:
            return False

    return possible


def _cut(text: str, s: int, raw: str, ok: Callable[[str], bool]) -> int:
    """Length of the longest phone at ``text[s:]`` that is a prefix of ``raw`` ending
    at its end or before a space (``030 1234567 2026`` is a phone and a year); 0: none."""
    cuts = [len(raw)] + [i for i in range(len(raw) - 1, 0, -1) if raw[i] == " "]
    for cut in cuts[:9]:
        if ok(raw[:cut]) and not _not_a_phone(text, s, s + cut):
            return cut
    return 0


def _phone_finder(region: str) -> Finder:
    possible = _possible_in(region)

    def find(text: str) -> Iterator[tuple[int, int]]:
        if _DIGITS.search(text) is None:
            return
        matcher = phonenumbers.PhoneNumberMatcher(
            text, region, leniency=phonenumbers.Leniency.POSSIBLE
        )
        for m in matcher:
            if cut := _cut(text, m.start, m.raw_string, possible):
                yield m.start, m.start + cut
        for f in _FALLBACK_PHONE.finditer(text):
            start, raw = f.start(), f.group()
            # A candidate glued to a number (``10 00 00000``) may hide one that starts
            # at a later group: try those too (at most 8 groups).
            offsets = [0] + [i + 1 for i, c in enumerate(raw[:-1]) if c in " ./-"]
            for off in offsets:
                if raw[off] in "0+(" and (
                    cut := _cut(text, start + off, raw[off:], _fallback_shape_ok)
                ):
                    yield start + off, start + off + cut
                    break

    return find


def _regex_finder(rx: regex.Pattern) -> Finder:
    def find(text: str) -> Iterator[tuple[int, int]]:
        for m in rx.finditer(text):
            s, e = m.span()
            if e > s:
                yield s, e

    return find


_BUILTIN_FINDERS: dict[str, Finder] = {
    "iban": _find_ibans,
    "card": _find_cards,
    "email": _find_emails,
    "ip": _find_ips,
}
_NAME = regex.compile(r"[A-Za-z0-9_.-]+")  # as config.py's TOPIC_SEGMENT
_ANGLED = regex.compile(r"<[^<>]*>")


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
        region: str = DEFAULT_REGION,
    ) -> None:
        wanted = set(kinds)
        unknown = wanted - set(BUILTIN_KINDS)
        if unknown:
            raise ValueError(f"unknown redaction kind(s): {sorted(unknown)}")
        finders = dict(_BUILTIN_FINDERS, phone=_phone_finder(check_region(region)))
        detectors = [_Detector(k, k.upper(), finders[k]) for k in BUILTIN_KINDS]
        detectors = [d for d in detectors if d.kind in wanted]
        taken = {k.upper() for k in BUILTIN_KINDS}
        for name, pattern in (extra_patterns or {}).items():
            if not _NAME.fullmatch(name):
                raise ValueError(f"extra pattern name {name!r}: use letters, digits, _ - .")
            if name.upper() in taken:
                raise ValueError(f"extra pattern name {name!r}: clashes with another kind")
            taken.add(name.upper())
            try:
                rx = regex.compile(pattern)
            except regex.PatternError as exc:
                raise ValueError(f"extra pattern {name!r}: {exc}") from None
            detectors.append(_Detector(name, name.upper(), _regex_finder(rx)))
        self._detectors = tuple(detectors)
        self.kinds = tuple(d.kind for d in detectors)
        """Enabled kinds, in priority order."""
        labels = "|".join(regex.escape(d.label) for d in detectors) or "[^\\x00-\\x{10FFFF}]"
        # Placeholders of our kinds: never redacted, and their numbers are taken.
        self._placeholder = regex.compile(rf"<(?:{labels})_[0-9]{{1,6}}>")

    def redact(self, text: str) -> Redaction:
        """Redact one text."""
        session = _Session(self, self._placeholders_in(text))
        return Redaction(session.redact(text), session.mapping, session.counts)

    def redact_value(self, value: _V) -> tuple[_V, dict[str, str], dict[str, int]]:
        """Redact every string in a JSON-like value (dict keys are left as they are).

        One mapping covers the whole value: the same e-mail in two fields gets the same
        placeholder.  Lists, tuples and dicts are rebuilt (dict subclasses come back as
        ``dict``); numbers, booleans and None are returned as they are.
        """
        existing: list[str] = []

        def collect(s: str) -> str:
            existing.extend(self._placeholders_in(s))
            return s

        _walk(value, collect)
        session = _Session(self, existing)
        redacted = cast(_V, _walk(value, session.redact))
        return redacted, session.mapping, session.counts

    def _placeholders_in(self, text: str) -> list[str]:
        if "<" not in text:
            return []
        return [m.group() for m in self._placeholder.finditer(text)]

    def _spans(self, text: str) -> list[tuple[int, int, _Detector]]:
        """Non-overlapping detections in ``text``, sorted by start, in ``text``'s
        coordinates (found in its normalised view)."""
        view, src = _normalise(text)
        protected = [m.span() for m in self._placeholder.finditer(view)] if "<" in view else []
        protected_starts = [s for s, _ in protected]
        candidates: list[tuple[int, int, int, int, _Detector]] = []
        for rank, det in enumerate(self._detectors):
            for s, e in det.find(view):
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
        if src is None:
            return chosen
        # Back to the original characters.  Two spans that end and start inside one
        # character's expansion (``½`` is ``1⁄2``) would overlap there: the later one is
        # dropped and found again by the rescan.
        out: list[tuple[int, int, _Detector]] = []
        for s, e, det in chosen:
            os_, oe = src[s], src[e - 1] + 1
            if out and out[-1][1] > os_:
                continue
            out.append((os_, oe, det))
        return out


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
        pieces: list[str] = []
        last = 0
        for m in _ANGLED.finditer(s):
            a, b = m.span()
            pieces.append(s[last:a])
            pieces.append(mapping.get(s[a:b], s[a:b]))
            last = b
        pieces.append(s[last:])
        return "".join(pieces)

    return cast(_V, _walk(value, sub))
