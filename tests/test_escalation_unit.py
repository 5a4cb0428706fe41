"""The escalator at its seam: a fake journal to read from, a fake clock, and a task
runtime reduced to what the escalator reads.  No store, no broker.

The escalator decides and returns; it never writes.  Every call returns
:class:`~edgeagent.results.Actions` (escalation rows opened and closed, requests to
send, answers, cache entries, examples) and these tests assert on them, for every
outcome: sent, budget exhausted, cloud unreachable (waiting backlog, reject,
provisional), reply ok / invalid / unsure / late, deadline, re-sends (due, and all at
once after the cloud comes back), audits.  The fake journal applies the actions the way
the pipeline's commit does, so that a scenario can go on (a reply finds its row).
"""

from __future__ import annotations

import json
import random
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
from edgeagent.results import Actions, Closed, Request, build
from edgeagent.store import EscalationRow

LABELS = ["lights_on", "lights_off", "oos"]
T0 = 1_000_000.0  # the fake clock's start (seconds since the epoch)
REQUESTS = "edgeagent/cloud/requests/intent"
REPLIES = "edgeagent/dev/cloud/replies"


class Clock:
    """A wall clock that moves only when told."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeJournal:
    """What the escalator reads, in memory; :meth:`apply` writes actions into it as the
    pipeline's commit would (``sent`` records each request written to the outbox)."""

    def __init__(self) -> None:
        self.rows: dict[str, EscalationRow] = {}
        self.jobs: dict[str, tuple[Job, float]] = {}
        self.sent: list[Request] = []

    def escalation(self, esc_id: str) -> EscalationRow | None:
        return self.rows.get(esc_id)

    def pending_escalations(self) -> list[EscalationRow]:
        return sorted(
            (r for r in self.rows.values() if r.state == "pending"), key=lambda r: r.created_at
        )

    def job(self, job_id: str) -> Job | None:
        return self.jobs[job_id][0] if job_id in self.jobs else None

    def received_at(self, job_id: str) -> float | None:
        return self.jobs[job_id][1] if job_id in self.jobs else None

    def apply(self, acts: Actions) -> Actions:
        for row in acts.opened:
            self.rows[row.id] = row
        for c in acts.closed:
            assert self.rows[c.escalation_id].state == "pending"
            self.rows[c.escalation_id] = replace(self.rows[c.escalation_id], state=c.state)
        for r in acts.requests:
            assert r.escalation_id in self.rows  # a request is written after its row
            self.sent.append(r)
            if r.next_attempt_at is not None:
                row = self.rows[r.escalation_id]
                self.rows[row.id] = replace(
                    row, attempts=row.attempts + 1, next_attempt_at=r.next_attempt_at
                )
        return acts


