"""JSON Schema → GBNF (pure).

Our grammars are never recursive (a schema is a finite tree), so each one can be
inlined into a Python regular expression: the tests check what a grammar accepts
with ``re.fullmatch``, and Hypothesis generates sentences of the grammar to check
that every one of them is valid JSON for the (bounded) schema.
"""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeagent.grammar import (
    SLACK,
    GrammarError,
    GrammarLimits,
    bounded_schema,
    choice_grammar,
    control_chars_in,
    overlong_numbers,
    schema_to_gbnf,
    value_spans,
)

_TOKEN = re.compile(
    r'(?P<lit>"(?:\\.|[^"\\])*")|(?P<cls>\[(?:\\.|[^\]\\])*\])|(?P<rep>\{\d+(?:,\d*)?\})'
    r"|(?P<name>[A-Za-z0-9-]+)|(?P<op>[()|?*+])|(?P<ws>\s+)"
)
_ESC = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\", "/": "/"}


def _unescape(body: str) -> str:
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
        elif body[i + 1] == "x":
            out.append(chr(int(body[i + 2 : i + 4], 16)))
            i += 4
        else:
            out.append(_ESC[body[i + 1]])
            i += 2
    return "".join(out)


def gbnf_regex(grammar: str) -> str:
    """Inline a non-recursive GBNF grammar into one Python regex (test helper)."""
    rules = {}
    for line in grammar.strip().splitlines():
        name, _, body = line.partition(" ::= ")
        rules[name.strip()] = body

    @cache
    def conv(name: str) -> str:
        out = []
        pos = 0
        body = rules[name]
        while pos < len(body):
            m = _TOKEN.match(body, pos)
            assert m, f"cannot tokenize {body[pos:]!r}"
            pos = m.end()
            kind = m.lastgroup
            text = m.group()
            if kind == "lit":
                out.append("(?:" + re.escape(_unescape(text[1:-1])) + ")")
            elif kind == "name":
                out.append("(?:" + conv(text) + ")")
            elif kind == "op" and text == "(":
                out.append("(?:")
            elif kind != "ws":
                out.append(text)
        return "".join(out)

    return conv("root")


def accepts(schema: dict[str, Any], text: str, limits: GrammarLimits | None = None) -> bool:
    return re.fullmatch(gbnf_regex(schema_to_gbnf(schema, limits)), text, re.DOTALL) is not None


PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": ["string", "null"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city"],
        },
    },
    "required": ["name", "age"],
}


# -- strings --------------------------------------------------------------------------------


def test_string_length_is_bounded_by_max_length() -> None:
    s = {"type": "string", "maxLength": 5}
    assert accepts(s, '"abcde"')
    assert accepts(s, '"abcdef"')  # the slack: a cut value is detected, not returned
    assert not jsonschema.Draft202012Validator(bounded_schema(s)).is_valid("abcdef")
    assert not accepts(s, '"abcdefg"')
    assert accepts({"type": "string", "minLength": 2, "maxLength": 3}, '"ab"')
    assert not accepts({"type": "string", "minLength": 2, "maxLength": 3}, '"a"')


def test_string_without_max_length_gets_the_default_cap() -> None:
    s = {"type": "string"}
    assert accepts(s, '"' + "x" * (64 + SLACK) + '"')
    assert not accepts(s, '"' + "x" * (65 + SLACK) + '"')
    assert not jsonschema.Draft202012Validator(bounded_schema(s)).is_valid("x" * 65)
    small = GrammarLimits(max_string_length=3)
    assert not accepts(s, '"abcde"', small)


def test_huge_max_length_is_capped() -> None:
    s = {"type": "string", "maxLength": 10**6}
    assert not accepts(s, '"' + "x" * (1025 + SLACK) + '"')


@pytest.mark.parametrize(
    "raw",
    ["\n", "\r", "\t", "\x00", "\x07", "\x1b", "\x7f", "\x85", "\u2028", "\u2029"],
)
def test_strings_exclude_raw_control_characters(raw: str) -> None:
    assert not accepts({"type": "string"}, f'"a{raw}b"')


@pytest.mark.parametrize("escape", ["\\n", "\\t", "\\u0000", "\\u001b", "\\b", "\\f", "\\r"])
def test_strings_exclude_escaped_control_characters(escape: str) -> None:
    assert not accepts({"type": "string"}, f'"a{escape}b"')


def test_strings_allow_quotes_backslashes_and_any_language() -> None:
    s = {"type": "string"}
    for text in ['"say \\"hi\\""', '"C:\\\\temp"', '"a\\/b"', '"東京 ✓ مرحبا 🙂"']:
        assert accepts(s, text), text
    assert not accepts(s, '"unterminated')
    assert not accepts(s, '"bare " quote"')
    assert not accepts(s, '"bad \\x escape"')


def test_escapes_count_as_one_character() -> None:
    assert accepts({"type": "string", "maxLength": 2}, '"\\"\\\\"')


# -- numbers, literals, enums -----------------------------------------------------------------


