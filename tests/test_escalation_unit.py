"""The escalator at its seam: a fake ledger (its own rows and requests), a fake journal
to read from, a task runtime reduced to what the escalator reads, and a clock passed in.

It decides and returns: a result for the job now (or None: the job waits), and, for a
reply or a deadline, :class:`~edgeagent.results.Actions` the pipeline commits.  These
tests check every outcome: reply ok, reply invalid, late reply, deadline (local answer or
``expired``), re-sends, budget exceeded, cloud unavailable, waiting, provisional, audit.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest

from edgeagent.backends.base import Prediction
from edgeagent.config import CloudConfig, TaskConfig
from edgeagent.escalation import Escalator
from edgeagent.metrics import Metrics
from edgeagent.pipeline import Outcome, PendingJob
from edgeagent.protocol import ErrorInfo, Job, ResultMessage, Topics
from edgeagent.results import Actions, build
from edgeagent.store import EscalationRow

LABELS = ["lights_on", "lights_off", "oos"]
T0 = 1_000_000.0  # the fake clock's start (seconds since the epoch)


class FakeBook:
    """The escalator's ledger (writes) and the journal it reads, in memory."""

    def __init__(self) -> None:
        self.rows: dict[str, EscalationRow] = {}
        self.jobs: dict[str, tuple[Job, float]] = {}
        self.requests: list[tuple[str, dict[str, Any], bytes | None, str | None]] = []
        self.sent: list[tuple[str, float]] = []

    # Ledger
    def add_escalation(self, row: EscalationRow) -> None:
        self.rows[row.id] = row

    def escalation_sent(self, esc_id: str, *, next_attempt_at: float) -> None:
        self.sent.append((esc_id, next_attempt_at))
        row = self.rows[esc_id]
        self.rows[esc_id] = replace(row, attempts=row.attempts + 1, next_attempt_at=next_attempt_at)

    def close_escalation(self, esc_id: str, state: str) -> bool:
        row = self.rows[esc_id]
        if row.state != "pending":
            return False
        self.rows[esc_id] = replace(row, state=state)
        return True

    def enqueue(
        self,
        topic: str,
        payload: bytes,
        correlation: bytes | None = None,
        response_topic: str | None = None,
    ) -> None:
        self.requests.append((topic, json.loads(payload), correlation, response_topic))

    # the journal reads
    def escalation(self, esc_id: str) -> EscalationRow | None:
        return self.rows.get(esc_id)

    def pending_escalations(self) -> list[EscalationRow]:
        return [r for r in self.rows.values() if r.state == "pending"]

    def job(self, job_id: str) -> Job | None:
        return self.jobs[job_id][0] if job_id in self.jobs else None

    def received_at(self, job_id: str) -> float | None:
        return self.jobs[job_id][1] if job_id in self.jobs else None


def task(**kw: Any) -> Any:
    cfg = TaskConfig.model_validate(
        {
            "kind": "classify",
            "labels": LABELS,
            "backend": {"type": "rules", "rules": [{"label": "lights_on", "keywords": ["on"]}]},
            **kw,
        }
    )
    return SimpleNamespace(
        name="intent",
        config=cfg,
        labels=LABELS,
        fingerprint="fp1",
        backend=SimpleNamespace(model_id="m@1"),
    )


def escalator(rt: Any, **cloud: Any) -> Escalator:
    esc = Escalator(
        CloudConfig(enabled=True, **cloud),
        Topics("edgeagent", "dev"),
        "dev",
        Metrics(),
        rng=random.Random(7),
    )
    esc.configure({rt.name: rt.config})
    return esc


def outcome(
    book: FakeBook,
    *,
    label: str | None = "lights_on",
    reason: str = "low_confidence",
    job_id: str = "j1",
    deadline_ms: int = 30_000,
    received: float = T0,
) -> Outcome:
    job = Job(job_id, "intent", "turn it on please", {}, deadline_ms, "auto")
    book.jobs[job_id] = (job, received)
    pred = Prediction(None if label is None else {"label": label}, 0.4, reason)
    local = build(
        job_id,
        "intent",
        "unrecognized",
        received_at=received,
        now=received + 0.01,
        confidence=0.4,
        source="local",
        model="m@1",
        error=ErrorInfo(code=reason, message="x"),
    )
    return Outcome(PendingJob(job, received), local, prediction=pred, escalate=reason)


def reply(esc_id: str, **kw: Any) -> bytes:
    body = {"v": 1, "escalation_id": esc_id, "status": "ok", "model": "big", **kw}
    return json.dumps(body).encode()


def on_reply(esc: Escalator, book: FakeBook, rt: Any, payload: bytes) -> Actions:
    return esc.on_reply(book, book, payload, None, {rt.name: rt})  # type: ignore[arg-type]


def started(
    esc: Escalator, book: FakeBook, rt: Any, **kw: Any
) -> tuple[EscalationRow, ResultMessage | None]:
    """Escalate one job while the cloud is reachable; return its row and the result now."""
    res = esc.escalate(book, outcome(book, **kw), rt, reachable=True)  # type: ignore[arg-type]
    [row] = [r for r in book.rows.values() if r.job_id == kw.get("job_id", "j1")]
    return row, res


