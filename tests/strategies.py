"""Hypothesis strategies shared by the property tests."""

from __future__ import annotations

import json

from hypothesis import strategies as st

from edgeagent.backends.base import Prediction

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=12,
)

job_like = st.fixed_dictionaries(
    {},
    optional={
        "v": st.sampled_from([1, 2, 0, "1", None, True]),
        "id": st.text(max_size=140) | st.integers(),
        "input": st.text(max_size=200) | json_values,
        "params": json_values,
        "deadline_ms": st.integers(min_value=-5, max_value=10**9) | st.text(max_size=5),
        "escalate": st.sampled_from(["auto", "never", "always", "maybe", 3]),
        "reply_to": st.text(max_size=40) | st.integers(),
    },
)

payloads = (
    st.binary(max_size=300)
    | json_values.map(lambda v: json.dumps(v).encode())
    | job_like.map(lambda v: json.dumps(v).encode())
)

predictions = st.builds(
    Prediction,
    output=st.none() | st.just({"label": "a"}),
    confidence=st.floats(min_value=0.0, max_value=1.0),
    reason=st.none() | st.sampled_from(["out_of_scope", "schema_invalid", "low_confidence"]),
)

# -- hostile payloads (issue 9): what an attacker or a broken producer can publish ---------

# Any code point, lone surrogates (category Cs) included: json.dumps writes them as "\ud800".
lone_surrogates = st.integers(min_value=0xD800, max_value=0xDFFF).map(chr)
any_text = st.text(
    st.characters(exclude_categories=()) | lone_surrogates | st.sampled_from('ab \\"\x00é'),
    max_size=60,
)
hostile_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats()  # NaN and infinities included: json.dumps writes NaN / Infinity
    | any_text
)
hostile_values = st.recursive(
    hostile_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4)
    ),
    max_leaves=16,
)


def _nest(depth: int, kind: str) -> bytes:
    if kind == "array":
        inner = b"[" * depth + b"]" * depth
    else:
        inner = b'{"a":' * depth + b"1" + b"}" * depth
    return b'{"v":1,"input":{"x":' + inner + b"}}"


deep_payloads = st.builds(
    _nest, st.integers(min_value=1, max_value=5000), st.sampled_from(["array", "object"])
)
huge_numbers = st.one_of(
    st.integers(min_value=1, max_value=6000).map(lambda n: "9" * n),
    st.sampled_from(["1e400", "-1e400", "1e-400", "-0", "0.0e99999", "123456789e-999999"]),
).map(lambda num: b'{"v":1,"id":"n1","input":"x","params":{"n":' + num.encode() + b"}}")

printable_ids = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=8
)
hostile_jobs = st.fixed_dictionaries(
    {"input": any_text | hostile_values},
    optional={
        "v": st.sampled_from([1, 1, 1, 1.0, 2, "1", None]),
        "id": printable_ids | printable_ids | any_text,
        "params": st.dictionaries(any_text, hostile_values, max_size=4),
        "deadline_ms": st.integers(min_value=1, max_value=10**30)
        | st.integers(min_value=-(10**30), max_value=10**30),
        "escalate": st.sampled_from(["auto", "never", "always"]),
        "reply_to": any_text,
    },
)
"""Job-shaped objects, valid often enough to reach the journal with hostile content."""


def _encode(value: object, how: str) -> bytes:
    if how == "ascii":  # surrogates as \ud800 escapes, NaN/Infinity as bare words
        return json.dumps(value).encode()
    if how == "bom":
        return b"\xef\xbb\xbf" + json.dumps(value).encode()
    # raw UTF-8; a lone surrogate cannot be encoded, so it turns into invalid bytes instead
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _duplicate_key(value: dict[str, object]) -> bytes:
    body = json.dumps(value)
    return b'{"id":"dup-a",' + body[1:].encode() if body != "{}" else b'{"id":"a","id":"b"}'


hostile_payloads = st.one_of(
    st.binary(max_size=400),
    st.builds(_encode, hostile_jobs, st.sampled_from(["ascii", "utf8", "bom"])),
    st.builds(_encode, hostile_values, st.sampled_from(["ascii", "utf8"])),
    hostile_jobs.map(_duplicate_key),
    deep_payloads,
    huge_numbers,
    payloads,
)
"""Bytes as an MQTT PUBLISH may carry them: arbitrary bytes, arbitrary Unicode including lone
surrogates (escaped and raw), a BOM, duplicate keys, deep nesting and huge numbers."""