def test_integers_are_bounded_in_digits() -> None:
    s = {"type": "integer"}
    assert accepts(s, "0")
    assert accepts(s, "-12")
    assert accepts(s, "9" * 15)
    assert overlong_numbers(b"9" * 15) == []
    assert accepts(s, "9" * 16)  # the slack: a cut number is detected, not returned
    assert overlong_numbers(b"9" * 16) == ["9" * 16]
    assert not accepts(s, "9" * 17)
    assert not accepts(s, "012")
    assert not accepts(s, "1.5")
    assert not accepts(s, "1e5")
    assert not accepts(s, "NaN")


def test_non_negative_integers_have_no_sign() -> None:
    assert not accepts({"type": "integer", "minimum": 0}, "-1")
    assert accepts({"type": "integer", "minimum": 0}, "7")


def test_integer_digits_follow_minimum_and_maximum() -> None:
    s = {"type": "integer", "minimum": 1, "maximum": 1000}
    assert accepts(s, "1000")
    assert accepts(s, "10000")  # the slack: fails validation (maximum), never cut to 1000
    assert not jsonschema.Draft202012Validator(s).is_valid(10000)
    assert not accepts(s, "100000")
    assert not accepts({"type": "integer", "minimum": -5, "maximum": 5}, "-100")
    assert accepts({"type": "number", "minimum": 0, "maximum": 9.5}, "9.25")


def test_numbers_have_bounded_fractions_and_no_exponent() -> None:
    s = {"type": "number"}
    assert accepts(s, "3.25")
    assert accepts(s, "-0.5")
    assert accepts(s, "1.123456")
    assert overlong_numbers(b'{"x": 1.1234567}') == ["1.1234567"]
    assert not accepts(s, "1.12345678")
    assert not accepts(s, "1.")
    assert not accepts(s, "1e3")
    assert not accepts(s, "Infinity")


def test_enum_const_boolean_null() -> None:
    e = {"enum": ["red", "green", 3, None]}
    for ok in ('"red"', '"green"', "3", "null"):
        assert accepts(e, ok)
    assert not accepts(e, '"blue"')
    assert accepts({"const": "x"}, '"x"')
    assert not accepts({"const": "x"}, '"y"')
    assert accepts({"type": "boolean"}, "true")
    assert not accepts({"type": "boolean"}, '"true"')
    assert accepts({"type": "null"}, "null")


def test_enum_values_with_quotes_are_escaped() -> None:
    assert accepts({"enum": ['say "x"']}, '"say \\"x\\""')


# -- objects and arrays -----------------------------------------------------------------------


def test_object_required_optional_and_order() -> None:
    assert accepts(PERSON, '{"name": "Ann", "age": 3}')
    assert accepts(PERSON, '{"name":"Ann","age":3}')
    assert accepts(
        PERSON,
        '{"name": "Ann", "age": 3, "email": null, "tags": ["a", "b"], '
        '"address": {"city": "Rome", "zip": "00100"}}',
    )
    assert accepts(PERSON, '{"name": "Ann", "age": 3, "address": {"city": "Rome"}}')
    assert not accepts(PERSON, '{"age": 3}')  # name is required
    assert not accepts(PERSON, '{"name": "Ann"}')  # age is required
    assert not accepts(PERSON, '{"name": "Ann", "age": 3, "address": {}}')  # city required
    assert not accepts(PERSON, '{"name": "Ann", "age": 3, "extra": 1}')
    assert not accepts(PERSON, '{"age": 3, "name": "Ann"}')  # declared order only
    assert not accepts(PERSON, '{"name": "Ann", "age": 3}  ')  # nothing after the value
    assert not accepts(PERSON, '{"name":  "Ann", "age": 3}')  # at most one space


def test_object_with_only_optional_properties() -> None:
    s = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
    for ok in ("{}", '{"a": 1}', '{"b": 2}', '{"a": 1, "b": 2}'):
        assert accepts(s, ok), ok
    assert not accepts(s, '{, "b": 2}')
    assert not accepts(s, '{"a": 1,}')


def test_arrays_are_bounded() -> None:
    s = {"type": "array", "items": {"type": "integer"}}
    assert accepts(s, "[]")
    assert accepts(s, "[" + ", ".join(["1"] * 8) + "]")
    assert accepts(s, "[" + ", ".join(["1"] * 9) + "]")  # the slack: detected, not cut
    assert not jsonschema.Draft202012Validator(bounded_schema(s)).is_valid([1] * 9)
    assert not accepts(s, "[" + ", ".join(["1"] * 10) + "]")
    s2 = {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2}
    assert not accepts(s2, "[]")
    assert accepts(s2, "[1, 2]")
    assert not accepts(s2, "[1, 2, 3, 4]")


def test_union_types_and_any_of() -> None:
    s = {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 2}]}
    assert accepts(s, "12")
    assert accepts(s, '"ab"')
    assert accepts(s, '"abc"')  # the slack; bounded_schema rejects it
    assert not accepts(s, '"abcd"')


def test_a_leading_space_is_allowed() -> None:
    assert accepts({"type": "integer"}, " 5")
    assert not accepts({"type": "integer"}, "  5")


