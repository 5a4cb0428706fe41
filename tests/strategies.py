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