class Rig:
    def __init__(self, *, cloud: dict[str, Any] | None = None, **task_kw: Any) -> None:
        cfg = TaskConfig.model_validate(
            {
                "kind": "classify",
                "labels": LABELS,
                "backend": {
                    "type": "rules",
                    "rules": [{"label": "lights_on", "keywords": ["on"]}],
                },
                **task_kw,
            }
        )
        self.rt: Any = SimpleNamespace(
            name="intent",
            config=cfg,
            labels=LABELS,
            fingerprint="fp1",
            backend=SimpleNamespace(model_id="m@1"),
        )
        self.clock = Clock()
        self.journal = FakeJournal()
        self.esc = Escalator(
            CloudConfig(enabled=True, **(cloud or {})),
            Topics("edgeagent", "dev"),
            "dev",
            Metrics(),
            rng=random.Random(7),
            clock=self.clock,
        )
        self.esc.configure({"intent": cfg})

    def outcome(
        self,
        *,
        label: str | None = "lights_on",
        reason: str = "low_confidence",
        job_id: str = "j1",
        deadline_ms: int = 30_000,
    ) -> Outcome:
        received = self.clock.now
        job = Job(job_id, "intent", "turn it on please", {}, deadline_ms, "auto")
        self.journal.jobs[job_id] = (job, received)
        pred = Prediction(None if label is None else {"label": label}, 0.4, reason)
        local = build(
            job_id,
            "intent",
            "unrecognized",
            received_at=received,
            now=received,
            confidence=0.4,
            source="local",
            model="m@1",
            error=ErrorInfo(code=reason, message="x"),
        )
        return Outcome(PendingJob(job, received), local, prediction=pred, escalate=reason)

    def escalate(self, *, reachable: bool = True, audit: bool = False, **kw: Any) -> Actions:
        acts = self.esc.escalate(self.outcome(**kw), self.rt, reachable=reachable, audit=audit)
        return self.journal.apply(acts)

    def reply(self, payload: bytes, correlation: bytes | None = None) -> Actions:
        acts = self.esc.on_reply(self.journal, payload, correlation, {"intent": self.rt})
        return self.journal.apply(acts)

    def tick(self, *, reachable: bool = True) -> Actions:
        return self.journal.apply(self.esc.tick(self.journal, reachable=reachable))

    def row(self, job_id: str = "j1") -> EscalationRow:
        [row] = [r for r in self.journal.rows.values() if r.job_id == job_id]
        return row


def reply(esc_id: str, **kw: Any) -> bytes:
    body = {"v": 1, "escalation_id": esc_id, "status": "ok", "model": "big", **kw}
    return json.dumps(body).encode()


def only_answer(acts: Actions) -> ResultMessage:
    [answer] = acts.answers
    assert answer.job_id == answer.result.id and answer.task == "intent"
    return answer.result


def counted(rig: Rig, outcome: str) -> float:
    value: float = rig.esc.metrics.escalations.labels("intent", outcome)._value.get()
    return value


# -- starting ----------------------------------------------------------------------------


def test_reachable_escalation_opens_a_row_and_sends_a_redacted_request() -> None:
    rig = Rig(redact=["email"])
    o = rig.outcome()
    o = replace(o, pending=replace(o.pending, job=replace(o.pending.job, input="mail a@b.example")))
    acts = rig.journal.apply(rig.esc.escalate(o, rig.rt, reachable=True))
    assert acts.answers == [] and acts.closed == []  # the job waits for the cloud
    [row] = acts.opened
    assert (row.job_id, row.task, row.reason) == ("j1", "intent", "low_confidence")
    assert row.state == "pending"
    assert row.attempts == 1 and not row.provisional and not row.audit
    assert row.created_at == T0 and row.deadline_at == T0 + 30.0
    assert row.next_attempt_at > T0  # the first re-send is backed off
    [req] = acts.requests
    assert (req.escalation_id, req.topic, req.response_topic) == (row.id, REQUESTS, REPLIES)
    assert req.correlation == row.id.encode() and req.payload == row.request
    assert req.next_attempt_at is None  # the first send is counted in the row itself
    body = json.loads(req.payload)
    assert body["labels"] == LABELS and body["local"]["output"] == {"label": "lights_on"}
    assert body["deadline_ms"] == 30_000 and body["device"] == "dev"
    assert "a@b.example" not in body["input"] and row.mapping  # restored from the row later
    assert rig.esc.in_flight == 1 and counted(rig, "low_confidence") == 1


def test_unreachable_waiting_escalation_is_recorded_as_backlog_not_sent() -> None:
    rig = Rig(offline="wait")
    acts = rig.escalate(reachable=False)
    assert acts.answers == [] and acts.requests == []
    [row] = acts.opened
    assert row.attempts == 0 and not row.provisional and row.state == "pending"
    assert rig.esc.in_flight == 1


