"""Is an extracted value *in* the input?  (pure; no model, no I/O)

An extraction model copies values out of the text.  A value that does not occur in the
text was invented (a few-shot example's value returned for an empty input), cut (a
40-digit number returned as its first 15 digits) or rewritten; none of them may leave
the device as a confident answer (issue 14).  :func:`ungrounded` lists the values of
an answer that should have been copied but cannot be found:

* a *string* is grounded when, with whitespace collapsed (and NFKC), it is a substring
  of the input treated the same way (``""`` always is).  Case counts: ``M-9`` is not
  in ``meter m-9`` (the model rewrote the id; the answer would be wrong), and it must
  not start or end inside a word of ASCII letters and digits (``M-9`` is not in
  ``EM-9``);
* a *number* (integer or number) is grounded when the input writes that number: a run
  of digits, optionally with a decimal point or comma and thousands separators
  (``1,200.5``, ``12,5``, ``-4.5``), compared as exact decimals, sign ignored
  (``64.20`` grounds ``64.2``; ``515105115076491`` is not grounded by a 40-digit run
  that starts with those digits).

Values with a closed set of spellings are never checked: a property with ``enum`` or
``const`` (a unit label need not be spelled as in the input), a string with a ``format``
(``date``: the model writes ``2026-01-13`` for ``13 Jan``), booleans and nulls.  A
schema node may say ``"x-grounded": false`` (or ``true``) for itself and everything
below it; otherwise the caller's default applies (``grounded`` of the llamacpp
backend's config, on by default).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

__all__ = ["GROUNDED_KEY", "Leaf", "leaves", "numbers_in", "ungrounded"]

GROUNDED_KEY = "x-grounded"
"""Schema keyword (ignored by JSON Schema validators) turning the check on or off."""

_DIGITS = re.compile(r"[0-9]+(?:[.,][0-9]+)*")


def _fold(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).split())


def _dec(text: str) -> Decimal | None:
    try:
        return abs(Decimal(text)).normalize()
    except InvalidOperation:
        return None


def numbers_in(text: str) -> set[Decimal]:
    """Every number the text writes (absolute values, normalised decimals), read in each
    plausible way: ``1,200.5`` -> 1200.5, 1 and 200.5; ``12,5`` -> 12.5, 12 and 5;
    ``2026.01.13`` -> 2026, 1 and 13.  A decimal is never split at its point (``64.2``
    does not ground 64)."""
    out: set[Decimal] = set()
    for m in _DIGITS.finditer(unicodedata.normalize("NFKC", text)):
        run = m.group(0)
        forms = {run.replace(",", "")}
        if run.count(",") == 1 and "." not in run:
            forms.add(run.replace(",", "."))
        for piece in run.split(","):
            forms.update(piece.split(".") if piece.count(".") > 1 else [piece])
        for form in forms:
            d = _dec(form)
            if d is not None:
                out.add(d)
    return out


def _word(c: str) -> bool:
    return c.isascii() and c.isalnum()


def _occurs(value: str, text: str) -> bool:
    """``value`` is in ``text`` and does not start or end inside a word: ``M-9`` is not in
    ``EM-9``, ``boil`` is not in ``boiler-2`` (ASCII letters and digits make words; other
    scripts, often written without spaces, are matched as plain substrings)."""
    if not value:
        return True
    start = text.find(value)
    while start >= 0:
        end = start + len(value)
        head_ok = start == 0 or not (_word(text[start - 1]) and _word(value[0]))
        tail_ok = end == len(text) or not (_word(text[end]) and _word(value[-1]))
        if head_ok and tail_ok:
            return True
        start = text.find(value, start + 1)
    return False


def _closed(node: dict[str, Any]) -> bool:
    """A value of this node has a fixed set of spellings (not copied from the text)."""
    return "enum" in node or "const" in node or "format" in node


@dataclass(frozen=True, slots=True)
class Leaf:
    """One string, number, boolean or null of an answer, in document order."""

    path: str
    value: Any
    copied: bool
    """The schema asks for it to be copied from the text (checked for grounding)."""
    grounded: bool
    """Found in the text (always True when not ``copied``)."""


def leaves(value: Any, schema: Any, text: str, *, default: bool = True) -> list[Leaf]:
    """Every scalar of ``value`` in document order (the order of its JSON text, so the
    n-th leaf is the n-th span of :func:`edgeagent.grammar.value_spans`), with whether
    ``schema`` asks for it to be copied from ``text`` and whether ``text`` contains it."""
    folded = _fold(text)
    numbers: set[Decimal] | None = None
    out: list[Leaf] = []

    def number_found(x: int | float) -> bool:
        nonlocal numbers
        if numbers is None:
            numbers = numbers_in(text)
        d = _dec(repr(x) if isinstance(x, float) else str(x))
        return d is not None and d in numbers

    def walk(v: Any, node: Any, path: str, on: bool) -> None:
        node = node if isinstance(node, dict) else {}
        flag = node.get(GROUNDED_KEY)
        on = flag if isinstance(flag, bool) else on
        for key in ("anyOf", "oneOf"):
            alts = node.get(key)
            if isinstance(alts, list):
                # The value is checked when no alternative gives it a fixed spelling.
                if any(isinstance(a, dict) and _closed(a) and _admits(a, v) for a in alts):
                    node, on = {}, False
                else:
                    typed = [a for a in alts if isinstance(a, dict) and _type_fits(a, v)]
                    walk(v, typed[0] if typed else {}, path, on)
                    return
        if isinstance(v, dict):
            props = node.get("properties") or {}
            for k, sub in v.items():
                walk(sub, props.get(k, {}), f"{path}.{k}", on)
        elif isinstance(v, list):
            for i, sub in enumerate(v):
                walk(sub, node.get("items", {}), f"{path}[{i}]", on)
        elif not on or _closed(node) or isinstance(v, bool) or v is None:
            out.append(Leaf(path, v, copied=False, grounded=True))
        elif isinstance(v, str):
            out.append(Leaf(path, v, copied=True, grounded=_occurs(_fold(v), folded)))
        elif isinstance(v, int | float):
            out.append(Leaf(path, v, copied=True, grounded=number_found(v)))

    walk(value, schema, "$", default)
    return out


def ungrounded(value: Any, schema: Any, text: str, *, default: bool = True) -> list[str]:
    """JSON paths (``$.device_id``, ``$.items[2]``) of the strings and numbers in ``value``
    that ``schema`` asks to be copied from ``text`` but that ``text`` does not contain.
    Empty when everything checked was found."""
    return [leaf.path for leaf in leaves(value, schema, text, default=default) if not leaf.grounded]


def _admits(node: dict[str, Any], v: Any) -> bool:
    if "const" in node:
        return bool(node["const"] == v)
    if "enum" in node:
        return v in node["enum"]
    return isinstance(v, str)  # a format: a string of a fixed shape


def _type_fits(node: dict[str, Any], v: Any) -> bool:
    kinds = node.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if isinstance(v, bool):
        return "boolean" in kinds
    if isinstance(v, str):
        return "string" in kinds
    if isinstance(v, int | float):
        return "number" in kinds or "integer" in kinds
    if isinstance(v, dict):
        return "object" in kinds or "properties" in node
    if isinstance(v, list):
        return "array" in kinds or "items" in node
    return v is None and "null" in kinds