# -- starting ----------------------------------------------------------------------------


def test_reachable_escalation_sends_a_redacted_request_and_the_job_waits() -> None:
    rt, book = task(), FakeBook()
    esc = escalator(rt)
    row, res = started(esc, book, rt)
    assert res is None  # the job waits for the cloud; nothing is answered yet
    assert row.state == "pending" and row.reason == "low_confidence" and row.attempts == 1
    [(topic, request, corr, response_topic)] = book.requests
    assert topic == "edgeagent/cloud/requests/intent"
    assert corr == row.id.encode() and response_topic == "edgeagent/dev/cloud/replies"
    assert request["labels"] == LABELS and request["local"]["output"] == {"label": "lights_on"}
    assert esc.in_flight == 1


def test_unreachable_waiting_escalation_is_recorded_but_not_sent() -> None:
    rt, book = task(offline="wait"), FakeBook()
    esc = escalator(rt)
    res = esc.escalate(book, outcome(book), rt, reachable=False)  # type: ignore[arg-type]
    assert res is None and book.requests == []
    [row] = book.rows.values()
    assert row.attempts == 0 and not row.provisional


@pytest.mark.parametrize(
    ("label", "reason", "status"),
    [("lights_on", "low_confidence", "ok"), ("oos", "out_of_scope", "unrecognized")],
)
def test_provisional_answer_while_the_cloud_is_away(label: str, reason: str, status: str) -> None:
    rt, book = task(offline="provisional"), FakeBook()
    esc = escalator(rt)
    o = outcome(book, label=label, reason=reason)
    res = esc.escalate(book, o, rt, reachable=False)  # type: ignore[arg-type]
    assert res is not None and res.provisional and res.status == status
    assert res.output == {"label": label}
    assert res.escalation is not None and res.escalation.reason == reason
    [row] = book.rows.values()
    assert row.provisional and book.requests == []


def test_cloud_unavailable_with_offline_reject_is_unrecognized_and_records_nothing() -> None:
    rt, book = task(offline="reject"), FakeBook()
    esc = escalator(rt)
    res = esc.escalate(book, outcome(book), rt, reachable=False)  # type: ignore[arg-type]
    assert res is not None and res.status == "unrecognized" and res.output is None
    assert res.error is not None and res.error.code == "cloud_unavailable"
    assert book.rows == {} and esc.in_flight == 0


@pytest.mark.parametrize(
    ("over_budget", "status"), [("local", "ok"), ("unrecognized", "unrecognized")]
)
def test_budget_exceeded_falls_back(over_budget: str, status: str) -> None:
    rt, book = task(budget_burst=0, over_budget=over_budget), FakeBook()
    esc = escalator(rt)
    res = esc.escalate(book, outcome(book), rt, reachable=True)  # type: ignore[arg-type]
    assert res is not None and res.status == status
    assert res.error is not None and res.error.code == "budget_exceeded"
    assert res.output == ({"label": "lights_on"} if over_budget == "local" else None)
    assert book.rows == {} and book.requests == []


def test_in_flight_cap_counts_as_over_budget() -> None:
    rt, book = task(), FakeBook()
    esc = escalator(rt, max_in_flight=1)
    started(esc, book, rt)
    res = esc.escalate(book, outcome(book, job_id="j2"), rt, reachable=True)  # type: ignore[arg-type]
    assert res is not None and res.error is not None and res.error.code == "budget_exceeded"


# -- replies -----------------------------------------------------------------------------


def test_a_valid_reply_answers_caches_and_keeps_an_example() -> None:
    rt, book = task(), FakeBook()
    esc = escalator(rt)
    row, _ = started(esc, book, rt)
    acts = on_reply(esc, book, rt, reply(row.id, output={"label": "lights_off"}, confidence=0.9))
    [answer] = acts.answers
    res = answer.result
    assert (res.status, res.source, res.model) == ("ok", "cloud", "big")
    assert res.output == {"label": "lights_off"} and res.confidence == 0.9
    assert res.escalation is not None and res.escalation.id == row.id
    assert not answer.supersede and res.supersedes is None
    [cache] = acts.cache
    assert (cache.task, cache.fingerprint, cache.input) == ("intent", "fp1", "turn it on please")
    [example] = acts.examples
    assert example.cloud_output == {"label": "lights_off"}
    assert example.local_output == {"label": "lights_on"}
    assert book.rows[row.id].state == "done" and esc.in_flight == 0


def test_a_reply_after_a_provisional_answer_supersedes_it() -> None:
    rt, book = task(offline="provisional"), FakeBook()
    esc = escalator(rt)
    esc.escalate(book, outcome(book), rt, reachable=False)  # type: ignore[arg-type]
    [row] = book.rows.values()
    acts = on_reply(esc, book, rt, reply(row.id, output={"label": "lights_off"}))
    [answer] = acts.answers
    assert answer.supersede and answer.result.supersedes == "j1"