@pytest.mark.parametrize(
    ("label", "reason", "status"),
    [("lights_on", "low_confidence", "ok"), ("oos", "out_of_scope", "unrecognized")],
)
def test_provisional_answer_while_the_cloud_is_away(label: str, reason: str, status: str) -> None:
    rig = Rig(offline="provisional")
    acts = rig.escalate(reachable=False, label=label, reason=reason)
    res = only_answer(acts)
    assert res.provisional and res.status == status and res.output == {"label": label}
    assert res.escalation is not None and res.escalation.reason == reason
    [row] = acts.opened
    assert row.provisional and acts.requests == [] and res.escalation.id == row.id


def test_cloud_unavailable_with_offline_reject_is_unrecognized_and_opens_nothing() -> None:
    rig = Rig(offline="reject")
    acts = rig.escalate(reachable=False)
    res = only_answer(acts)
    assert res.status == "unrecognized" and res.output is None
    assert res.error is not None and res.error.code == "cloud_unavailable"
    assert acts.opened == [] and acts.requests == [] and rig.esc.in_flight == 0
    assert counted(rig, "rejected_offline") == 1


@pytest.mark.parametrize(
    ("over_budget", "status"), [("local", "ok"), ("unrecognized", "unrecognized")]
)
def test_budget_exhausted_falls_back(over_budget: str, status: str) -> None:
    rig = Rig(budget_burst=0, over_budget=over_budget)
    acts = rig.escalate()
    res = only_answer(acts)
    assert res.status == status
    assert res.error is not None and res.error.code == "budget_exceeded"
    assert res.output == ({"label": "lights_on"} if over_budget == "local" else None)
    assert acts.opened == [] and acts.requests == [] and counted(rig, "over_budget") == 1


def test_in_flight_cap_counts_as_over_budget() -> None:
    rig = Rig(cloud={"max_in_flight": 1})
    assert rig.escalate().opened
    acts = rig.escalate(job_id="j2")
    res = only_answer(acts)
    assert res.error is not None and res.error.code == "budget_exceeded"
    assert acts.opened == [] and acts.requests == []


def test_no_room_seen_at_routing_counts_as_over_budget() -> None:
    rig = Rig()
    o = replace(rig.outcome(), no_room=True)
    acts = rig.esc.escalate(o, rig.rt, reachable=True)
    assert only_answer(acts).error is not None and acts.opened == []


# -- replies -----------------------------------------------------------------------------


def test_a_valid_reply_closes_answers_caches_and_keeps_an_example() -> None:
    rig = Rig()
    row = rig.escalate().opened[0]
    rig.clock.now = T0 + 2.5
    acts = rig.reply(reply(row.id, output={"label": "lights_off"}, confidence=0.9))
    assert acts.closed == [Closed(row.id, "done")] and acts.opened == [] and acts.requests == []
    [answer] = acts.answers
    res = answer.result
    assert (res.status, res.source, res.model) == ("ok", "cloud", "big")
    assert res.output == {"label": "lights_off"} and res.confidence == 0.9
    assert res.escalation is not None and res.escalation.id == row.id
    assert res.latency_ms == pytest.approx(2500.0)  # from the journal's receipt, fake clock
    assert not answer.supersede and res.supersedes is None
    [cache] = acts.cache
    assert (cache.task, cache.fingerprint, cache.input) == ("intent", "fp1", "turn it on please")
    assert (cache.output, cache.confidence, cache.model) == ({"label": "lights_off"}, 0.9, "big")
    [example] = acts.examples
    assert example.cloud_output == {"label": "lights_off"}
    assert example.local_output == {"label": "lights_on"} and example.reason == "low_confidence"
    assert rig.esc.in_flight == 0


def test_the_correlation_data_finds_the_escalation_when_the_body_does_not_say() -> None:
    rig = Rig()
    row = rig.escalate().opened[0]
    body = json.dumps({"v": 1, "status": "ok", "output": {"label": "lights_off"}}).encode()
    acts = rig.reply(body, correlation=row.id.encode())
    assert acts.closed == [Closed(row.id, "done")] and only_answer(acts).source == "cloud"


