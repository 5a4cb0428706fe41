"""The cloud round trip, daemon side: budget, redaction, durable requests, replies, deadlines.

The escalator decides; the pipeline writes.  It reads the journal (a :class:`Journal`:
escalation rows, jobs) and returns every write as :class:`~edgeagent.results.Actions`:
escalations opened and closed, the requests to send, the results a job gets, cache
entries, labelled examples.  It never writes anything itself; the pipeline applies the
actions in its one commit (:meth:`edgeagent.pipeline.Pipeline.commit`), so a request is
durable (row and outbox) before it is sent, and a reply's result before it is published.
Its only state is in memory: budgets, the in-flight count (re-read from the journal
when a commit rolls back), which agents are online.

Thread model: everything runs on the event loop thread, inside the pipeline's one
commit, so an escalation request, the job's state and any result it produces are
committed together.  Time comes from ``clock`` (wall clock, seconds since the epoch).

Life of an escalation::

    route says escalate → budget? → redact → escalations row `pending` + request in the outbox
      (one commit with the job's state; provisional answer now, or the job waits)
    → PUBLISH to {prefix}/cloud/requests/{task}, Response Topic {prefix}/{device}/cloud/replies
    → re-sent with capped, jittered backoff while the cloud is reachable and no reply came
    → reply (:meth:`Escalator.on_reply`): validated against the task → restore placeholders
      → answer / supersede / audit, a cache entry, a labelled example   (late replies: ignored)
    → or deadline (:meth:`Escalator.tick`): `on_deadline` decides (local answer or `expired`)
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import jsonschema

from edgeagent.backoff import backoff_delay
from edgeagent.budget import TokenBucket
from edgeagent.config import CloudConfig, TaskConfig
from edgeagent.learning.examples import is_unsure
from edgeagent.logs import get_logger
from edgeagent.metrics import Metrics
from edgeagent.protocol import (
    ErrorInfo,
    EscalationInfo,
    Job,
    ResultMessage,
    Topics,
    load_payload,
)
from edgeagent.redact import Redactor, restore
from edgeagent.results import (
    Actions,
    Answer,
    CacheEntry,
    Closed,
    Example,
    Request,
    build,
    revise,
)
from edgeagent.store import EscalationRow

if TYPE_CHECKING:
    from edgeagent.pipeline import Outcome, TaskRuntime

log = get_logger("edgeagent.escalation")


PROVISIONAL_OUT_OF_SCOPE = ErrorInfo(
    code="out_of_scope",
    message="provisional: outside what the local model knows; the cloud agent's answer follows",
)


class Journal(Protocol):
    """What the escalator reads (:class:`edgeagent.store.Store` is one; inside the
    pipeline's commit it sees that commit's own writes)."""

    def escalation(self, esc_id: str) -> EscalationRow | None: ...

    def pending_escalations(self) -> list[EscalationRow]:
        """Pending escalations, oldest first."""
        ...

    def job(self, job_id: str) -> Job | None: ...

    def received_at(self, job_id: str) -> float | None: ...


class Escalator:
    def __init__(
        self,
        config: CloudConfig,
        topics: Topics,
        device: str,
        metrics: Metrics,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.topics = topics
        self.device = device
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.clock = clock
        """Wall clock (seconds since the epoch): request deadlines, re-sends, latencies."""
        self.cloud_online = config.assume_online
        self._buckets: dict[str, TokenBucket] = {}
        self._redactors: dict[str, Redactor] = {}
        self._on_deadline: dict[str, str] = {}
        self._workers: dict[str, str] = {}  # status topic -> state
        self.in_flight = 0

    # -- configuration --------------------------------------------------------------

    def configure(self, tasks: dict[str, TaskConfig]) -> None:
        """Budgets and redactors per task (at start and on reload; buckets keep their level)."""
        for name, task in tasks.items():
            old = self._buckets.get(name)
            bucket = TokenBucket(task.budget_per_minute / 60.0, task.budget_burst)
            if old is not None:
                bucket = old if _same_bucket(old, task) else bucket
            self._buckets[name] = bucket
            self._redactors[name] = Redactor(
                task.redact, task.redact_patterns or None, region=task.redact_region
            )
            self._on_deadline[name] = task.on_deadline

    def has_room(self, task: str) -> bool:
        """Whether an escalation of ``task`` could start now (budget and in-flight cap);
        a hint only: :meth:`escalate` decides."""
        bucket = self._buckets.get(task)
        return (
            bucket is not None
            and self.in_flight < self.config.max_in_flight
            and bucket.available >= 1
        )

    def redactor(self, task: str) -> Redactor | None:
        """What ``task``'s requests are redacted with (None: not configured)."""
        return self._redactors.get(task)

    def usable(self, task: TaskConfig) -> bool:
        return self.config.enabled and task.allow_cloud

    def wants_audit(self, task: TaskConfig) -> bool:
        """Roll the dice for ``audit_rate``: should this confident local answer also be
        sent to the cloud, to measure agreement (the job keeps its local answer)?"""
        rate = task.audit_rate
        return self.usable(task) and rate > 0 and self.rng.random() < rate

    def recover(self, journal: Journal) -> None:
        """Count the pending escalations again (at start, and after a rollback)."""
        self.in_flight = len(journal.pending_escalations())

    def on_status(self, topic: str, payload: bytes) -> bool:
        """An agent's retained status (``{prefix}/cloud/status`` or, one per worker,
        ``{prefix}/cloud/status/{worker}``).  The cloud is reachable while any worker says
        ``online``.  Returns True when it just became reachable."""
        try:
            state = json.loads(payload).get("state") if payload else None
        except (ValueError, AttributeError):
            state = None
        was = self.cloud_online
        if state is None:
            self._workers.pop(topic, None)  # retained status cleared, or unreadable
        else:
            self._workers[topic] = state
        online = any(s == "online" for s in self._workers.values())
        self.cloud_online = online or (self.config.assume_online and not self._workers)
        self.metrics.cloud_reachable.set(1 if self.cloud_online else 0)
        log.info("cloud.status", topic=topic, state=state, reachable=self.cloud_online)
        return self.cloud_online and not was

    # -- starting -------------------------------------------------------------------

    def escalate(
        self,
        outcome: Outcome,
        rt: TaskRuntime,
        *,
        reachable: bool,
        audit: bool = False,
    ) -> Actions:
        """Start an escalation: the row to record, the request to send (if ``reachable``)
        and, in ``answers``, the result the job gets now (none: it waits for the cloud).

        For an audit the job has its local answer already: no answer is ever returned.
        """
        task = rt.config
        p = outcome.pending
        reason = "audit" if audit else (outcome.escalate or "low_confidence")
        local_output = outcome.prediction.output if outcome.prediction else None
        local_conf = outcome.prediction.confidence if outcome.prediction else None
        if (
            outcome.no_room
            or self.in_flight >= self.config.max_in_flight
            or not self._buckets[rt.name].try_take()
        ):
            self.metrics.escalations.labels(rt.name, "over_budget").inc()
            if audit:
                return Actions()
            log.warning("escalation.over_budget", job_id=p.job.id, task=rt.name)
            return self._answer(
                self._fallback(outcome, rt, "budget_exceeded", task.over_budget == "local")
            )
        if not reachable and task.offline == "reject" and not audit:
            self.metrics.escalations.labels(rt.name, "rejected_offline").inc()
            return self._answer(self._fallback(outcome, rt, "cloud_unavailable", False))

        esc_id = uuid.uuid4().hex
        # One call for both, so placeholders are numbered once across input and answer;
        # usually done off the event loop by the pipeline already.
        redacted: tuple[Any, dict[str, str], dict[str, int]] = outcome.redacted or self._redactors[
            rt.name
        ].redact_value([p.job.input, local_output])
        (red_input, red_local), mapping, counts = redacted
        for kind, n in counts.items():
            self.metrics.redactions.labels(rt.name, kind).inc(n)
        now = self.clock()
        remaining_ms = max(1, int((p.deadline_at - now) * 1000))
        request: dict[str, Any] = {
            "v": 1,
            "escalation_id": esc_id,
            "device": self.device,
            "task": rt.name,
            "kind": task.kind,
            "input": red_input,
            "instructions": task.instructions or task.description,
            "local": {"output": red_local, "confidence": local_conf},
            "deadline_ms": remaining_ms,
        }
        if task.kind == "classify":
            request["labels"] = rt.labels
        if task.output_schema is not None:
            request["schema"] = task.output_schema
        provisional = not audit and not reachable and task.offline == "provisional"
        payload = json.dumps(request, ensure_ascii=False).encode()
        acts = Actions()
        acts.opened.append(
            EscalationRow(
                id=esc_id,
                job_id=p.job.id,
                task=rt.name,
                reason=reason,
                state="pending",
                audit=audit,
                provisional=provisional,
                created_at=now,
                deadline_at=p.deadline_at,
                next_attempt_at=now + self._backoff(0),
                attempts=1 if reachable else 0,
                request=payload,
                mapping=mapping,
                local={
                    "output": local_output,
                    "confidence": local_conf,
                    "model": rt.backend.model_id,
                },
            )
        )
        if reachable:
            acts.requests.append(self._request(rt.name, esc_id, payload))
        self.in_flight += 1
        self.metrics.escalations.labels(rt.name, reason).inc()
        log.info(
            "escalation.started",
            job_id=p.job.id,
            escalation_id=esc_id,
            task=rt.name,
            reason=reason,
            reachable=reachable,
            redacted=sum(counts.values()),
        )
        if audit or not provisional:
            return acts
        # The local best effort now (its own low confidence says how much to trust it);
        # a result with `supersedes` follows when the cloud answers.
        info = EscalationInfo(reason=reason, id=esc_id)
        if local_output is None:
            result = revise(outcome.result, provisional=True, escalation=info)
        else:
            # An out-of-scope local "label" is the out-of-scope class: not an answer.  A
            # consumer that reads only `status` must not take it for one (PROTOCOL.md,
            # "Provisional").
            oos = reason == "out_of_scope"
            result = revise(
                outcome.result,
                provisional=True,
                escalation=info,
                status="unrecognized" if oos else "ok",
                output=local_output,
                error=PROVISIONAL_OUT_OF_SCOPE if oos else None,
            )
        acts.answers.append(Answer(p.job.id, rt.name, result))
        return acts

    @staticmethod
    def _answer(result: ResultMessage) -> Actions:
        return Actions(answers=[Answer(result.id, result.task, result)])

    def _request(
        self, task: str, esc_id: str, payload: bytes, next_attempt_at: float | None = None
    ) -> Request:
        return Request(
            esc_id,
            self.topics.cloud_requests(task),
            payload,
            self.topics.cloud_replies,
            next_attempt_at,
        )

    def _resend(self, row: EscalationRow, now: float) -> Request:
        """``row``'s request again, and when the attempt after it is due."""
        return self._request(row.task, row.id, row.request, now + self._backoff(row.attempts + 1))

    def _backoff(self, attempts: int) -> float:
        return backoff_delay(attempts, self.config.retry_min_s, self.config.retry_max_s, self.rng)

    def _fallback(
        self, outcome: Outcome, rt: TaskRuntime, code: str, use_local: bool, esc_id: str = ""
    ) -> ResultMessage:
        """The job's answer when the cloud cannot help: the local answer, flagged, or
        `unrecognized` with the reason."""
        pred = outcome.prediction
        message = {
            "budget_exceeded": "escalation budget exhausted; local answer below threshold",
            "cloud_unavailable": "the cloud agent is unreachable",
            "cloud_error": "the cloud agent could not answer",
            "cloud_timeout": "the cloud agent did not answer before the deadline",
        }.get(code, code)
        if use_local and pred is not None and pred.output is not None:
            oos = outcome.escalate == "out_of_scope"  # the out-of-scope class is no answer
            flag = " (out of scope)" if oos else " (local answer)"
            return revise(
                outcome.result,
                status="unrecognized" if oos else "ok",
                output=pred.output,
                confidence=pred.confidence,
                error=ErrorInfo(code=code, message=message + flag),
            )
        err = ErrorInfo(code=code, message=message)
        return revise(outcome.result, status="unrecognized", output=None, error=err)

    # -- replies --------------------------------------------------------------------

    def on_reply(
        self,
        journal: Journal,
        payload: bytes,
        correlation: bytes | None,
        runtimes: dict[str, TaskRuntime],
    ) -> Actions:
        """Handle a cloud reply: close its escalation, and what the job gets: the cloud's
        answer (or the local fallback), a cache entry, a kept example."""
        if len(payload) > self.config.max_reply_bytes:
            self.metrics.replies.labels("too_large").inc()
            log.warning("cloud.reply_too_large", size=len(payload))
            return Actions()
        try:
            reply = load_payload(payload)  # I-JSON: no lone surrogates, no NaN (a ValueError)
            esc_id = str(reply.get("escalation_id") or (correlation or b"").decode())
        except (ValueError, AttributeError, UnicodeDecodeError):
            self.metrics.replies.labels("not_json").inc()
            log.warning("cloud.reply_not_json")
            return Actions()
        row = journal.escalation(esc_id)
        if row is None or row.state != "pending":
            self.metrics.replies.labels("late_or_duplicate").inc()
            log.info("cloud.reply_ignored", escalation_id=esc_id[:64], known=row is not None)
            return Actions()
        rt = runtimes.get(row.task)
        output, problem = self._validate(reply, row, rt)
        ok = problem is None
        closed = Closed(esc_id, "done" if ok else "failed")
        self.in_flight = max(0, self.in_flight - 1)
        self.metrics.replies.labels("ok" if ok else "invalid").inc()
        local_out = row.local.get("output")
        log.info("cloud.reply", escalation_id=esc_id, task=row.task, ok=ok, problem=problem)
        if not ok or rt is None:
            if row.audit or row.provisional:
                return Actions(closed=[closed])  # the local answer stands
            fallback = self._local_result(
                row, "cloud_error", problem or "invalid reply", journal, self.clock()
            )
            return Actions(closed=[closed], answers=[Answer(row.job_id, row.task, fallback)])
        model = str(reply.get("model") or "cloud")
        conf = reply.get("confidence")
        conf = float(conf) if isinstance(conf, (int, float)) and 0 <= conf <= 1 else None
        job_input = _job_input(journal, row)
        acts = Actions(closed=[closed])
        if is_unsure(reply.get("confidence"), rt.config.learn):
            # The agent doubts its own answer: it answers the job but is never learned.
            log.info("learn.unsure_not_kept", escalation_id=esc_id, task=row.task)
        else:
            acts.examples.append(
                Example(
                    task=row.task,
                    input=job_input,
                    cloud_output=output,
                    local_output=local_out,
                    local_confidence=row.local.get("confidence"),
                    reason=row.reason,
                    model=model,
                )
            )
        if job_input is not None:
            acts.cache.append(CacheEntry(row.task, rt.fingerprint, job_input, output, conf, model))
        if row.audit:
            agreed = local_out == output
            self.metrics.audits.labels(row.task, "agree" if agreed else "disagree").inc()
            return acts
        result = build(
            row.job_id,
            row.task,
            "ok",
            received_at=_received(journal, row),
            now=self.clock(),
            output=output,
            confidence=conf,
            source="cloud",
            model=model,
            supersedes=row.job_id if row.provisional else None,
            escalation=EscalationInfo(reason=row.reason, id=esc_id),
        )
        acts.answers.append(Answer(row.job_id, row.task, result, supersede=row.provisional))
        return acts

    def _validate(
        self, reply: dict[str, Any], row: EscalationRow, rt: TaskRuntime | None
    ) -> tuple[Any, str | None]:
        if rt is None:
            return None, "task no longer configured"
        if reply.get("status") != "ok":
            err = reply.get("error")
            code = err.get("code") if isinstance(err, dict) else None
            return None, f"cloud status {reply.get('status')!r} ({code})"
        output = reply.get("output")
        if rt.config.restore_redacted and row.mapping:
            output = restore(output, row.mapping)
        kind = rt.config.kind
        if kind == "classify":
            if not isinstance(output, dict) or output.get("label") not in rt.labels:
                return None, "label not in the task's label set"
            return {"label": output["label"]}, None
        if kind == "extract":
            schema = rt.config.output_schema
            if not isinstance(output, dict):
                return None, "output is not an object"
            if schema is not None:
                errors = list(jsonschema.Draft202012Validator(schema).iter_errors(output))
                if errors:
                    return None, f"output invalid against the schema: {errors[0].message[:120]}"
            return output, None
        if not isinstance(output, dict) or not isinstance(output.get("text"), str):
            return None, "generate output must be {'text': str}"
        return {"text": output["text"]}, None

    def _local_result(
        self, row: EscalationRow, code: str, message: str, journal: Journal, now: float
    ) -> ResultMessage:
        """The job's answer when the cloud's is missing or unusable: its local answer,
        flagged (``unrecognized`` for the out-of-scope class), or ``unrecognized``."""
        local = row.local
        has_local = local.get("output") is not None
        oos = row.reason == "out_of_scope"  # the out-of-scope class is no answer
        return build(
            row.job_id,
            row.task,
            "ok" if has_local and not oos else "unrecognized",
            received_at=_received(journal, row),
            now=now,
            output=local["output"] if has_local else None,
            confidence=local.get("confidence"),
            source="local",
            model=local.get("model"),
            escalation=EscalationInfo(reason=row.reason, id=row.id),
            error=ErrorInfo(
                code=code,
                message=f"{message} (local answer below threshold)" if has_local else message,
            ),
        )

    # -- time -----------------------------------------------------------------------

    def tick(self, journal: Journal, *, reachable: bool) -> Actions:
        """Expire escalations past their deadline (closed, and what their jobs get) and
        re-send due ones while the cloud is reachable."""
        t = self.clock()
        acts = Actions()
        for row in journal.pending_escalations():
            if row.deadline_at <= t:
                acts.closed.append(Closed(row.id, "expired"))
                self.in_flight = max(0, self.in_flight - 1)
                self.metrics.escalations.labels(row.task, "expired").inc()
                log.info("escalation.expired", escalation_id=row.id, job_id=row.job_id)
                if row.audit or row.provisional:
                    continue
                has_local = row.local.get("output") is not None
                if self._on_deadline.get(row.task, "local") == "local" and has_local:
                    res = self._local_result(
                        row, "cloud_timeout", "no cloud answer by the deadline", journal, t
                    )
                else:
                    res = build(
                        row.job_id,
                        row.task,
                        "expired",
                        received_at=_received(journal, row),
                        now=t,
                        escalation=EscalationInfo(reason=row.reason, id=row.id),
                        error=ErrorInfo(
                            code="deadline_exceeded",
                            message="no cloud answer before the job's deadline",
                        ),
                    )
                acts.answers.append(Answer(row.job_id, row.task, res))
            elif reachable and row.next_attempt_at <= t:
                acts.requests.append(self._resend(row, t))
        return acts

    def resend_all_now(self, journal: Journal) -> Actions:
        """The cloud just came (back) online: re-send every pending request at once."""
        t = self.clock()
        return Actions(requests=[self._resend(row, t) for row in journal.pending_escalations()])


def _same_bucket(bucket: TokenBucket, task: TaskConfig) -> bool:
    return bucket.rate_per_s == task.budget_per_minute / 60.0 and bucket.burst == task.budget_burst


def _job_input(journal: Journal, row: EscalationRow) -> Any:
    job = journal.job(row.job_id)
    return None if job is None else job.input


def _received(journal: Journal, row: EscalationRow) -> float:
    return journal.received_at(row.job_id) or row.created_at
