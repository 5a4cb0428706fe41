"""The cloud round trip, daemon side: budget, redaction, durable requests, replies, deadlines.

Thread model: everything runs on the event loop thread, inside the daemon's store
transactions, so an escalation request, the job's state and any result it produces
are committed together.

Life of an escalation::

    route says escalate → budget? → redact → escalations row `pending` + request in the outbox
      (one commit with the job's state; provisional answer now, or the job waits)
    → PUBLISH to {prefix}/cloud/requests/{task}, Response Topic {prefix}/{device}/cloud/replies
    → re-sent with capped, jittered backoff while the cloud is reachable and no reply came
    → reply: validated against the task → restore placeholders → answer / supersede / audit,
      cache it, keep it as a labelled example        (late or duplicate replies: ignored)
    → or deadline: `on_deadline` decides (local answer or `expired`)
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jsonschema

from edgeagent.backoff import backoff_delay
from edgeagent.budget import TokenBucket
from edgeagent.config import CloudConfig, TaskConfig
from edgeagent.learning.examples import is_unsure
from edgeagent.logs import get_logger
from edgeagent.metrics import Metrics
from edgeagent.pipeline import Outcome, TaskRuntime
from edgeagent.protocol import ErrorInfo, EscalationInfo, ResultMessage, Topics, load_payload
from edgeagent.redact import Redactor, restore
from edgeagent.store import EscalationRow, ReplyTarget, Store, Transaction, cache_key

log = get_logger("edgeagent.escalation")


@dataclass(frozen=True, slots=True)
class Answer:
    """A result the daemon must commit for a job: a first answer, or one that supersedes."""

    job_id: str
    task: str
    result: ResultMessage
    supersede: bool = False


class Escalator:
    def __init__(
        self,
        config: CloudConfig,
        topics: Topics,
        device: str,
        metrics: Metrics,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.topics = topics
        self.device = device
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.cloud_online = config.assume_online
        self._buckets: dict[str, TokenBucket] = {}
        self._redactors: dict[str, Redactor] = {}
        self._on_deadline: dict[str, str] = {}
        self._workers: dict[str, str] = {}  # status topic -> state
        self.in_flight = 0
        self.on_example: Callable[[str, Any, Any, str], None] | None = None
        """Called (loop thread, inside the reply's transaction) with ``(task, input, output,
        reason)`` for each cloud answer kept as a labelled example (the daemon's learner)."""

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

    def recover(self, store: Store) -> None:
        self.in_flight = len(store.pending_escalations())

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
        tx: Transaction,
        outcome: Outcome,
        rt: TaskRuntime,
        *,
        reachable: bool,
        audit: bool = False,
    ) -> ResultMessage | None:
        """Start an escalation.  Returns the result the job gets now, or None if it waits.

        For an audit the job has its local answer already; None is always returned.
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
                return None
            log.warning("escalation.over_budget", job_id=p.job.id, task=rt.name)
            return self._fallback(outcome, rt, "budget_exceeded", task.over_budget == "local")
        if not reachable and task.offline == "reject" and not audit:
            self.metrics.escalations.labels(rt.name, "rejected_offline").inc()
            return self._fallback(outcome, rt, "cloud_unavailable", False)

        esc_id = uuid.uuid4().hex
        # One call for both, so placeholders are numbered once across input and answer;
        # usually done off the event loop by the pipeline already.
        redacted: tuple[Any, dict[str, str], dict[str, int]] = outcome.redacted or self._redactors[
            rt.name
        ].redact_value([p.job.input, local_output])
        (red_input, red_local), mapping, counts = redacted
        for kind, n in counts.items():
            self.metrics.redactions.labels(rt.name, kind).inc(n)
        now = time.time()
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
        tx.add_escalation(
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
            self._send(tx, rt.name, esc_id, payload)
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
        if audit:
            return None
        if provisional:
            # The local best effort now (its own low confidence says how much to trust it);
            # a result with `supersedes` follows when the cloud answers.
            update: dict[str, Any] = {
                "provisional": True,
                "escalation": EscalationInfo(reason=reason, id=esc_id),
            }
            if local_output is not None and reason == "out_of_scope":
                # The local "label" is the out-of-scope class: not an answer.  A consumer that
                # reads only `status` must not take it for one (PROTOCOL.md, "Provisional").
                update.update(
                    status="unrecognized",
                    output=local_output,
                    error=ErrorInfo(
                        code="out_of_scope",
                        message="provisional: outside what the local model knows; "
                        "the cloud agent's answer follows",
                    ),
                )
            elif local_output is not None:
                update.update(status="ok", output=local_output, error=None)
            return outcome.result.model_copy(update=update)
        return None

    def _send(self, tx: Transaction, task: str, esc_id: str, payload: bytes) -> None:
        tx.enqueue(
            self.topics.cloud_requests(task),
            payload,
            correlation=esc_id.encode(),
            response_topic=self.topics.cloud_replies,
        )

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
            if outcome.escalate == "out_of_scope":  # the out-of-scope class is no answer
                return outcome.result.model_copy(
                    update={
                        "status": "unrecognized",
                        "output": pred.output,
                        "confidence": pred.confidence,
                        "error": ErrorInfo(code=code, message=message + " (out of scope)"),
                    }
                )
            return outcome.result.model_copy(
                update={
                    "status": "ok",
                    "output": pred.output,
                    "confidence": pred.confidence,
                    "error": ErrorInfo(code=code, message=message + " (local answer)"),
                }
            )
        return outcome.result.model_copy(
            update={
                "status": "unrecognized",
                "output": None,
                "error": ErrorInfo(code=code, message=message),
            }
        )

    # -- replies --------------------------------------------------------------------

    def on_reply(
        self,
        tx: Transaction,
        store: Store,
        payload: bytes,
        correlation: bytes | None,
        runtimes: dict[str, TaskRuntime],
        cache_ttl_s: float,
        cache_max: int,
    ) -> list[Answer]:
        """Handle a cloud reply.  Returns the results to commit (already in ``tx``'s outbox)."""
        if len(payload) > self.config.max_reply_bytes:
            self.metrics.replies.labels("too_large").inc()
            log.warning("cloud.reply_too_large", size=len(payload))
            return []
        try:
            reply = load_payload(payload)  # I-JSON: no lone surrogates, no NaN (a ValueError)
            esc_id = str(reply.get("escalation_id") or (correlation or b"").decode())
        except (ValueError, AttributeError, UnicodeDecodeError):
            self.metrics.replies.labels("not_json").inc()
            log.warning("cloud.reply_not_json")
            return []
        row = store.escalation(esc_id)
        if row is None or row.state != "pending":
            self.metrics.replies.labels("late_or_duplicate").inc()
            log.info("cloud.reply_ignored", escalation_id=esc_id[:64], known=row is not None)
            return []
        rt = runtimes.get(row.task)
        output, problem = self._validate(reply, row, rt)
        ok = problem is None
        tx.close_escalation(esc_id, "done" if ok else "failed")
        self.in_flight = max(0, self.in_flight - 1)
        self.metrics.replies.labels("ok" if ok else "invalid").inc()
        local_out = row.local.get("output")
        log.info("cloud.reply", escalation_id=esc_id, task=row.task, ok=ok, problem=problem)
        if ok and rt is not None:
            model = str(reply.get("model") or "cloud")
            conf = reply.get("confidence")
            conf = float(conf) if isinstance(conf, (int, float)) and 0 <= conf <= 1 else None
            job_input = _job_input(store, row)
            if is_unsure(reply.get("confidence"), rt.config.learn):
                # The agent doubts its own answer: it answers the job but is never learned.
                log.info("learn.unsure_not_kept", escalation_id=esc_id, task=row.task)
            else:
                tx.add_example(
                    task=row.task,
                    input=job_input,
                    cloud_output=output,
                    local_output=local_out,
                    local_confidence=row.local.get("confidence"),
                    reason=row.reason,
                    model=model,
                )
                if self.on_example is not None:
                    self.on_example(row.task, job_input, output, row.reason)
            if rt.config.cache and job_input is not None:
                tx.cache_put(
                    cache_key(row.task, rt.fingerprint, job_input),
                    row.task,
                    {"output": output, "confidence": conf, "model": model},
                    ttl_s=cache_ttl_s,
                    max_entries=cache_max,
                )
            if row.audit:
                agreed = local_out == output
                self.metrics.audits.labels(row.task, "agree" if agreed else "disagree").inc()
                return []
            result = ResultMessage(
                id=row.job_id,
                task=row.task,
                status="ok",
                output=output,
                confidence=conf,
                source="cloud",
                model=model,
                supersedes=row.job_id if row.provisional else None,
                escalation=EscalationInfo(reason=row.reason, id=esc_id),
                latency_ms=round((time.time() - _received(store, row)) * 1000.0, 3),
            )
            return self._commit(tx, store, row, result)
        if row.audit or row.provisional:
            return []  # the local answer stands
        fallback = self._local_result(row, "cloud_error", problem or "invalid reply", store)
        return self._commit(tx, store, row, fallback)

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
        self, row: EscalationRow, code: str, message: str, store: Store
    ) -> ResultMessage:
        task_local = row.local
        if task_local.get("output") is not None:
            oos = row.reason == "out_of_scope"  # the out-of-scope class is no answer
            return ResultMessage(
                id=row.job_id,
                task=row.task,
                status="unrecognized" if oos else "ok",
                output=task_local["output"],
                confidence=task_local.get("confidence"),
                source="local",
                model=task_local.get("model"),
                escalation=EscalationInfo(reason=row.reason, id=row.id),
                error=ErrorInfo(code=code, message=f"{message} (local answer below threshold)"),
                latency_ms=round((time.time() - _received(store, row)) * 1000.0, 3),
            )
        return ResultMessage(
            id=row.job_id,
            task=row.task,
            status="unrecognized",
            confidence=task_local.get("confidence"),
            source="local",
            model=task_local.get("model"),
            escalation=EscalationInfo(reason=row.reason, id=row.id),
            error=ErrorInfo(code=code, message=message),
            latency_ms=round((time.time() - _received(store, row)) * 1000.0, 3),
        )

    def _commit(
        self, tx: Transaction, store: Store, row: EscalationRow, result: ResultMessage
    ) -> list[Answer]:
        state = tx.job_state(row.job_id)
        fallback_topic = self.topics.results(row.task)
        if state == "received":
            tx.answer(row.job_id, result.to_bytes(), fallback=ReplyTarget(fallback_topic))
            return [Answer(row.job_id, row.task, result)]
        if state == "answered" and row.provisional:
            tx.supersede(row.job_id, result.to_bytes())
            return [Answer(row.job_id, row.task, result, supersede=True)]
        return []

    # -- time -----------------------------------------------------------------------

    def tick(
        self, tx: Transaction, store: Store, *, reachable: bool, now: float | None = None
    ) -> list[Answer]:
        """Expire escalations past their deadline; re-send due ones while reachable."""
        t = time.time() if now is None else now
        answers: list[Answer] = []
        for row in store.pending_escalations():
            if row.deadline_at <= t:
                tx.close_escalation(row.id, "expired")
                self.in_flight = max(0, self.in_flight - 1)
                self.metrics.escalations.labels(row.task, "expired").inc()
                log.info("escalation.expired", escalation_id=row.id, job_id=row.job_id)
                if row.audit or row.provisional:
                    continue
                has_local = row.local.get("output") is not None
                if self._on_deadline.get(row.task, "local") == "local" and has_local:
                    res = self._local_result(
                        row, "cloud_timeout", "no cloud answer by the deadline", store
                    )
                else:
                    res = ResultMessage(
                        id=row.job_id,
                        task=row.task,
                        status="expired",
                        escalation=EscalationInfo(reason=row.reason, id=row.id),
                        error=ErrorInfo(
                            code="deadline_exceeded",
                            message="no cloud answer before the job's deadline",
                        ),
                        latency_ms=round((t - _received(store, row)) * 1000.0, 3),
                    )
                answers += self._commit(tx, store, row, res)
            elif reachable and row.next_attempt_at <= t:
                self._send(tx, row.task, row.id, row.request)
                tx.escalation_sent(row.id, next_attempt_at=t + self._backoff(row.attempts + 1))
        return answers

    def resend_all_now(self, tx: Transaction, store: Store) -> None:
        """The cloud just came (back) online: re-send every pending request at once."""
        for row in store.pending_escalations():
            self._send(tx, row.task, row.id, row.request)
            tx.escalation_sent(
                row.id, next_attempt_at=time.time() + self._backoff(row.attempts + 1)
            )


def _same_bucket(bucket: TokenBucket, task: TaskConfig) -> bool:
    return bucket.rate_per_s == task.budget_per_minute / 60.0 and bucket.burst == task.budget_burst


def _job_input(store: Store, row: EscalationRow) -> Any:
    job = store.job(row.job_id)
    return None if job is None else job.input


def _received(store: Store, row: EscalationRow) -> float:
    return store.received_at(row.job_id) or row.created_at