def test_a_reply_after_a_provisional_answer_supersedes_it() -> None:
    rig = Rig(offline="provisional")
    row = rig.escalate(reachable=False).opened[0]
    acts = rig.reply(reply(row.id, output={"label": "lights_off"}))
    [answer] = acts.answers
    assert answer.supersede and answer.result.supersedes == "j1"
    assert acts.closed == [Closed(row.id, "done")]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"output": {"label": "dance"}}, "label not in the task's label set"),
        ({"status": "error", "error": {"code": "llm_down"}}, "cloud status 'error' (llm_down)"),
        ({"output": "lights_off"}, "label not in the task's label set"),
    ],
)
def test_an_invalid_reply_fails_the_escalation_and_answers_with_the_local_fallback(
    body: dict[str, Any], problem: str
) -> None:
    rig = Rig()
    row = rig.escalate().opened[0]
    acts = rig.reply(reply(row.id, **body))
    assert acts.closed == [Closed(row.id, "failed")]
    res = only_answer(acts)
    assert res.status == "ok" and res.source == "local" and res.output == {"label": "lights_on"}
    assert res.error is not None and res.error.code == "cloud_error"
    assert problem in res.error.message
    assert acts.cache == [] and acts.examples == []  # a wrong answer is neither kept nor served
    assert rig.esc.in_flight == 0


def test_an_invalid_reply_to_a_provisional_escalation_only_closes_it() -> None:
    rig = Rig(offline="provisional")
    row = rig.escalate(reachable=False).opened[0]
    acts = rig.reply(reply(row.id, output={"label": "dance"}))
    assert acts.closed == [Closed(row.id, "failed")] and acts.answers == []  # provisional stands


def test_late_duplicate_oversized_and_garbage_replies_change_nothing() -> None:
    rig = Rig(cloud={"max_reply_bytes": 4096})
    row = rig.escalate().opened[0]
    ok = reply(row.id, output={"label": "lights_off"})
    assert rig.reply(ok).answers
    huge = reply(row.id, output={"label": "lights_off"}, pad="x" * 5000)
    for payload in (ok, reply("nobody"), b"not json", b"[1]", b"\xff", huge):
        assert not rig.reply(payload), payload[:40]


def test_an_unsure_cloud_answer_answers_but_is_not_kept_as_an_example() -> None:
    rig = Rig(learn={"min_cloud_confidence": 0.8})
    row = rig.escalate().opened[0]
    acts = rig.reply(reply(row.id, output={"label": "lights_off"}, confidence=0.3))
    assert only_answer(acts).source == "cloud" and acts.closed == [Closed(row.id, "done")]
    assert acts.examples == []
    assert [c.output for c in acts.cache] == [{"label": "lights_off"}]


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
    rig = Rig(on_deadline=on_deadline)
    row = rig.escalate(label=label, deadline_ms=1000).opened[0]
    rig.clock.now = T0 + 0.5
    assert rig.tick(reachable=False) == Actions()  # not yet, and not sent while unreachable
    rig.clock.now = T0 + 2.0
    acts = rig.tick()
    assert acts.closed == [Closed(row.id, "expired")] and acts.requests == []
    res = only_answer(acts)
    assert res.status == status and res.error is not None and res.error.code == code
    assert res.latency_ms == pytest.approx(2000.0)  # measured on the given clock
    assert res.escalation is not None and res.escalation.id == row.id
    assert rig.esc.in_flight == 0 and counted(rig, "expired") == 1
    assert rig.tick() == Actions()  # closed: never expired twice


@pytest.mark.parametrize("kind", ["provisional", "audit"])
def test_a_provisional_or_audit_escalation_expires_without_a_new_answer(kind: str) -> None:
    rig = Rig(offline="provisional", audit_rate=1.0)
    if kind == "provisional":
        row = rig.escalate(reachable=False, deadline_ms=1000).opened[0]
    else:
        row = rig.escalate(audit=True, deadline_ms=1000).opened[0]
    rig.clock.now = T0 + 5
    acts = rig.tick()
    assert acts.closed == [Closed(row.id, "expired")] and acts.answers == []


