"""What a job ends as: the one result constructor, the actions a finished job asks the
commit for, and the one place that counts a finished job.

* :func:`build` makes every :class:`~edgeagent.protocol.ResultMessage` the daemon sends
  (local, cache, cloud, rejections, errors); ``latency_ms`` is measured here, from the
  journal's receipt time.
* :class:`Actions` is what a step decides and the pipeline's one commit writes:
  escalations opened and closed, cloud requests to send, answers (first results or ones
  that supersede a provisional answer), cache entries and labelled examples.  The
  escalator returns them; it never writes anything itself.
* :meth:`Tally.finish` logs the canonical ``job.done`` (or ``job.rejected``) line and
  counts the job: Prometheus, the ``stats`` topic, Home Assistant's last answer.

Thread model: the event loop thread only.  Pure but for :class:`Tally`'s counters.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any

from edgeagent.logs import get_logger
from edgeagent.metrics import Metrics
from edgeagent.protocol import (
    ErrorInfo,
    EscalationInfo,
    ResultMessage,
    Source,
    Status,
    truncate,
)
from edgeagent.store import EscalationRow

log = get_logger("edgeagent.results")

INTERNAL_ERROR = ErrorInfo(code="internal_error", message="the daemon failed on this job")
"""The error of a job our own code failed on (never the producer's fault)."""


def build(
    job_id: str,
    task: str,
    status: Status,
    *,
    received_at: float | None = None,
    now: float | None = None,
    output: Any = None,
    confidence: float | None = None,
    source: Source | None = None,
    model: str | None = None,
    error: ErrorInfo | None = None,
    escalation: EscalationInfo | None = None,
    supersedes: str | None = None,
) -> ResultMessage:
    """A job's result.  ``received_at`` (wall clock, seconds since the epoch) gives
    ``latency_ms`` up to ``now`` (default: the current time); without it, no latency."""
    latency = None
    if received_at is not None:
        t = time.time() if now is None else now
        latency = round((t - received_at) * 1000.0, 3)
    return ResultMessage(
        id=job_id,
        task=task,
        status=status,
        output=output,
        confidence=confidence,
        source=source,
        model=model,
        error=error,
        escalation=escalation,
        supersedes=supersedes,
        latency_ms=latency,
    )


def revise(result: ResultMessage, **changes: Any) -> ResultMessage:
    """``result`` with some fields changed: a provisional or fallback answer made from the
    job's local result."""
    return result.model_copy(update=changes)


# -- actions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """A result to commit for a job: its first answer, or (``supersede``) one that replaces
    a provisional answer already sent."""

    job_id: str
    task: str
    result: ResultMessage
    supersede: bool = False


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """An answer to serve again for the same normalised input of ``task`` while the
    task's fingerprint (config + model) is unchanged."""

    task: str
    fingerprint: str
    input: Any
    output: Any
    confidence: float | None
    model: str | None

    @classmethod
    def of(cls, task: str, fingerprint: str, input: Any, result: ResultMessage) -> CacheEntry:
        """The cache entry of an answered job."""
        return cls(task, fingerprint, input, result.output, result.confidence, result.model)


@dataclass(frozen=True, slots=True)
class Example:
    """A cloud answer kept as a labelled example (what the learner refits on)."""

    task: str
    input: Any
    cloud_output: Any
    local_output: Any
    local_confidence: float | None
    reason: str
    model: str | None


@dataclass(frozen=True, slots=True)
class Request:
    """A cloud request to put in the outbox: published only once the commit that holds
    it (and its escalation row) is durable."""

    escalation_id: str
    topic: str
    payload: bytes
    response_topic: str
    next_attempt_at: float | None = None
    """A re-send: when the attempt after it is due (wall clock, seconds since the epoch;
    the row counts the attempt).  None: the first send, counted in the new row already."""

    @property
    def correlation(self) -> bytes:
        """The MQTT v5 Correlation Data the reply carries back: the escalation id."""
        return self.escalation_id.encode()


@dataclass(frozen=True, slots=True)
class Closed:
    """An escalation that ends: ``done`` (answered), ``failed`` (an unusable reply) or
    ``expired`` (no reply by the job's deadline).  Only a ``pending`` one can close."""

    escalation_id: str
    state: str


@dataclass(slots=True)
class Actions:
    """What one step asks the commit to write, in this order: escalation rows first (a
    request refers to its row), then requests, answers, cache entries, examples."""

    opened: list[EscalationRow] = field(default_factory=list)
    """Escalations to record, ``pending`` (with the request they send)."""
    closed: list[Closed] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)
    cache: list[CacheEntry] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)

    def extend(self, other: Actions) -> None:
        self.opened += other.opened
        self.closed += other.closed
        self.requests += other.requests
        self.answers += other.answers
        self.cache += other.cache
        self.examples += other.examples

    def __bool__(self) -> bool:
        return bool(
            self.opened
            or self.closed
            or self.requests
            or self.answers
            or self.cache
            or self.examples
        )


# -- counting -------------------------------------------------------------------------------


@dataclass
class Tally:
    """Counters of finished jobs for the ``stats`` topic (Prometheus has the full picture)."""

    metrics: Metrics
    started: float = field(default_factory=time.time)
    by_status: collections.Counter[str] = field(default_factory=collections.Counter)
    by_source: collections.Counter[str] = field(default_factory=collections.Counter)
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=2048)
    )
    cache_hits: int = 0
    last_answers: dict[str, ResultMessage] | None = None
    """Each task's last answer not yet sent to Home Assistant (None: not wanted)."""

    def finish(self, res: ResultMessage) -> None:
        """A job's result is committed: its one log line, and every counter of it."""
        if res.status == "rejected":
            code = res.error.code if res.error else ""
            self.metrics.rejected.labels(code).inc()
            self.metrics.jobs.labels(res.task, "rejected", "").inc()
            self.by_status["rejected"] += 1
            log.info("job.rejected", job_id=res.id, task=truncate(res.task, 64), code=code)
            return
        source = res.source or ""
        m = self.metrics
        m.child(m.jobs, res.task, res.status, source).inc()
        if res.latency_ms is not None:
            m.child(m.latency, res.task, source).observe(res.latency_ms / 1000.0)
            self.latencies.append(res.latency_ms)
        self.by_status[res.status] += 1
        self.by_source[source] += 1
        if source == "cache":
            self.cache_hits += 1
        if res.error is not None and res.status == "unrecognized":
            self.reasons[res.error.code] += 1
        if self.last_answers is not None:
            self.last_answers[res.task] = res  # sent by the daemon, at most once a second
        log.info(
            "job.done",
            job_id=res.id,
            task=res.task,
            status=res.status,
            source=res.source,
            confidence=res.confidence,
            latency_ms=res.latency_ms,
            provisional=res.provisional or None,
            supersedes=res.supersedes,
            code=res.error.code if res.error else None,
        )
