"""JSON Schema → bounded GBNF grammar for constrained decoding (pure; no llama_cpp import).

The grammar is deliberately *stricter* than the schema so that every string it
accepts is finite and safe to hand to the rest of the daemon:

* every string is bounded: ``maxLength`` from the schema, else a default cap;
  its characters exclude ``"``, ``\\`` and every control character (C0, DEL,
  C1, U+2028/U+2029); the only escapes are ``\\"``, ``\\\\`` and ``\\/``, so a
  decoded string never contains a control character either;
* every number is bounded in digits, no exponent;
* strings, numbers and arrays may run :data:`SLACK` past their cap, so that a value the cap
  would have cut is *detected* (validation fails) rather than returned shortened;
* every array is bounded (``maxItems`` or a default cap);
* objects contain only the declared properties, in declared order, every
  required one present;
* whitespace is at most one space after ``:`` and ``,`` (``json.dumps`` style).

Keywords the grammar cannot express (``pattern``, ``minimum``, ``uniqueItems``,
``minProperties`` …) are left to the JSON Schema validation every output goes
through anyway.  Keywords that would make the grammar unbounded or that we do
not understand (``$ref``, ``allOf``, ``patternProperties``, ``prefixItems``,
``not``, ``if``) raise :class:`GrammarError`: a task must fail at start-up, not
produce answers we cannot check.

:func:`bounded_schema` returns the schema with the same default caps written
in, so validation enforces exactly the bounds the grammar enforces.
"""

from __future__ import annotations

import copy
import json
import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "GrammarError",
    "GrammarLimits",
    "bounded_schema",
    "choice_grammar",
    "control_chars_in",
    "overlong_numbers",
    "schema_to_gbnf",
    "value_spans",
]

# Characters a generated string may not contain (raw): quote, backslash, C0
# controls, DEL, C1 controls and the two Unicode line/paragraph separators.
_STRING_CHAR = r'[^"\\\x00-\x1F\x7F-\x9F\u2028\u2029]'
_ESCAPE = r'"\\" ["\\/]'

_UNSUPPORTED = (
    "$ref",
    "$defs",
    "definitions",
    "allOf",
    "not",
    "if",
    "then",
    "else",
    "patternProperties",
    "prefixItems",
    "dependentSchemas",
    "dependentRequired",
    "unevaluatedProperties",
    "unevaluatedItems",
    "contains",
    "propertyNames",
)

_DATE = '[0-9]{4} "-" [0-1] [0-9] "-" [0-3] [0-9]'
_TIME = (
    '[0-2] [0-9] ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{1,6})? '
    '("Z" | [+-] [0-2] [0-9] ":" [0-5] [0-9])'
)
# format -> GBNF body of the string contents (between the quotes); others are only validated
_FORMATS = {"date": _DATE, "time": _TIME, "date-time": f'{_DATE} "T" {_TIME}'}


class GrammarError(ValueError):
    """The schema cannot be turned into a bounded grammar; the message names the JSON path."""


@dataclass(frozen=True, slots=True)
class GrammarLimits:
    """Default caps for what the schema leaves unbounded."""

    max_string_length: int = 64
    """Characters in a string without ``maxLength``; also the ceiling for any ``maxLength``."""
    hard_string_length: int = 1024
    """No string may be longer than this, whatever the schema says."""
    max_array_items: int = 8
    """Items in an array without ``maxItems``."""
    hard_array_items: int = 64
    """No array may be longer than this, whatever the schema says."""
    max_integer_digits: int = 15
    """Digits before the decimal point."""
    max_fraction_digits: int = 6
    """Digits after the decimal point (``number`` only)."""


SLACK = 1
"""How far the grammar lets a string, number or array run past its cap (characters,
digits, items).

A value the grammar stopped at its bound may have been *cut* (a 40-digit number in the
input comes out as its first 15 digits): so the grammar admits ``SLACK`` more, and a
value that uses it fails validation (:func:`bounded_schema` for strings and bounded
integers, :func:`overlong_numbers` for digit caps) instead of passing as a different,
valid value (an array cut at ``maxItems``: validation, ``maxItems``)."""