def test_due_requests_are_resent_only_while_reachable_and_backed_off() -> None:
    rig = Rig(cloud={"retry_min_s": 1.0, "retry_max_s": 8.0})
    row = rig.escalate(deadline_ms=600_000).opened[0]
    rig.clock.now = row.next_attempt_at - 0.01
    assert rig.tick() == Actions()  # not due yet
    rig.clock.now = row.next_attempt_at
    assert rig.tick(reachable=False) == Actions()  # due, but the cloud is away
    delays = []
    for attempt in range(1, 6):
        [req] = rig.tick().requests
        assert (req.escalation_id, req.topic, req.payload) == (row.id, REQUESTS, row.request)
        assert req.next_attempt_at is not None
        delays.append(req.next_attempt_at - rig.clock.now)
        assert rig.journal.rows[row.id].attempts == attempt + 1
        rig.clock.now = req.next_attempt_at
    # Capped, jittered exponential backoff: attempt n waits within [d/2, d], d = min(8, 2**n).
    for n, d in enumerate(delays, start=2):
        cap = min(8.0, 2.0**n)
        assert cap / 2 <= d <= cap


def test_cloud_coming_back_resends_the_backlog_at_once() -> None:
    rig = Rig(offline="wait", cloud={"assume_online": False})
    first = rig.escalate(reachable=False).opened[0]
    rig.clock.now = T0 + 1
    second = rig.escalate(reachable=False, job_id="j2").opened[0]
    assert rig.journal.sent == []
    assert rig.esc.on_status("edgeagent/cloud/status/w1", b'{"state": "online"}')
    rig.clock.now = T0 + 3
    acts = rig.journal.apply(rig.esc.resend_all_now(rig.journal))
    assert [r.escalation_id for r in acts.requests] == [first.id, second.id]  # oldest first
    for r in acts.requests:
        assert r.topic == REQUESTS and r.next_attempt_at is not None and r.next_attempt_at > T0 + 3
        assert rig.journal.rows[r.escalation_id].attempts == 1
    assert acts.opened == acts.closed == acts.answers == []  # nothing else changes
    assert not rig.esc.on_status("edgeagent/cloud/status/w1", b'{"state": "online"}')  # no news
    assert not rig.esc.on_status("edgeagent/cloud/status/w1", b"")  # cleared: unreachable again
    assert not rig.esc.cloud_online


# -- audits --------------------------------------------------------------------------------


def test_audit_samples_confident_answers_at_the_task_rate() -> None:
    assert Rig(audit_rate=1.0).esc.wants_audit(Rig(audit_rate=1.0).rt.config)
    assert not Rig().esc.wants_audit(Rig().rt.config)
    never = Rig(audit_rate=1.0, allow_cloud=False)
    assert not never.esc.wants_audit(never.rt.config)
    half = Rig(audit_rate=0.5)
    rolls = [half.esc.wants_audit(half.rt.config) for _ in range(400)]
    assert 100 < sum(rolls) < 300  # a sample, from the escalator's own (seeded) rng


def test_an_audit_gets_no_answer_and_its_reply_only_counts_and_teaches() -> None:
    rig = Rig(audit_rate=1.0)
    acts = rig.escalate(audit=True)
    assert acts.answers == []  # the job keeps its local answer
    [row] = acts.opened
    assert row.audit and row.reason == "audit" and len(acts.requests) == 1
    acts = rig.reply(reply(row.id, output={"label": "lights_on"}))
    assert acts.answers == [] and acts.closed == [Closed(row.id, "done")]
    assert acts.examples and acts.cache
    assert rig.esc.metrics.audits.labels("intent", "agree")._value.get() == 1


def test_an_audit_over_budget_is_dropped_silently() -> None:
    rig = Rig(audit_rate=1.0, budget_burst=0)
    assert rig.escalate(audit=True) == Actions()
