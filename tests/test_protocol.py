"""The job parser: every input maps to a Job or a Rejection with a known code; nothing escapes."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent import protocol
from edgeagent.protocol import Job, Limits, Rejection, Topics, derive_job_id, parse_job
from tests.strategies import payloads

LIMITS = Limits(
    max_payload_bytes=4096, max_input_bytes=256, default_deadline_ms=1000, max_deadline_ms=60000
)
TASKS = frozenset({"intent"})


def parse(payload: bytes, task: str = "intent") -> Job | Rejection:
    return parse_job(payload, task=task, derived_id="d-x", limits=LIMITS, known_tasks=TASKS)


@settings(max_examples=500)
@given(payloads, st.sampled_from(["intent", "other"]))
def test_parser_never_raises_and_maps_every_invalid_input_to_a_code(
    payload: bytes, task: str
) -> None:
    out = parse(payload, task)
    if isinstance(out, Rejection):
        assert out.code in protocol.REJECTION_CODES
        assert out.message
        assert 1 <= len(out.id) <= 128
    else:
        assert isinstance(out, Job)
        assert out.task == "intent"
        assert 1 <= out.deadline_ms <= LIMITS.max_deadline_ms
        assert isinstance(out.input, (str, dict))


def test_valid_job_defaults() -> None:
    job = parse(b'{"v": 1, "id": "abc", "input": "hello"}')
    assert job == Job("abc", "intent", "hello", {}, 1000, "auto")


def test_missing_id_uses_derived_id_stable_across_redelivery() -> None:
    a = derive_job_id("t/jobs/x", b'{"input":"a"}', b"c1")
    assert a == derive_job_id("t/jobs/x", b'{"input":"a"}', b"c1")
    assert a != derive_job_id("t/jobs/x", b'{"input":"a"}', b"c2")
    job = parse_job(
        b'{"input": "a"}', task="intent", derived_id=a, limits=LIMITS, known_tasks=TASKS
    )
    assert isinstance(job, Job) and job.id == a


def test_codes_for_each_kind_of_bad_input() -> None:
    cases = {
        b"{": "not_json",
        b"NaN": "not_json",
        b'{"v": 1, "input": NaN}': "not_json",
        b'"text"': "not_an_object",
        b'{"v": 1, "input": ["a"]}': "invalid_field",
        b'{"v": 1, "input": "a", "id": ""}': "invalid_field",
        b'{"v": 1, "input": "a", "id": "has space"}': "invalid_field",
        b'{"v": 1, "input": "a", "deadline_ms": 0}': "invalid_field",
        b'{"v": 2, "input": "a"}': "unsupported_version",
        b'{"v": 1, "input": "' + b"x" * 300 + b'"}': "input_too_large",
        b"{" + b" " * 5000 + b"}": "too_large",
        b"[" * 100000: "too_large",
    }
    for payload, code in cases.items():
        out = parse(payload)
        assert isinstance(out, Rejection), payload[:40]
        assert out.code == code, (payload[:40], out)
    deep = b"[" * 3000 + b"]" * 3000
    out = parse_job(
        deep,
        task="intent",
        derived_id="d",
        known_tasks=TASKS,
        limits=Limits(10**6, 256, 1000, 60000),
    )
    assert isinstance(out, Rejection) and out.code in {"not_json", "not_an_object"}
    assert parse(b'{"v":1,"input":"a"}', task="nope").code == "unknown_task"  # type: ignore[union-attr]


def test_rejection_keeps_readable_job_id() -> None:
    out = parse(json.dumps({"v": 1, "id": "mine-1", "input": 5}).encode())
    assert isinstance(out, Rejection) and out.id == "mine-1"


def test_deadline_is_capped() -> None:
    job = parse(b'{"input": "a", "deadline_ms": 999999999}')
    assert isinstance(job, Job) and job.deadline_ms == LIMITS.max_deadline_ms


def test_topics_and_reply_allow_list() -> None:
    t = Topics("edgeagent", "pi-7", "fleet")
    assert t.jobs_filter == "edgeagent/pi-7/jobs/+"
    assert t.fleet_filter == "$share/fleet/edgeagent/fleet/jobs/+"
    assert t.task_of("edgeagent/pi-7/jobs/intent") == "intent"
    assert t.task_of("edgeagent/fleet/jobs/intent") == "intent"
    assert t.task_of("edgeagent/pi-8/jobs/intent") is None
    allowed = ["edgeagent/"]
    assert t.reply_allowed("edgeagent/app/results", allowed)
    for bad in (
        "other/x",
        "edgeagent/+/x",
        "edgeagent/#",
        "$SYS/x",
        "edgeagent/pi-7/jobs/intent",
        "edgeagent/pi-7/status",
        "edgeagent/cloud/requests/x",
        "",
    ):
        assert not t.reply_allowed(bad, allowed), bad