def test_an_invalid_reply_answers_with_the_local_fallback() -> None:
    rt, book = task(), FakeBook()
    esc = escalator(rt)
    row, _ = started(esc, book, rt)
    acts = on_reply(esc, book, rt, reply(row.id, output={"label": "dance"}))
    [answer] = acts.answers
    res = answer.result
    assert res.status == "ok" and res.source == "local" and res.output == {"label": "lights_on"}
    assert res.error is not None and res.error.code == "cloud_error"
    assert "label not in the task's label set" in res.error.message
    assert acts.cache == [] and acts.examples == []  # a wrong answer is neither kept nor served
    assert book.rows[row.id].state == "failed"


def test_late_duplicate_and_garbage_replies_change_nothing() -> None:
    rt, book = task(), FakeBook()
    esc = escalator(rt)
    row, _ = started(esc, book, rt)
    ok = reply(row.id, output={"label": "lights_off"})
    assert on_reply(esc, book, rt, ok).answers
    for payload in (ok, reply("nobody"), b"not json", b"[1]"):
        acts = on_reply(esc, book, rt, payload)
        assert acts.answers == [] and acts.cache == [] and acts.examples == []


def test_an_unsure_cloud_answer_is_not_kept_as_an_example() -> None:
    rt, book = task(learn={"min_cloud_confidence": 0.8}), FakeBook()
    esc = escalator(rt)
    row, _ = started(esc, book, rt)
    payload = reply(row.id, output={"label": "lights_off"}, confidence=0.3)
    acts = on_reply(esc, book, rt, payload)
    assert acts.answers and acts.examples == []


# -- deadlines and re-sends ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("on_deadline", "label", "status", "code"),
    [
        ("local", "lights_on", "ok", "cloud_timeout"),
        ("local", None, "expired", "deadline_exceeded"),  # no local answer to fall back on
        ("expired", "lights_on", "expired", "deadline_exceeded"),
    ],
)
def test_deadline_without_reply(
    on_deadline: str, label: str | None, status: str, code: str
) -> None:
    rt, book = task(on_deadline=on_deadline), FakeBook()
    esc = escalator(rt)
    now = time.time()
    row, _ = started(esc, book, rt, label=label, deadline_ms=1000, received=now)
    assert esc.tick(book, book, reachable=True, now=now + 0.5).answers == []  # type: ignore[arg-type]
    acts = esc.tick(book, book, reachable=True, now=now + 2.0)  # type: ignore[arg-type]
    [answer] = acts.answers
    assert answer.result.status == status
    assert answer.result.error is not None and answer.result.error.code == code
    assert answer.result.latency_ms == pytest.approx(2000.0)  # measured on the given clock
    assert book.rows[row.id].state == "expired" and esc.in_flight == 0


def test_due_requests_are_resent_only_while_reachable() -> None:
    rt, book = task(), FakeBook()
    esc = escalator(rt, retry_min_s=1.0)
    now = time.time()
    row, _ = started(esc, book, rt, received=now)
    later = book.rows[row.id].next_attempt_at + 0.01
    esc.tick(book, book, reachable=False, now=later)  # type: ignore[arg-type]
    assert len(book.requests) == 1 and book.sent == []
    esc.tick(book, book, reachable=True, now=later)  # type: ignore[arg-type]
    assert len(book.requests) == 2 and [s[0] for s in book.sent] == [row.id]
    assert book.rows[row.id].next_attempt_at > later  # backed off


def test_cloud_coming_online_resends_everything_pending() -> None:
    rt, book = task(offline="wait"), FakeBook()
    esc = escalator(rt, assume_online=False)
    esc.escalate(book, outcome(book), rt, reachable=False)  # type: ignore[arg-type]
    assert book.requests == []
    assert esc.on_status("edgeagent/cloud/status", b'{"state": "online"}')
    esc.resend_all_now(book, book)  # type: ignore[arg-type]
    assert len(book.requests) == 1
    assert not esc.on_status("edgeagent/cloud/status", b'{"state": "online"}')  # no news


# -- audits --------------------------------------------------------------------------------


def test_audit_rolls_the_dice_on_the_task_rate() -> None:
    assert escalator(task(audit_rate=1.0)).wants_audit(task(audit_rate=1.0).config)
    assert not escalator(task()).wants_audit(task().config)
    never = task(audit_rate=1.0, allow_cloud=False)
    assert not escalator(never).wants_audit(never.config)


def test_an_audit_gets_no_result_and_its_reply_only_counts_and_teaches() -> None:
    rt, book = task(audit_rate=1.0), FakeBook()
    esc = escalator(rt)
    o = outcome(book)
    assert esc.escalate(book, o, rt, reachable=True, audit=True) is None  # type: ignore[arg-type]
    [row] = book.rows.values()
    assert row.audit and row.reason == "audit"
    acts = on_reply(esc, book, rt, reply(row.id, output={"label": "lights_on"}))
    assert acts.answers == []  # the job keeps its local answer
    assert acts.examples and acts.cache
    assert esc.metrics.audits.labels("intent", "agree")._value.get() == 1