def _lit(text: str) -> str:
    """A GBNF string literal matching exactly ``text``."""
    out = []
    for ch in text:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\x{o:02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _json_lit(value: Any) -> str:
    return _lit(json.dumps(value, ensure_ascii=False))


def _rep(item: str, lo: int, hi: int) -> str:
    """``item`` repeated lo..hi times (GBNF bounded repetition)."""
    if hi <= 0:
        return ""
    if lo == hi:
        return f"{item}{{{lo}}}"
    return f"{item}{{{lo},{hi}}}"


class _Builder:
    def __init__(self, limits: GrammarLimits) -> None:
        self.limits = limits
        self.rules: dict[str, str] = {}
        self._by_body: dict[str, str] = {}

    def rule(self, hint: str, body: str) -> str:
        """Add a rule (re-using an identical one) and return its name."""
        if body in self._by_body:
            return self._by_body[body]
        base = re.sub(r"[^A-Za-z0-9]+", "-", hint).strip("-").lower() or "r"
        name = base
        n = 1
        while name in self.rules or name == "root":
            n += 1
            name = f"{base}-{n}"
        self.rules[name] = body
        self._by_body[body] = name
        return name

    # -- values -------------------------------------------------------------------------

    def value(self, schema: Any, path: str) -> str:
        if schema is True or schema == {}:
            raise GrammarError(f"{path}: an unconstrained value cannot be bounded; give a type")
        if not isinstance(schema, dict):
            raise GrammarError(f"{path}: a schema must be an object")
        for key in _UNSUPPORTED:
            if key in schema:
                raise GrammarError(f"{path}: keyword {key!r} is not supported")
        if "const" in schema:
            return self.rule(path + "-const", _json_lit(schema["const"]))
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise GrammarError(f"{path}: enum must be a non-empty list")
            return self.rule(path + "-enum", " | ".join(_json_lit(v) for v in values))
        for key in ("anyOf", "oneOf"):
            if key in schema:
                subs = schema[key]
                if not isinstance(subs, list) or not subs:
                    raise GrammarError(f"{path}: {key} must be a non-empty list")
                alts = [self.value(s, f"{path}-{i}") for i, s in enumerate(subs)]
                return self.rule(path + "-alt", " | ".join(alts))
        types = schema.get("type")
        if types is None:
            if "properties" in schema:
                types = "object"
            elif "items" in schema:
                types = "array"
            else:
                raise GrammarError(f"{path}: no type, enum or const; cannot bound the value")
        if isinstance(types, list):
            if not types:
                raise GrammarError(f"{path}: empty type list")
            alts = [self.typed(schema, str(t), f"{path}-{t}") for t in types]
            return self.rule(path + "-types", " | ".join(alts))
        return self.typed(schema, str(types), path)

    def typed(self, schema: dict[str, Any], kind: str, path: str) -> str:
        if kind == "string":
            return self.string(schema, path)
        if kind == "integer":
            return self.rule(
                "integer" if schema.get("minimum", -1) < 0 else "natural", self._int_body(schema)
            )
        if kind == "number":
            frac = _rep("[0-9]", 1, self.limits.max_fraction_digits + SLACK)
            return self.rule(
                "number" if schema.get("minimum", -1) < 0 else "nonneg-number",
                f'{self._int_body(schema)} ("." {frac})?',
            )
        if kind == "boolean":
            return self.rule("boolean", '"true" | "false"')
        if kind == "null":
            return self.rule("null", '"null"')
        if kind == "array":
            return self.array(schema, path)
        if kind == "object":
            return self.object(schema, path)
        raise GrammarError(f"{path}: unknown type {kind!r}")

    def _int_body(self, schema: dict[str, Any]) -> str:
        digits = self.limits.max_integer_digits
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if isinstance(lo, int | float) and isinstance(hi, int | float):
            # Both bounds known: no more digits than the larger magnitude needs.
            digits = min(digits, len(str(int(max(abs(lo), abs(hi))))))
        digits += SLACK  # a value using the slack fails validation (see SLACK)
        tail = _rep("[0-9]", 0, digits - 1)
        sign = "" if schema.get("minimum", -1) >= 0 else '"-"? '
        return f'{sign}("0" | [1-9] {tail})' if tail else f"{sign}[0-9]"

    def string(self, schema: dict[str, Any], path: str) -> str:
        fmt = schema.get("format")
        if isinstance(fmt, str) and fmt in _FORMATS:
            return self.rule(f"string-{fmt}", f'"\\"" {_FORMATS[fmt]} "\\""')
        lo, hi = _string_bounds(schema, self.limits, path)
        hi += SLACK  # a string using the slack fails validation (maxLength; see SLACK)
        char = self.rule("char", f"{_STRING_CHAR} | {_ESCAPE}")
        return self.rule(
            f"string-{lo}-{hi}", f'"\\"" {_rep(char, lo, hi)} "\\""'.replace("  ", " ")
        )

    def array(self, schema: dict[str, Any], path: str) -> str:
        items = schema.get("items")
        if items is None or items is True:
            raise GrammarError(f"{path}: an array needs an 'items' schema")
        lo, hi = _array_bounds(schema, self.limits, path)
        hi += SLACK  # an array using the slack fails validation (maxItems; see SLACK)
        item = self.value(items, path + "-item")
        if hi == 0:
            return self.rule(path + "-array", '"[]"')
        more = _rep(f'("," " "? {item})', max(lo - 1, 0), hi - 1)
        inner = f"{item} {more}".strip()
        body = f'"[" {inner} "]"' if lo >= 1 else f'"[" ({inner})? "]"'
        return self.rule(path + "-array", body)

    def object(self, schema: dict[str, Any], path: str) -> str:
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise GrammarError(f"{path}: properties must be an object")
        required = schema.get("required", [])
        if not isinstance(required, list):
            raise GrammarError(f"{path}: required must be a list")
        missing = [r for r in required if r not in props]
        if missing:
            raise GrammarError(
                f"{path}: required {missing} not declared in properties "
                "(undeclared properties are never generated)"
            )
        names = list(props)
        if not names:
            return self.rule("empty-object", '"{}"')
        kvs = [
            f'{_lit(json.dumps(n, ensure_ascii=False))} ":" " "? '
            f"{self.value(props[n], f'{path}-{n}')}"
            for n in names
        ]
        req = [n in required for n in names]
        # rest[i]: properties i.. after at least one was written (each needs a comma);
        # first[i]: properties i.. when none was written yet.  Linear in the property count.
        rest = [""] * (len(names) + 1)
        first = [""] * (len(names) + 1)
        for i in range(len(names) - 1, -1, -1):
            tail = f" {rest[i + 1]}" if rest[i + 1] else ""
            kv = f'"," " "? {kvs[i]}'
            if i > 0:  # rest[0] would never be referenced
                body = f"{kv}{tail}" if req[i] else f"({kv})?{tail}"
                rest[i] = self.rule(f"{path}-rest-{i}", body)
            head = f"{kvs[i]}{tail}"
            if req[i]:
                first[i] = self.rule(f"{path}-first-{i}", head)
            elif first[i + 1]:
                first[i] = self.rule(f"{path}-first-{i}", f"{head} | {first[i + 1]}")
            else:
                first[i] = self.rule(f"{path}-first-{i}", f"({head})?")
        return self.rule(path + "-object", f'"{{" {first[0]} "}}"')


def _string_bounds(schema: dict[str, Any], limits: GrammarLimits, path: str) -> tuple[int, int]:
    hi = schema.get("maxLength", limits.max_string_length)
    lo = schema.get("minLength", 0)
    if not isinstance(hi, int) or not isinstance(lo, int) or lo < 0 or hi < 0:
        raise GrammarError(f"{path}: minLength/maxLength must be non-negative integers")
    hi = min(hi, limits.hard_string_length)
    if lo > hi:
        raise GrammarError(f"{path}: minLength {lo} exceeds the length cap {hi}")
    return lo, hi


def _array_bounds(schema: dict[str, Any], limits: GrammarLimits, path: str) -> tuple[int, int]:
    hi = schema.get("maxItems", limits.max_array_items)
    lo = schema.get("minItems", 0)
    if not isinstance(hi, int) or not isinstance(lo, int) or lo < 0 or hi < 0:
        raise GrammarError(f"{path}: minItems/maxItems must be non-negative integers")
    hi = min(hi, limits.hard_array_items)
    if lo > hi:
        raise GrammarError(f"{path}: minItems {lo} exceeds the item cap {hi}")
    return lo, hi


def _render(builder: _Builder, root_body: str) -> str:
    lines = [f"root ::= {root_body}"]
    lines += [f"{name} ::= {body}" for name, body in builder.rules.items()]
    return "\n".join(lines) + "\n"


def schema_to_gbnf(schema: dict[str, Any], limits: GrammarLimits | None = None) -> str:
    """A GBNF grammar (root rule ``root``) whose every sentence is valid-shaped JSON for
    ``schema`` and bounded in length.  An optional single leading space is allowed
    (completion prompts ending in ``Output:``).  Raises :class:`GrammarError`."""
    builder = _Builder(limits or GrammarLimits())
    value = builder.value(schema, "root")
    return _render(builder, f'" "? {value}')


def choice_grammar(options: Sequence[str]) -> str:
    """A grammar accepting exactly one of ``options`` (plain text, no quotes), optionally
    after one leading space: used to constrain classification to the label set."""
    if not options:
        raise GrammarError("a choice needs at least one option")
    return f'root ::= " "? ({" | ".join(_lit(o) for o in options)})\n'


def bounded_schema(schema: dict[str, Any], limits: GrammarLimits | None = None) -> dict[str, Any]:
    """A copy of ``schema`` with the grammar's caps written in (``maxLength`` on every
    string, ``maxItems`` on every array, ``additionalProperties: false`` on every object),
    so validating against it enforces exactly what the grammar enforces."""
    lim = limits or GrammarLimits()
    out = copy.deepcopy(schema)
    for node in _nodes(out):
        kinds = node.get("type")
        kinds = kinds if isinstance(kinds, list) else [kinds]
        if "string" in kinds and "format" not in node:
            node["maxLength"] = min(
                node.get("maxLength", lim.max_string_length), lim.hard_string_length
            )
        if "array" in kinds or ("items" in node and node.get("type") is None):
            node["maxItems"] = min(node.get("maxItems", lim.max_array_items), lim.hard_array_items)
        if "object" in kinds or ("properties" in node and node.get("type") is None):
            node["additionalProperties"] = False
    return out


_NUMBER = re.compile(rb"-?([0-9]+)(?:\.([0-9]+))?(?:[eE][+-]?[0-9]+)?")


def overlong_numbers(text: bytes, limits: GrammarLimits | None = None) -> list[str]:
    """The number literals of a JSON document with more integer or fraction digits than
    ``limits`` allow: values the grammar's :data:`SLACK` let through because the model
    wanted to write more digits than the cap (the input holds a longer number).  Empty
    when every number fits."""
    lim = limits or GrammarLimits()
    out: list[str] = []
    for start, end in value_spans(text):
        m = _NUMBER.fullmatch(text[start:end])
        if m is None:
            continue
        whole, frac = m.group(1), m.group(2) or b""
        if len(whole) > lim.max_integer_digits or len(frac) > lim.max_fraction_digits:
            out.append(m.group(0).decode("ascii"))
    return out


def _nodes(schema: Any) -> Iterator[dict[str, Any]]:
    if not isinstance(schema, dict):
        return
    yield schema
    for sub in (schema.get("properties") or {}).values():
        yield from _nodes(sub)
    if isinstance(schema.get("items"), dict):
        yield from _nodes(schema["items"])
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or []:
            yield from _nodes(sub)


def control_chars_in(value: Any) -> list[str]:
    """The JSON paths of strings (keys included) in ``value`` that contain a control
    character (Unicode category Cc, or U+2028/U+2029).  Empty when clean."""
    bad: list[str] = []

    def dirty(s: str) -> bool:
        return any(unicodedata.category(c) == "Cc" or c in "\u2028\u2029" for c in s)

    def walk(v: Any, path: str) -> None:
        if isinstance(v, str):
            if dirty(v):
                bad.append(path)
        elif isinstance(v, dict):
            for k, sub in v.items():
                if dirty(str(k)):
                    bad.append(f"{path}.<key>")
                walk(sub, f"{path}.{k}")
        elif isinstance(v, list):
            for i, sub in enumerate(v):
                walk(sub, f"{path}[{i}]")

    walk(value, "$")
    return bad


def value_spans(text: bytes) -> list[tuple[int, int]]:
    """Byte ranges ``[start, end)`` of the *values* in a compact JSON document: the
    contents and closing quote of value strings, and number/true/false/null literals.
    Keys, braces, brackets, colons, commas and whitespace are not values.  Used to
    score confidence on what the model chose, not on syntax the grammar forced.
    Tolerates malformed input (returns what it found)."""
    spans: list[tuple[int, int]] = []
    # stack of containers: b"{" or b"["; in an object, expect_key tracks key/value position
    stack: list[int] = []
    expect_key = False
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c in b" \t\r\n,":
            if c == ord(",") and stack and stack[-1] == ord("{"):
                expect_key = True
            i += 1
        elif c == ord(":"):
            expect_key = False
            i += 1
        elif c in b"{[":
            stack.append(c)
            expect_key = c == ord("{")
            i += 1
        elif c in b"}]":
            if stack:
                stack.pop()
            expect_key = False
            i += 1
        elif c == ord('"'):
            j = i + 1
            while j < n and text[j] != ord('"'):
                j += 2 if text[j] == ord("\\") else 1
            end = min(j + 1, n)
            if not expect_key:
                spans.append((i + 1, end))
            i = end
        else:
            j = i
            while j < n and text[j] not in b' \t\r\n,:{}[]"':
                j += 1
            spans.append((i, j))
            i = j
    return spans
