"""Linear-time regular expressions (RE2) for every pattern that sees job input.

Python's ``re`` backtracks: a pattern as innocent as ``(-?\\d+)\\s*C`` takes time
quadratic in the length of a string of digits, and it holds the GIL while it does, so
one 16 KiB input froze every task and the event loop for seconds.  RE2 (``google-re2``)
matches in time linear in the input for every pattern it accepts; it refuses what
cannot be matched that way (backreferences, lookahead/lookbehind), so such a pattern
is rejected when the config is loaded, never discovered on a live input.

Syntax is Python's minus those features.  Differences a rule author may notice: ``\\d``,
``\\w``, ``\\s`` and ``\\b`` are ASCII-only (use ``\\p{Nd}``, ``\\p{L}``, ``[\\pL\\pN_]``
for Unicode), ``$`` matches only at the very end (not before a final newline), and
counted repetitions are limited to ``{1000}``.

Thread-safe: compiled patterns are immutable.  Only this module imports ``re2``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Protocol, cast

import re2

__all__ = [
    "Match",
    "Pattern",
    "PatternError",
    "check_pattern",
    "compile",
    "escape",
    "sanitize",
]

_SURROGATE = re.compile("[\ud800-\udfff]")  # a character class: linear on any input
_UNSUPPORTED_HINT = (
    "; patterns run on the linear-time RE2 engine, which has no backreferences "
    "and no lookahead/lookbehind ((?=, (?!, (?<=, (?<!)"
)


class PatternError(ValueError):
    """A pattern RE2 cannot compile; the message names the pattern and why."""


class Match(Protocol):
    def span(self, group: int = 0) -> tuple[int, int]: ...
    def start(self, group: int = 0) -> int: ...
    def end(self, group: int = 0) -> int: ...
    def group(self, group: int = 0) -> str: ...
    def groups(self) -> tuple[str | None, ...]: ...


class Pattern:
    """A compiled RE2 pattern with the ``re.Pattern`` calls this package uses.

    ``finditer`` is linear in ``len(text)`` over the whole iteration; ``search`` costs
    O(len(text)) per call whatever ``pos`` is (RE2 re-encodes the text), so scan with
    ``finditer`` rather than ``search`` in a loop.
    """

    __slots__ = ("_rx", "pattern")

    def __init__(self, pattern: str, *, ignore_case: bool = False) -> None:
        options = re2.Options()
        options.log_errors = False  # the error is raised (and reported) instead
        options.case_sensitive = not ignore_case
        try:
            self._rx = re2.compile(pattern, options)
        except re2.error as exc:
            raise PatternError(_describe(pattern, exc)) from None
        self.pattern = pattern

    @property
    def groups(self) -> int:
        return int(self._rx.groups)

    def search(self, text: str) -> Match | None:
        return cast("Match | None", self._rx.search(sanitize(text)))

    def fullmatch(self, text: str) -> Match | None:
        return cast("Match | None", self._rx.fullmatch(sanitize(text)))

    def finditer(self, text: str) -> Iterator[Match]:
        return cast("Iterator[Match]", self._rx.finditer(sanitize(text)))


def compile(pattern: str, *, ignore_case: bool = False) -> Pattern:
    """Compile ``pattern`` with RE2; :class:`PatternError` if RE2 cannot."""
    return Pattern(pattern, ignore_case=ignore_case)


def check_pattern(key: str, pattern: str) -> None:
    """Config-load check of a pattern that will see job input: it must compile on RE2.
    Raises ``ValueError`` naming the config ``key`` (pydantic reports it as that key)."""
    try:
        compile(pattern)
    except PatternError as exc:
        raise ValueError(f"{key}: {exc}") from None


def escape(text: str) -> str:
    """``text`` as an RE2 pattern that matches it literally."""
    return str(re2.escape(sanitize(text)))


def sanitize(text: str) -> str:
    """``text`` with lone surrogates (which UTF-8 cannot encode) replaced by U+FFFD.

    Same length, so offsets into the result are offsets into ``text``.
    """
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


def _describe(pattern: str, exc: Exception) -> str:
    arg = exc.args[0] if exc.args else exc
    reason = arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)
    message = f"{pattern!r} is not a valid RE2 pattern: {reason}"
    try:
        re.compile(pattern)
    except re.error:
        return message
    return message + _UNSUPPORTED_HINT  # valid for Python's re: a feature RE2 lacks