@pytest.mark.parametrize(
    "schema",
    [
        {},
        {"description": "no type"},
        {"type": "object", "properties": {"a": {}}},
        {"$ref": "#/$defs/x"},
        {"allOf": [{"type": "string"}]},
        {"type": "object", "patternProperties": {"^a": {"type": "string"}}},
        {"type": "array"},
        {"type": "array", "prefixItems": [{"type": "string"}], "items": {"type": "string"}},
        {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]},
        {"type": "string", "minLength": 2000},
        {"type": "unknown"},
        {"enum": []},
    ],
)
def test_unbounded_or_unsupported_schemas_are_refused(schema: dict[str, Any]) -> None:
    with pytest.raises(GrammarError):
        schema_to_gbnf(schema)


def test_choice_grammar_accepts_exactly_the_labels() -> None:
    rx = gbnf_regex(choice_grammar(["billing", "tech support", 'odd"one']))
    assert re.fullmatch(rx, "billing")
    assert re.fullmatch(rx, " tech support")
    assert re.fullmatch(rx, 'odd"one')
    assert not re.fullmatch(rx, "bill")
    assert not re.fullmatch(rx, "billing ")
    with pytest.raises(GrammarError):
        choice_grammar([])


def test_rule_names_are_valid_gbnf() -> None:
    weird = {
        "type": "object",
        "properties": {"näme_1 $x": {"type": "string"}, "": {"type": "integer"}},
        "required": ["näme_1 $x", ""],
    }
    grammar = schema_to_gbnf(weird)
    for line in grammar.strip().splitlines():
        assert re.fullmatch(r"[a-z0-9-]+", line.split(" ::= ")[0])
    assert accepts(weird, '{"näme_1 $x": "v", "": 1}')


# -- bounded_schema, control_chars_in, value_spans ---------------------------------------------


def test_bounded_schema_writes_the_caps_in() -> None:
    b = bounded_schema(PERSON)
    assert b["additionalProperties"] is False
    assert b["properties"]["name"]["maxLength"] == 20
    assert b["properties"]["email"]["maxLength"] == 64
    assert b["properties"]["address"]["properties"]["city"]["maxLength"] == 64
    assert b["properties"]["address"]["additionalProperties"] is False
    assert b["properties"]["tags"]["maxItems"] == 3
    assert "maxLength" not in PERSON["properties"]["email"]  # the input is not modified
    v = jsonschema.Draft202012Validator(b)
    assert not v.is_valid({"name": "a", "age": 1, "email": "x" * 65})
    assert not v.is_valid({"name": "a", "age": 1, "other": 1})


def test_control_chars_in() -> None:
    assert control_chars_in({"a": "fine ✓", "b": [1, "ok"]}) == []
    assert control_chars_in({"a": "x\ny"}) == ["$.a"]
    assert control_chars_in({"a": ["ok", "\x00"]}) == ["$.a[1]"]
    assert control_chars_in({"k\x07": 1}) == ["$.<key>"]
    assert control_chars_in({"a": "\u2028"}) == ["$.a"]


def test_value_spans_cover_values_not_syntax() -> None:
    text = '{"name": "A \\"B\\"", "n": -1.5, "ok": true, "xs": ["a", 2], "o": {"k": null}}'
    raw = text.encode()
    got = [raw[a:b].decode() for a, b in value_spans(raw)]
    assert got == ['A \\"B\\""', "-1.5", "true", 'a"', "2", "null"]
    assert value_spans(b"") == []
    assert value_spans(b'{"unterminated') == []


# -- property: every sentence of the grammar is a valid, clean object ---------------------------

PROPERTY_SCHEMAS: list[dict[str, Any]] = [
    PERSON,
    {
        "type": "object",
        "properties": {
            "amount": {"type": "number"},
            "currency": {"enum": ["EUR", "USD"]},
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "maxLength": 8},
                        "qty": {"type": "integer"},
                    },
                    "required": ["sku"],
                },
                "maxItems": 2,
            },
            "paid": {"type": "boolean"},
        },
        "required": ["amount", "currency"],
    },
]


@pytest.mark.parametrize("schema", PROPERTY_SCHEMAS, ids=["person", "invoice"])
def test_every_grammar_sentence_is_valid(schema: dict[str, Any]) -> None:
    rx = gbnf_regex(schema_to_gbnf(schema, GrammarLimits(max_string_length=12)))
    validator = jsonschema.Draft202012Validator(
        bounded_schema(schema, GrammarLimits(max_string_length=12))
    )

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.from_regex(re.compile(rx, re.DOTALL), fullmatch=True))
    def check(text: str) -> None:
        obj = json.loads(text)
        # A sentence is valid, or it used the grammar's slack past a cap: then validation
        # (maxLength, maximum) or overlong_numbers catches it, never anything else.
        errors = list(validator.iter_errors(obj))
        bounds = ("maxLength", "maxItems", "maximum", "minimum")
        assert all(e.validator in bounds for e in errors), text
        if not errors and not overlong_numbers(text.encode()):
            assert validator.is_valid(obj)
        assert control_chars_in(obj) == []

    check()
