"""Issue 14, the model-free parts: one input normalisation for the cache key and the models,
inputs without content refused before any model runs, grounding of extracted values, and
unrecognized messages that say what failed."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from typing import Any

import pytest

from edgeagent.backends.base import Prediction
from edgeagent.config import TaskConfig
from edgeagent.grounding import numbers_in, ungrounded
from edgeagent.inputs import canonical_input, has_content, model_input
from edgeagent.metrics import Metrics
from edgeagent.pipeline import Outcome, PendingJob, TaskRuntime, unrecognized_message
from edgeagent.protocol import Job
from edgeagent.store import cache_key

READING: dict[str, Any] = {
    "type": "object",
    "properties": {
        "device_id": {"type": "string", "maxLength": 32},
        "value": {"type": "number"},
        "unit": {"type": "string", "enum": ["C", "F", "%", "bar"]},
    },
    "required": ["device_id", "value", "unit"],
}

# -- one normalisation --------------------------------------------------------------------------


def test_inputs_differing_only_in_whitespace_are_one_input() -> None:
    a = "2026-11-26 07:12:03  WARN\tsensor=boiler-2\n pressure 2.4 bar "
    b = "2026-11-26 07:12:03 WARN sensor=boiler-2 pressure 2.4 bar"
    assert model_input(a) == model_input(b) == b
    assert cache_key("t", "f", a) == cache_key("t", "f", b)
    # NFC: a decomposed accent is the same input as the composed one
    assert model_input("cafe\u0301") == model_input("caf\u00e9")


def test_objects_differing_only_in_key_order_are_one_input() -> None:
    a = {"b": 1, "a": {"y": [1, {"d": 2, "c": 3}], "x": " two  spaces "}}
    b = {"a": {"x": " two  spaces ", "y": [1, {"c": 3, "d": 2}]}, "b": 1}
    assert model_input(a) == model_input(b)
    assert list(model_input(a)) == ["a", "b"]  # type: ignore[arg-type]
    assert canonical_input(a) == canonical_input(b)
    assert cache_key("t", "f", a) == cache_key("t", "f", b)
    assert model_input(a)["a"]["x"] == " two  spaces "  # type: ignore[index]


def test_cache_keys_are_unchanged_by_the_refactoring() -> None:
    """The cache form is what store.normalise_input always produced (no cache flush)."""
    import hashlib
    import json
    import unicodedata

    def old(value: Any) -> str:
        if isinstance(value, str):
            return " ".join(unicodedata.normalize("NFC", value).split())
        return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))

    for v in ["  a\tb ", "caf\u0065\u0301", {"z": [1, {"b": 1, "a": "é"}], "a": None}]:
        assert canonical_input(v) == old(v)
        h = hashlib.sha256()
        for part in ("t", "f", old(v)):
            h.update(len(part.encode()).to_bytes(8, "big"))
            h.update(part.encode())
        assert cache_key("t", "f", v) == h.hexdigest()


@pytest.mark.parametrize(
    "text",
    ["", " " * 5000, "\n\t \u3000\u00a0", "!!! ... ---", "\x00\x01\x1b\x7f", "🙂🙂", "  - | -"],
)
def test_inputs_without_a_letter_or_digit_have_no_content(text: str) -> None:
    assert not has_content(text)


@pytest.mark.parametrize("value", ["a", " 7 ", "東京", "محمد", "x\x00", {"k": 3}, {"k": ["", "z"]}])
def test_inputs_with_a_letter_or_digit_have_content(value: Any) -> None:
    assert has_content(value)


def test_object_keys_alone_are_no_content() -> None:
    assert not has_content({"text": "   ", "other": None, "list": []})


# -- grounding --------------------------------------------------------------------------------


def test_a_few_shot_example_returned_for_blank_input_is_ungrounded() -> None:
    answer = {"device_id": "freezer2", "value": -4.5, "unit": "F"}
    assert ungrounded(answer, READING, " " * 5000) == ["$.device_id", "$.value"]


def test_copied_values_are_grounded_whatever_their_spacing_and_zeros() -> None:
    text = "freezer2 | cabinet  temp | -4.50 F | ok"
    assert ungrounded({"device_id": "freezer2", "value": -4.5, "unit": "F"}, READING, text) == []
    answer = {"device_id": "cabinet temp", "value": 4.5, "unit": "F"}
    assert ungrounded(answer, READING, text) == []
    # a part of a word is not a copy of it
    answer = {"device_id": "reezer2", "value": -4.5, "unit": "F"}
    assert ungrounded(answer, READING, text) == ["$.device_id"]
    answer = {"device_id": "freezer", "value": -4.5, "unit": "F"}
    assert ungrounded(answer, READING, text) == ["$.device_id"]
    assert ungrounded({"device_id": "東京"}, READING, "東京の気温") == []
    # a rewritten id is not the input's: case counts
    answer = {"device_id": "Freezer2", "value": -4.5, "unit": "F"}
    assert ungrounded(answer, READING, text) == ["$.device_id"]
    # the enum value need not be spelled as in the input
    assert ungrounded({"device_id": "freezer2", "value": 4.5, "unit": "C"}, READING, text) == []


def test_a_cut_number_is_ungrounded() -> None:
    text = "meter m-1 total 5151051150743212341510857649112006441011 C"
    answer = {"device_id": "m-1", "value": 515105115076491, "unit": "C"}
    assert ungrounded(answer, READING, text) == ["$.value"]
    answer["value"] = 5151051150743212341510857649112006441011
    assert ungrounded(answer, READING, text) == []


def test_a_decimal_is_not_grounded_by_its_integer_part() -> None:
    assert ungrounded({"device_id": "a", "value": 64, "unit": "C"}, READING, "a 64.2 C") == [
        "$.value"
    ]


def test_numbers_in_reads_separators_both_ways() -> None:
    got = numbers_in("1,200.5 kW, 12,5 bar on 2026.01.13")
    for want in ("1200.5", "12.5", "2026", "1", "13", "200.5"):
        assert Decimal(want) in got, want


def test_grounding_can_be_switched_off_per_node_and_by_default() -> None:
    schema = {
        "type": "object",
        "properties": {
            "summary": {"type": "string", "x-grounded": False},
            "tags": {"type": "array", "items": {"type": "string"}},
            "when": {"type": "string", "format": "date"},
            "ok": {"type": "boolean"},
            "maybe": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
    }
    answer = {"summary": "made up", "tags": ["seen", "unseen"], "when": "2026-01-13"}
    answer |= {"ok": True, "maybe": "nope"}
    assert ungrounded(answer, schema, "seen on 13 Jan") == ["$.tags[1]", "$.maybe"]
    assert ungrounded(answer, schema, "seen on 13 Jan", default=False) == []


# -- the pipeline: normalised model input, no-content refusal, messages -----------------------

TASK = TaskConfig.model_validate(
    {"kind": "classify", "backend": {"type": "rules", "rules": [{"label": "x", "keywords": ["x"]}]}}
)


class Recorder:
    model_id = "rec@1"
    fingerprint = "r1"

    def __init__(self) -> None:
        self.inputs: list[Any] = []

    def load(self) -> None: ...
    def warmup(self) -> None: ...
    def close(self) -> None: ...

    def infer_batch(self, inputs: list[Any]) -> list[Prediction]:
        self.inputs.extend(inputs)
        return [Prediction({"seen": str(x)}, 0.9) for x in inputs]


def run_jobs(inputs: list[Any]) -> tuple[Recorder, list[Outcome]]:
    backend = Recorder()

    async def main() -> list[Outcome]:
        rt = TaskRuntime("t", TASK, backend, Metrics())  # type: ignore[arg-type]
        got: list[Outcome] = []
        done = asyncio.Event()

        def deliver(outcomes: list[Outcome]) -> None:
            got.extend(outcomes)
            if len(got) >= len(inputs):
                done.set()

        rt.start(deliver)
        for i, value in enumerate(inputs):
            rt.queue.put_nowait(
                PendingJob(Job(f"j{i}", "t", value, {}, 10_000, "auto"), time.time())
            )
        await asyncio.wait_for(done.wait(), 10)
        await rt.stop()
        rt.close()
        return got

    return backend, asyncio.run(main())


def test_the_model_sees_the_input_the_cache_key_hashes() -> None:
    a, b = "boiler-2  pressure\n2.4 bar", " boiler-2 pressure 2.4\tbar"
    backend, outcomes = run_jobs([a, b, {"z": 1, "a": 2}])
    assert backend.inputs[0] == backend.inputs[1] == "boiler-2 pressure 2.4 bar"
    assert list(backend.inputs[2]) == ["a", "z"]
    by_id = {o.pending.job.id: o.result for o in outcomes}
    assert by_id["j0"].output == by_id["j1"].output


def test_inputs_without_content_never_reach_the_model() -> None:
    backend, outcomes = run_jobs(["", " " * 5000, "--- !!!", "real text"])
    assert backend.inputs == ["real text"]
    by_id = {o.pending.job.id: o.result for o in outcomes}
    for i in range(3):
        res = by_id[f"j{i}"]
        assert res.status == "unrecognized"
        assert res.error is not None and res.error.code == "out_of_scope"
        assert "no letter or digit" in res.error.message
    assert by_id["j3"].status == "ok"


def test_unrecognized_messages_say_what_failed() -> None:
    long = Prediction(
        None,
        0.0,
        reason="schema_invalid",
        details={"failure": "input_too_long", "prompt_tokens": 3012, "limit": 960},
    )
    msg = unrecognized_message("schema_invalid", long)
    assert "too long" in msg and "3012" in msg and "960" in msg
    assert "schema-valid" not in msg
    field = Prediction(
        None,
        0.0,
        reason="schema_invalid",
        details={"failure": "schema", "fields": ["$.toloc.city_name"], "message": "not a string"},
    )
    msg = unrecognized_message("schema_invalid", field)
    assert "$.toloc.city_name" in msg and "not a string" in msg
    assert unrecognized_message("low_confidence", Prediction(None, 0.0)).startswith("the local")
    invented = Prediction(
        None, 0.0, reason="low_confidence", details={"failure": "ungrounded", "fields": ["$.id"]}
    )
    assert "not in the input ($.id)" in unrecognized_message("low_confidence", invented)
