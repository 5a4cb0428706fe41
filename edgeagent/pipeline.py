"""One job's whole life, top to bottom: admit → batch → infer → route → escalate or answer
→ one commit → publish.  The daemon only wires this up and supervises it.

The path of a job, each step by its function (PROTOCOL.md has the wire side):

 1. receive   Pipeline.receive: mqtt.py hands a PUBLISH over; it waits in the inbox, unacked
 2. admit     Pipeline.intake_loop → commit → _admit: parse, reply topic, journal, cache, reject
 3. ack       Pipeline._committed, once the journal is durable: PUBACK, then Pipeline.schedule
              (an ``inline`` backend answers at admission instead, Pipeline._answer_inline:
              steps 4-7 in the admission's transaction, one commit for journal and result)
 4. batch     TaskRuntime._worker: the task's queue, micro-batches of up to max_batch
 5. infer     TaskRuntime._run_batch → _infer: a worker thread, a deadline, a slot (inline: loop)
 6. route     TaskRuntime._route → router.decide: answer, escalate or unrecognized
 7. settle    Pipeline.deliver → commit → _settle: the answer, or Escalator.escalate (+ audit);
              the cloud's reply or deadline later: Escalator.on_reply / tick return Actions
 8. commit    Pipeline.commit → _write → _apply: escalation rows, requests, results, cache,
              examples (what each step returned as results.Actions): one transaction
 9. count     Pipeline._committed → results.Tally.finish: the job.done line, every counter
10. publish   Pipeline._published → pump: outbox rows in seq order; on_puback → flush_acked

Invariants: nothing is acknowledged before the journal commit that holds it; nothing is
published before the commit that holds it (a cloud request included); an outbox row
goes only after the broker's PUBACK.  :meth:`Pipeline.commit` is the one place that
writes (the escalator only returns what to write): it takes a :class:`Work`
(messages to admit, finished outcomes, cloud messages, the escalation timer, outbox rows
to delete) and hands it to the group committer (:mod:`edgeagent.commit`), so all the work
of one event-loop turn shares one transaction (one ``fsync``).

Thread model: everything here runs on the event loop except ``Backend.infer_batch``,
which runs in a worker thread (an ``inline`` backend answers a small batch on the loop).
A stuck inference does not stall the loop: the jobs of that batch get an ``error``
result at ``timeout_s`` while the thread keeps its concurrency slot until it really
returns (so stuck threads cannot pile up).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgeagent import router
from edgeagent.backends import Backend, Prediction, create
from edgeagent.backends.base import INLINE_MAX_CHARS, runs_inline
from edgeagent.commit import GroupCommitter
from edgeagent.config import Settings, TaskConfig
from edgeagent.escalation import Escalator
from edgeagent.inputs import NO_CONTENT as NO_CONTENT_FAILURE
from edgeagent.inputs import has_content, model_input
from edgeagent.logs import get_logger
from edgeagent.metrics import Metrics
from edgeagent.mqtt import Inbound
from edgeagent.protocol import (
    ID_CONFLICT,
    REPLY_TOPIC_NOT_ALLOWED,
    UNPROCESSABLE,
    ErrorInfo,
    Job,
    Limits,
    Rejection,
    ResultMessage,
    Status,
    Topics,
    derive_job_id,
    job_id_of,
    parse_job,
    publishable,
    reply_to_of,
    truncate,
)
from edgeagent.redact import Redactor
from edgeagent.results import INTERNAL_ERROR, Actions, Answer, CacheEntry, Example, Tally, build
from edgeagent.store import ReplyTarget, Store, StoreError, Transaction, cache_key

log = get_logger("edgeagent.pipeline")

INTAKE_BATCH = 256
"""Job messages admitted per commit, at most."""
MAX_OPEN_JOBS = 2048
"""Jobs journaled but not answered before intake pauses (the broker holds the rest)."""
QOS0_INBOX_CAP = 10000
"""QoS 0 jobs (no delivery guarantee) dropped beyond this many waiting."""
REDACT_INLINE_CHARS = 128
"""A batch to redact with at most this many characters (input and local output) is
redacted on the event loop: ~0.05 ms for usual text, ~1 ms at worst (a crafted run of
digits and separators: phone-number candidates, ~7 µs a character), against ~0.5 ms of
loop time for a thread hand-off on a busy device."""
WORKER_SLICE_S = 0.005
"""Longest a task worker answers queued jobs inline (on the loop) before it yields."""
ESCALATION_TICK_S = 0.5
"""How often pending escalations are expired or re-sent (seconds)."""


@dataclass(slots=True)
class PendingJob:
    job: Job
    received_at: float
    """Wall-clock receipt time (seconds since the epoch), from the journal."""
    deadline_at: float = field(init=False)

    def __post_init__(self) -> None:
        self.deadline_at = self.received_at + self.job.deadline_ms / 1000.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """A job's local result.  ``escalate`` (a reason) asks the pipeline to involve the cloud;
    ``result`` is then what the job gets if the cloud cannot be asked."""

    pending: PendingJob
    result: ResultMessage
    cacheable: bool = False
    prediction: Prediction | None = None
    escalate: str | None = None
    redacted: tuple[Any, dict[str, str], dict[str, int]] | None = None
    """``[input, local output]`` as they may leave the device, computed off the event loop
    (``Redactor.redact_value``); None: the escalator redacts when it needs to."""
    no_room: bool = False
    """The task's escalation budget was spent when this was routed: the escalator treats
    it as over budget (and nothing was redacted for it)."""


@dataclass(slots=True)
class Work:
    """What one :meth:`Pipeline.commit` writes (in this order)."""

    messages: list[Inbound] = field(default_factory=list)
    """Job messages to admit (acknowledged once committed)."""
    outcomes: list[Outcome] = field(default_factory=list)
    """Jobs the task workers finished."""
    cloud: list[Inbound] = field(default_factory=list)
    """Cloud replies and agent statuses (acknowledged once committed)."""
    tick: bool = False
    """Run the escalation timer: expire escalations past their deadline, re-send due ones."""
    acked: list[int] = field(default_factory=list)
    """Outbox rows the broker acknowledged: deleted (alone, this needs no ``fsync``)."""
    failed: bool = False
    """Set when nothing of it was committed (it went back to where it waits)."""

    def __bool__(self) -> bool:
        return bool(self.messages or self.outcomes or self.cloud or self.tick or self.acked)

    @property
    def durable(self) -> bool:
        """Whether its commit must survive a power cut.  A lost outbox delete only means
        the row is published again after the restart (consumers dedupe by job id)."""
        return bool(self.messages or self.outcomes or self.cloud or self.tick)

    @property
    def where(self) -> str:
        """Which step a store failure is reported for."""
        if self.messages:
            return "intake"
        if self.outcomes:
            return "deliver"
        if self.cloud:
            return "cloud_reply"
        return "escalation" if self.tick else "outbox_done"


@dataclass(frozen=True, slots=True)
class _Written:
    """What a committed :class:`Work` still has to do once it is durable."""

    scheduled: list[tuple[Job, float]]
    finished: list[ResultMessage]
    examples: list[Example]
    cloud_failed: bool


class Supervisor(Protocol):
    """What the pipeline asks of the daemon that runs it."""

    @property
    def degraded(self) -> str | None:
        """Why the store refuses writes (None: it takes them)."""

    def accepting(self) -> bool:
        """Whether new jobs may be admitted (False while draining)."""

    def store_trouble(self, exc: BaseException, where: str) -> None:
        """A store read or write failed: degrade (disk full, I/O) or stop (damaged file)."""


class Broker(Protocol):
    """The MQTT side the pipeline uses (:class:`edgeagent.mqtt.MqttAdapter`)."""

    @property
    def connected(self) -> bool: ...

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation: bytes | None = None,
        response_topic: str | None = None,
    ) -> int | None: ...

    def ack(self, message: Inbound) -> None: ...


class Pipeline:
    """The path of every job, and the one commit that makes each step durable.

    Runs on the event loop thread.  ``store``, ``mqtt`` and ``runtimes`` are set by the
    daemon (``runtimes`` is replaced on reload).
    """

    def __init__(
        self,
        settings: Settings,
        topics: Topics,
        limits: Limits,
        metrics: Metrics,
        escalator: Escalator,
        supervisor: Supervisor,
        inbox: collections.deque[Inbound] | None = None,
    ) -> None:
        self.settings = settings
        self.topics = topics
        self.limits = limits
        self.metrics = metrics
        self.escalator = escalator
        self.supervisor = supervisor
        self._store: Store | None = None
        self.committer: GroupCommitter | None = None
        """Runs the commits of one event-loop turn in one transaction (set with ``store``)."""
        self.mqtt: Broker | None = None
        self.runtimes: dict[str, TaskRuntime] = {}
        self.tally = Tally(metrics, last_answers={} if settings.homeassistant.enabled else None)
        self.on_example: Callable[[str, Any, Any, str], None] | None = None
        """Called after the commit with ``(task, input, output, reason)`` of each cloud
        answer kept as a labelled example (the daemon's learner)."""
        self.inbox: collections.deque[Inbound] = collections.deque() if inbox is None else inbox
        """Job messages received, not yet admitted (nor acknowledged)."""
        self.open: set[str] = set()
        """Ids of jobs scheduled and not yet answered."""
        self.inflight: dict[int, int] = {}
        """MQTT packet id -> outbox seq of each publish awaiting its PUBACK."""
        self.wake_intake = asyncio.Event()
        self.wake_outbox = asyncio.Event()
        self._last_sent_seq = 0
        self._acked: list[int] = []
        self._flush_scheduled = False
        self._stash: list[Outcome] = []  # results computed while the store refused writes
        self._cloud_backlog: list[Inbound] = []  # cloud messages not yet committed
        self._finished: list[ResultMessage] = []  # results written in the open transaction
        self._examples: list[Example] = []  # examples written in the open transaction

    @property
    def store(self) -> Store | None:
        return self._store

    @store.setter
    def store(self, store: Store | None) -> None:
        self._store = store
        self.committer = None
        if store is not None:
            self.committer = GroupCommitter(
                store, on_error=self.supervisor.store_trouble, committed=self._published
            )

    # -- 1. receive -----------------------------------------------------------------

    def receive(self, msg: Inbound) -> None:
        """A job PUBLISH: it waits in the inbox, unacknowledged (the broker keeps it)."""
        if msg.qos == 0 and len(self.inbox) >= QOS0_INBOX_CAP:
            log.warning("job.qos0_dropped", topic=msg.topic)  # QoS 0 carries no guarantee
            return
        self.inbox.append(msg)
        self.wake_intake.set()

    def recover(self) -> None:
        """Assume we were killed last time: re-run every job the journal holds open."""
        assert self.store is not None
        waiting = self.store.pending_escalation_jobs()  # these wait for the cloud, not a model
        jobs = [j for j in self.store.open_jobs() if j.id not in waiting]
        for job in jobs:
            received = self.store.received_at(job.id) or time.time()
            self.schedule(job, received)
        if jobs or self.store.outbox_depth:
            log.info("daemon.recovered", jobs=len(jobs), outbox=self.store.outbox_depth)

    # -- 2. admit -------------------------------------------------------------------

    async def intake_loop(self) -> None:
        """Admit the inbox, a batch per commit, while intake is open, the store takes
        writes and there is room (the broker holds whatever waits behind)."""
        while True:
            await self.wake_intake.wait()
            self.wake_intake.clear()
            while self.inbox and self._may_admit():
                batch = [self.inbox.popleft() for _ in range(min(INTAKE_BATCH, len(self.inbox)))]
                work = Work(messages=batch)
                self.commit(work)
                await asyncio.sleep(0)  # the group commit runs before this task resumes
                if work.failed:
                    break  # the store failed (the daemon degraded or stops): wait

    def _may_admit(self) -> bool:
        sup = self.supervisor
        return sup.accepting() and sup.degraded is None and self.has_capacity()

    def has_capacity(self) -> bool:
        """Room for more jobs: open jobs and outbox rows below their caps."""
        assert self.store is not None
        return (
            len(self.open) < MAX_OPEN_JOBS
            and self.store.outbox_depth < self.settings.store.outbox_max_rows
        )

    def _admit_isolated(
        self, tx: Transaction, msg: Inbound, scheduled: list[tuple[Job, float]]
    ) -> None:
        """Admit one message; whatever it holds, it cannot abort the rest of the batch.

        A message our code fails on is rolled back alone and answered ``rejected`` with
        ``unprocessable``; if even that cannot be written it is quarantined (acknowledged
        with the batch, counted, logged once with a truncated payload) so that it never
        comes back in a crash loop.  Store failures (disk full, corruption) fail the batch.
        """
        mine: list[tuple[Job, float]] = []
        task = self.topics.task_of(msg.topic) or msg.topic.rsplit("/", 1)[-1]
        if not publishable(self.topics.results(task)):
            # No topic to answer on (a job topic of ~64 KiB makes its results topic longer
            # than MQTT allows): answering would fail at every publish, forever.
            self._quarantine(msg, "its results topic is not a valid MQTT topic")
            return
        mark = len(self._finished)
        try:
            with tx.savepoint():
                self._admit(tx, msg, mine)
            scheduled.extend(mine)
            return
        except StoreError:
            raise
        except Exception as exc:
            del self._finished[mark:]
            log.error(
                "job.admit_failed",
                topic=truncate(msg.topic, 120),
                error=truncate(repr(exc), 300),
                payload=truncate(repr(msg.payload), 200),
            )
            failure = exc
        rej = Rejection(
            job_id_of(msg.payload, derive_job_id(msg.topic, msg.payload, msg.correlation)),
            UNPROCESSABLE,
            f"the daemon could not process this job ({type(failure).__name__}); "
            "it will not be retried",
        )
        try:
            with tx.savepoint():
                self._reject(tx, rej, task, ReplyTarget(self.topics.results(task), msg.correlation))
        except StoreError:
            raise
        except Exception as exc:
            del self._finished[mark:]
            self._quarantine(msg, repr(exc))

    def _quarantine(self, msg: Inbound, error: str) -> None:
        self.metrics.quarantined.inc()
        log.error(
            "job.quarantined",
            topic=truncate(msg.topic, 120),
            error=truncate(error, 300),
            payload=truncate(repr(msg.payload), 200),
        )

    def _admit(self, tx: Transaction, msg: Inbound, scheduled: list[tuple[Job, float]]) -> None:
        """Parse, pick the reply target, journal; then answer from the cache, replay a
        stored result, or leave the job to be scheduled."""
        task = self.topics.task_of(msg.topic) or msg.topic.rsplit("/", 1)[-1]
        derived = derive_job_id(msg.topic, msg.payload, msg.correlation)
        default_target = ReplyTarget(self.topics.results(task), msg.correlation)
        wanted = msg.response_topic or reply_to_of(msg.payload)
        prefixes = self.settings.reply_prefixes
        refusal = None if wanted is None else self.topics.reply_refusal(wanted, prefixes)
        allowed = refusal is None
        target = ReplyTarget(wanted, msg.correlation) if wanted and allowed else default_target
        parsed = parse_job(
            msg.payload,
            task=task,
            derived_id=derived,
            limits=self.limits,
            known_tasks=frozenset(self.runtimes),
        )
        if not allowed:
            # Refused reply topics are answered on the task's results topic, never on theirs.
            rej_id = parsed.id
            parsed = Rejection(
                rej_id,
                REPLY_TOPIC_NOT_ALLOWED,
                f"reply topic {truncate(wanted or '', 80)!r} refused: {refusal}",
            )
        if isinstance(parsed, Rejection):
            self._reject(tx, parsed, task, target)
            return
        adm = tx.admit(parsed, target, redelivery=msg.dup)
        if adm.state == "conflict":
            self._reject(
                tx,
                Rejection(
                    parsed.id,
                    ID_CONFLICT,
                    f"job id {parsed.id!r} is already used by task {truncate(adm.task or '', 64)!r}"
                    " on this device; ids are device-wide: send this job with a new id",
                ),
                task,
                target,
            )
            return
        if adm.state == "new":
            received = time.time()
            if not self._answer_from_cache(tx, parsed, received):
                scheduled.append((parsed, received))
        elif adm.state == "answered" and adm.result is not None:
            tx.enqueue(target.topic, adm.result, target.correlation)
            log.info("job.replayed", job_id=parsed.id, task=task)
        else:
            log.info("job.duplicate", job_id=parsed.id, task=task, state=adm.state)

    def _reject(self, tx: Transaction, rej: Rejection, task: str, target: ReplyTarget) -> None:
        """Answer a job that is not journaled (invalid, refused, conflicting id)."""
        res = build(rej.id, task, "rejected", error=ErrorInfo(code=rej.code, message=rej.message))
        tx.enqueue(target.topic, res.to_bytes(), target.correlation)
        self._finished.append(res)

    def _answer_from_cache(self, tx: Transaction, job: Job, received: float) -> bool:
        """Answer a new job from the cache (same task, fingerprint and normalised input)."""
        rt = self.runtimes.get(job.task)
        if (
            rt is None
            or not (self.settings.cache.enabled and rt.config.cache)
            or job.escalate == "always"
        ):
            return False
        assert self.store is not None
        hit = self.store.cache_get(cache_key(job.task, rt.fingerprint, job.input))
        self.metrics.child(self.metrics.cache, job.task, "hit" if hit else "miss").inc()
        if hit is None:
            return False
        res = build(
            job.id,
            job.task,
            "ok",
            received_at=received,
            output=hit.get("output"),
            confidence=hit.get("confidence"),
            source="cache",
            model=hit.get("model"),
        )
        self._apply(tx, Actions(answers=[Answer(job.id, job.task, res)]))
        return True

    # -- 3.-6. schedule, batch, infer, route (TaskRuntime, below) ---------------------

    def schedule(self, job: Job, received_at: float) -> None:
        """Hand a journaled job to its task's batching workers."""
        rt = self.runtimes.get(job.task)
        self.open.add(job.id)
        self.metrics.level(self.metrics.queue_depth, len(self.open))
        if rt is None:
            # The task was removed by a reload after the job was journaled.
            err = ErrorInfo(code="unknown_task", message=f"task {job.task!r} was removed")
            res = build(job.id, job.task, "rejected", error=err)
            self.deliver([Outcome(PendingJob(job, received_at), res)])
            return
        rt.queue.put_nowait(PendingJob(job, received_at))

    def _answer_inline(
        self, tx: Transaction, scheduled: list[tuple[Job, float]], reachable: bool
    ) -> list[tuple[Job, float]]:
        """Steps 4-7 within the admission's transaction, for the jobs of ``inline`` backends
        (:meth:`TaskRuntime.answer_inline`): each is journaled and answered by one commit,
        acknowledged and published after it.  Returns the jobs left to schedule."""
        by_task: dict[str, list[PendingJob]] = {}
        for job, received in scheduled:
            by_task.setdefault(job.task, []).append(PendingJob(job, received))
        left: list[tuple[Job, float]] = []
        for task, batch in by_task.items():
            rt = self.runtimes.get(task)
            rest = batch
            if rt is not None:
                try:
                    done, rest = rt.answer_inline(batch)
                except Exception:  # our bug: the task's workers answer them instead
                    log.exception("task.inline_failed", task=task, batch=len(batch))
                    done = []
                for o in done:
                    self._settle_isolated(tx, o, reachable)
            left += [(p.job, p.received_at) for p in rest]
        return left

    def requeue(self, old: TaskRuntime) -> None:
        """A runtime is retired (reload): its queued jobs go to the task's new runtime (or
        are rejected when the task is gone)."""
        while not old.queue.empty():
            p = old.queue.get_nowait()
            self.open.discard(p.job.id)
            self.schedule(p.job, p.received_at)

    # -- 7. settle ------------------------------------------------------------------

    def deliver(self, outcomes: list[Outcome]) -> None:
        """A task worker finished a batch (:meth:`TaskRuntime.start` gets this callback)."""
        self.commit(Work(outcomes=list(outcomes)))

    def _settle_isolated(self, tx: Transaction, o: Outcome, reachable: bool) -> None:
        """Settle one outcome; a failure of our own code answers the job ``error`` instead."""
        job = o.pending.job
        mark = len(self._finished), len(self._examples)
        try:
            with tx.savepoint():
                self._settle(tx, o, reachable)
            return
        except StoreError:
            raise
        except Exception as exc:
            del self._finished[mark[0] :], self._examples[mark[1] :]
            log.error("job.commit_failed", job_id=job.id, task=job.task, error=repr(exc))
        res = build(job.id, job.task, "error", error=INTERNAL_ERROR)
        try:
            with tx.savepoint():
                self._apply(tx, Actions(answers=[Answer(job.id, job.task, res)]))
        except StoreError:
            raise
        except Exception as exc:
            del self._finished[mark[0] :]
            self.metrics.quarantined.inc()
            log.error("job.quarantined", job_id=job.id, task=job.task, error=repr(exc))

    def _settle(self, tx: Transaction, o: Outcome, reachable: bool) -> None:
        """A finished job: its answer now, or an escalation (the job waits for the cloud,
        or gets a provisional or fallback answer); a confident answer is cached, and
        audited at the task's ``audit_rate``."""
        job = o.pending.job
        rt = self.runtimes.get(job.task)
        if o.escalate and rt is not None and rt.cloud_available:
            # The escalation (row, request), and the job's answer if it gets one now (else
            # it waits for the cloud, durable in the escalations table).
            self._apply(tx, self.escalator.escalate(o, rt, reachable=reachable))
            return
        acts = Actions(answers=[Answer(job.id, job.task, o.result)])
        if o.cacheable and rt is not None:
            acts.cache.append(CacheEntry.of(job.task, rt.fingerprint, job.input, o.result))
        self._apply(tx, acts)
        if o.cacheable and rt is not None and self.escalator.wants_audit(rt.config):
            # After the answer, so that the job's result goes out before the audit request.
            self._apply(tx, self.escalator.escalate(o, rt, reachable=reachable, audit=True))

    def on_cloud_message(self, msg: Inbound) -> None:
        """A cloud reply or an agent's status: committed, then acknowledged."""
        self.commit(Work(cloud=[msg]))

    def _cloud_isolated(self, tx: Transaction, msg: Inbound) -> bool:
        """One cloud message; False if our code failed on it (rolled back alone; the
        escalation stays pending: re-sent, or its deadline decides)."""
        assert self.store is not None
        mark = len(self._finished), len(self._examples)
        try:
            with tx.savepoint():
                if msg.topic != self.topics.cloud_replies:
                    if self.escalator.on_status(msg.topic, msg.payload):
                        self._apply(tx, self.escalator.resend_all_now(self.store))
                else:
                    acts = self.escalator.on_reply(
                        self.store, msg.payload, msg.correlation, self.runtimes
                    )
                    self._apply(tx, acts)
            return True
        except StoreError:
            raise
        except Exception as exc:
            del self._finished[mark[0] :], self._examples[mark[1] :]
            log.error(
                "cloud.reply_failed",
                topic=truncate(msg.topic, 120),
                error=truncate(repr(exc), 300),
                payload=truncate(repr(msg.payload), 200),
            )
            return False

    async def escalation_loop(self) -> None:
        """While escalations are pending: expire those past their deadline, re-send due ones."""
        while True:
            await asyncio.sleep(ESCALATION_TICK_S)
            if not self.escalator.in_flight or self.supervisor.degraded is not None:
                continue  # nothing pending: no transaction (an fsync with synchronous=full)
            self.commit(Work(tick=True))

    def cloud_reachable(self) -> bool:
        return self.escalator.cloud_online and self.mqtt is not None and self.mqtt.connected

    # -- 8. commit ------------------------------------------------------------------

    def commit(self, work: Work) -> None:
        """The one commit: every write of ``work`` in one transaction, shared with the
        other work of this event-loop turn (:class:`~edgeagent.commit.GroupCommitter`);
        then, only once it is durable, acknowledge, schedule, count and publish.

        A message or outcome our own code fails on is isolated (a savepoint).  A store
        failure commits nothing: ``work.failed`` is set, each piece of it goes back to
        where it waits (job messages to the head of the inbox, unacknowledged; results to
        the stash; cloud messages to the backlog; acknowledged outbox rows to the next
        delete; :meth:`resume` commits them) and the daemon degrades or stops
        (:meth:`Supervisor.store_trouble`).
        """
        if not work:
            return
        if self.committer is None or self.supervisor.degraded is not None:
            self._park(work)
            return
        self.committer.submit(
            functools.partial(self._write, work),
            functools.partial(self._committed, work),
            undo=functools.partial(self._undo, work),
            where=work.where,
            durable=work.durable,
        )

    def _write(self, work: Work, tx: Transaction) -> _Written:
        """Inside the transaction: admit, settle, handle the cloud, run the timer."""
        assert self.store is not None
        reachable = self.cloud_reachable()
        scheduled: list[tuple[Job, float]] = []
        cloud_failed = False
        self._finished, self._examples = [], []
        for msg in work.messages:
            self._admit_isolated(tx, msg, scheduled)
        if scheduled:
            scheduled = self._answer_inline(tx, scheduled, reachable)
        for o in work.outcomes:
            self._settle_isolated(tx, o, reachable)
        for msg in work.cloud:
            cloud_failed |= not self._cloud_isolated(tx, msg)
        if work.tick:
            self._apply(tx, self.escalator.tick(self.store, reachable=reachable))
        if work.acked:
            tx.outbox_done(work.acked)
        return _Written(scheduled, self._finished, self._examples, cloud_failed)

    def _committed(self, work: Work, done: _Written) -> None:
        """Durable now: only at this point is anything acknowledged, counted or published
        (the group's publish follows in :meth:`_published`)."""
        if self.mqtt is not None:
            for msg in work.messages + work.cloud:
                self.mqtt.ack(msg)
        if done.cloud_failed:
            self._resync_escalator()
        for o in work.outcomes:
            self.open.discard(o.pending.job.id)
        for job, received in done.scheduled:
            self.schedule(job, received)
        for res in done.finished:
            self.tally.finish(res)
        if self.on_example is not None:
            for ex in done.examples:
                self.on_example(ex.task, ex.input, ex.cloud_output, ex.reason)
        self.metrics.level(self.metrics.escalations_in_flight, self.escalator.in_flight)
        self.metrics.level(self.metrics.queue_depth, len(self.open))
        if work.outcomes or work.acked:
            self.wake_intake.set()  # answered jobs and sent results make room

    def _published(self) -> None:
        """After each group commit: publish what it queued in the outbox."""
        if self.store is not None:
            self.metrics.level(self.metrics.outbox_depth, self.store.outbox_depth)
        if self.pump():
            self.wake_outbox.set()

    def _undo(self, work: Work) -> None:
        """Its transaction rolled back: what the escalator counted in it is undone too."""
        self._park(work)
        if work.outcomes or work.cloud or work.tick:
            self._resync_escalator()

    def _park(self, work: Work) -> None:
        """Nothing of ``work`` was committed: each piece goes back to where it waits."""
        work.failed = True
        self.inbox.extendleft(reversed(work.messages))  # unacknowledged: the broker holds more
        self._stash.extend(work.outcomes)  # the jobs stay `received` in the journal
        self._cloud_backlog.extend(work.cloud)  # unacknowledged until committed
        self._acked = work.acked + self._acked  # deleted later: a restart would resend them

    def _apply(self, tx: Transaction, acts: Actions) -> None:
        """Write what a step decided: escalation rows, cloud requests (to the outbox: sent
        once committed), each result to the journal and the outbox of every reply target,
        cache entries, labelled examples."""
        for row in acts.opened:
            tx.add_escalation(row)
        for closed in acts.closed:
            tx.close_escalation(closed.escalation_id, closed.state)
        for r in acts.requests:
            tx.enqueue(r.topic, r.payload, r.correlation, r.response_topic)
            if r.next_attempt_at is not None:  # a re-send: count the attempt
                tx.escalation_sent(r.escalation_id, next_attempt_at=r.next_attempt_at)
        for a in acts.answers:
            payload = a.result.to_bytes()
            fallback = ReplyTarget(self.topics.results(a.task))
            written = bool(tx.answer(a.job_id, payload, fallback=fallback))
            if not written and a.supersede:  # the cloud's answer after a provisional one
                written = bool(tx.supersede(a.job_id, payload))
            if written:
                self._finished.append(a.result)
        for c in acts.cache:
            rt = self.runtimes.get(c.task)
            if rt is None or not (self.settings.cache.enabled and rt.config.cache):
                continue
            tx.cache_put(
                cache_key(c.task, c.fingerprint, c.input),
                c.task,
                {"output": c.output, "confidence": c.confidence, "model": c.model},
                ttl_s=self.settings.cache.ttl_s,
                max_entries=self.settings.cache.max_entries,
            )
        for e in acts.examples:
            tx.add_example(
                task=e.task,
                input=e.input,
                cloud_output=e.cloud_output,
                local_output=e.local_output,
                local_confidence=e.local_confidence,
                reason=e.reason,
                model=e.model,
            )
            self._examples.append(e)

    @property
    def waiting(self) -> int:
        """Results and cloud messages waiting for the store to take writes again."""
        return len(self._stash) + len(self._cloud_backlog)

    def resume(self) -> None:
        """The store takes writes again: commit what waited, then let everything flow."""
        stash, self._stash = self._stash, []
        backlog, self._cloud_backlog = self._cloud_backlog, []
        self.commit(Work(outcomes=stash, cloud=backlog))
        self.flush_acked()
        self.wake_intake.set()
        self.wake_outbox.set()

    def close(self, *, commit: bool = True) -> None:
        """At shutdown: commit what waits for the group commit (``commit=False``, for a
        damaged store: drop it), then refuse new writes."""
        if commit:
            self.flush_acked()
        if self.committer is not None:
            self.committer.close(commit=commit)

    def _resync_escalator(self) -> None:
        # A rolled-back escalation leaves the in-memory in-flight count ahead of the table.
        with contextlib.suppress(StoreError, sqlite3.Error):
            assert self.store is not None
            self.escalator.recover(self.store)

    # -- 10. publish ----------------------------------------------------------------

    async def outbox_loop(self) -> None:
        while True:
            await self.wake_outbox.wait()
            self.wake_outbox.clear()
            if self.pump():
                self.wake_outbox.set()
                await asyncio.sleep(0)

    def pump(self) -> bool:
        """Publish outbox rows not yet in flight, up to the window.  True if more are waiting.

        Called right after each commit (results go out without another loop turn) and by
        the outbox task on reconnect and PUBACKs.  Rows go out in ``seq`` order.
        """
        if self.store is None or self.mqtt is None or not self.mqtt.connected:
            return False
        room = self.settings.mqtt.max_inflight - len(self.inflight)
        if room <= 0 or self._last_sent_seq >= self.store.last_seq:
            return False
        try:
            rows = self.store.outbox(after=self._last_sent_seq, limit=room)
        except StoreError as exc:
            self.supervisor.store_trouble(exc, "outbox")
            return False
        for row in rows:
            mid = self.mqtt.publish(
                row.topic,
                row.payload,
                correlation=row.correlation,
                response_topic=row.response_topic,
            )
            if mid is None:
                return False
            self.inflight[mid] = row.seq
            self._last_sent_seq = row.seq
        self.metrics.level(self.metrics.outbox_depth, self.store.outbox_depth)
        return len(rows) == room

    def on_puback(self, mid: int) -> None:
        """The broker has a publish of ours: its outbox row can go (batched, next turn)."""
        seq = self.inflight.pop(mid, None)
        if seq is None or seq < 0:  # not an outbox row (the `stopped` status)
            return
        self._acked.append(seq)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush_acked)
        self.wake_outbox.set()

    def puback_may_wait(self) -> bool:
        """Whether a PUBACK may wait for the loop's next wake-up: the publish window is
        less than half full (called by the MQTT adapter: reads only)."""
        return len(self.inflight) < self.settings.mqtt.max_inflight // 2

    def on_publish_refused(self, mid: int, reason_code: int, reason: str) -> None:
        """The broker refused an outbox publish (v5 PUBACK >= 0x80, e.g. its ACL): resending
        cannot help, so the row becomes a dead letter (the result stays in the journal;
        `edgeagent results JOB_ID` shows both)."""
        seq = self.inflight.pop(mid, None)
        if seq is None or seq < 0 or self.store is None:
            return  # not an outbox row (status); mqtt.py has logged it
        dead = self.store.dead_letter(seq, reason_code, reason)
        self.metrics.dead_letters.labels(_reason_label(reason)).inc()
        self.metrics.level(self.metrics.outbox_depth, self.store.outbox_depth)
        log.error(
            "outbox.dead_letter",
            seq=seq,
            job_id=dead.job_id if dead else None,
            topic=truncate(dead.topic, 120) if dead else None,
            reason_code=reason_code,
            reason=reason,
            hint="the broker refused it (ACL?); `edgeagent results JOB_ID` shows it",
        )
        self.wake_outbox.set()

    def flush_acked(self) -> None:
        """Delete the outbox rows the broker acknowledged (with the next group commit)."""
        self._flush_scheduled = False
        if self._acked:
            acked, self._acked = self._acked, []
            self.commit(Work(acked=acked))

    def idle(self) -> bool:
        """No job open, waiting or being published."""
        pending = self.committer.pending if self.committer is not None else 0
        return not (self.open or self.inbox or self.inflight or pending)


def _reason_label(reason: str) -> str:
    """A metric label from an MQTT reason string: "Not authorized" -> "not_authorized"."""
    return "_".join(reason.lower().split())[:40] or "unknown"


class TaskRuntime:
    """A loaded backend for one task plus its micro-batching workers."""

    def __init__(self, name: str, config: TaskConfig, backend: Backend, metrics: Metrics) -> None:
        self.name = name
        self.config = config
        self.backend = backend
        self.metrics = metrics
        self.fingerprint = f"{config.fingerprint()}:{backend.fingerprint}"
        self.queue: asyncio.Queue[PendingJob] = asyncio.Queue()
        self._slots = asyncio.Semaphore(config.concurrency)
        # One more thread than slots, so a finished call can hand over while another is stuck.
        self._executor = ThreadPoolExecutor(
            max_workers=config.concurrency + 1, thread_name_prefix=f"infer-{name}"
        )
        self._workers: list[asyncio.Task[None]] = []
        self._inline = runs_inline(backend)
        self.answers_at_admission = self._inline
        """Fresh jobs are answered in their admission's transaction when possible
        (:meth:`answer_inline`); an ``inline`` backend's default."""
        self.cloud_available = False
        """Set by the daemon: the cloud is configured and this task may use it."""
        self.redactor: Redactor | None = None
        """Set by the daemon: what this task's cloud requests are redacted with."""
        self.may_escalate: Callable[[], bool] = lambda: True
        """Set by the daemon: False when budget or in-flight cap would refuse escalations
        now (redacting for them would be wasted work)."""

    @classmethod
    def build(cls, name: str, config: TaskConfig, metrics: Metrics) -> TaskRuntime:
        """Create, load and warm up (blocking: call from a worker thread)."""
        backend = create(name, config)
        backend.load()
        backend.warmup()
        return cls(name, config, backend, metrics)

    @property
    def labels(self) -> list[str]:
        """The label set (classify): the task's, else the backend's rules or model labels."""
        if self.config.labels:
            return list(self.config.labels)
        rules = getattr(self.config.backend, "rules", None)
        if rules:
            return list(dict.fromkeys(r.label for r in rules))
        return list(getattr(self.backend, "labels", []) or [])

    def start(self, deliver: Callable[[list[Outcome]], None]) -> None:
        for i in range(self.config.concurrency):
            task = asyncio.get_running_loop().create_task(
                self._worker(deliver), name=f"task:{self.name}:worker{i}"
            )
            self._workers.append(task)

    async def stop(self) -> None:
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.backend.close()

    # -- workers ------------------------------------------------------------------

    async def _worker(self, deliver: Callable[[list[Outcome]], None]) -> None:
        max_wait = self.config.max_wait_ms / 1000.0
        yield_at = 0.0
        while True:
            if self.queue.empty():
                first = await self.queue.get()
                yield_at = time.monotonic() + WORKER_SLICE_S
            else:
                first = self.queue.get_nowait()
            batch = [first]
            until = time.monotonic() + max_wait
            while len(batch) < self.config.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = until - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except (TimeoutError, asyncio.TimeoutError):  # distinct classes on 3.10
                    break
            try:
                outcomes = await self._redact_for_cloud(await self._run_batch(batch))
            except Exception:  # a bug on one batch must not end the worker (and the task)
                log.exception("task.batch_failed", task=self.name, batch=len(batch))
                outcomes = [
                    Outcome(p, self._result(p, "error", error=INTERNAL_ERROR)) for p in batch
                ]
            deliver(outcomes)
            if time.monotonic() >= yield_at:
                # Inline batches do not yield: after a slice of them, let the loop run
                # (commit, publish, receive).  Within a slice their results share a commit.
                await asyncio.sleep(0)
                yield_at = time.monotonic() + WORKER_SLICE_S

    async def _run_batch(self, batch: list[PendingJob]) -> list[Outcome]:
        outcomes, live = self._triage(batch)
        if not live:
            return outcomes
        started = time.monotonic()
        try:
            predictions = await self._infer([model_input(p.job.input) for p in live])
        except (TimeoutError, asyncio.TimeoutError):  # distinct classes on 3.10
            self.metrics.timeouts.labels(self.name).inc()
            log.error(
                "inference.timeout",
                task=self.name,
                batch=len(live),
                timeout_s=self.config.timeout_s,
            )
            err = ErrorInfo(
                code="inference_timeout", message="local inference timed out; retry later"
            )
            return outcomes + [Outcome(p, self._result(p, "error", error=err)) for p in live]
        except Exception as exc:  # a backend bug must not kill the worker
            return outcomes + self._failed(live, exc)
        return outcomes + self._routed(live, predictions, started)

    def answer_inline(self, batch: list[PendingJob]) -> tuple[list[Outcome], list[PendingJob]]:
        """Answer fresh jobs on the spot, in their admission's transaction, when the
        backend is ``inline`` and nothing waits in the task's queue (no overtaking): their
        journal entry and result then share one commit, with no worker hand-off.

        Returns the outcomes, and the jobs left to schedule as usual: over
        :data:`~edgeagent.backends.base.INLINE_MAX_CHARS` in all, objects, and outcomes to
        redact for the cloud (escalations, audits: redaction may take long, off the loop;
        the worker infers those again).  A task that audits its confident answers is not
        answered here at all: every such answer would be inferred twice.
        """
        if (
            not (self._inline and self.answers_at_admission)
            or not self.queue.empty()
            or self._audits_redacted()
        ):
            return [], batch
        outcomes, live = self._triage(batch)
        inputs: list[Any] = []
        size = 0.0
        for p in live:
            text = model_input(p.job.input)
            size += _inline_size([text])
            if size > INLINE_MAX_CHARS:
                break
            inputs.append(text)
        live, rest = live[: len(inputs)], live[len(inputs) :]
        if live:
            started = time.monotonic()
            try:
                predictions = self._checked(inputs, self.backend.infer_batch(inputs))
            except Exception as exc:  # a backend bug: the job is answered `error`, as usual
                outcomes += self._failed(live, exc)
            else:
                outcomes += self._routed(live, predictions, started)
        done = [o for o in outcomes if not self._to_redact(o)]
        rest += [o.pending for o in outcomes if self._to_redact(o)]
        return done, rest

    def _triage(self, batch: list[PendingJob]) -> tuple[list[Outcome], list[PendingJob]]:
        """The outcomes of jobs no model needs to see (past their deadline; no content),
        and the jobs left to infer."""
        now = time.time()
        live = [p for p in batch if p.deadline_at > now]
        outcomes = [Outcome(p, expired(p, self.name)) for p in batch if p.deadline_at <= now]
        # Inputs with nothing in them are refused before any model runs (an answer would be
        # invented); the others are fed in the one normalised form the cache key hashes.
        outcomes += [self._route(p, NO_CONTENT) for p in live if not has_content(p.job.input)]
        return outcomes, [p for p in live if has_content(p.job.input)]

    def _failed(self, live: list[PendingJob], exc: Exception) -> list[Outcome]:
        log.exception("inference.failed", task=self.name, batch=len(live))
        err = ErrorInfo(
            code="inference_failed", message=f"local inference failed: {type(exc).__name__}"
        )
        return [Outcome(p, self._result(p, "error", error=err)) for p in live]

    def _routed(
        self, live: list[PendingJob], predictions: list[Prediction], started: float
    ) -> list[Outcome]:
        elapsed = time.monotonic() - started
        m = self.metrics
        m.child(m.inference, self.name).observe(elapsed)
        m.child(m.batch_size, self.name).observe(len(live))
        outcomes = []
        for p, pred in zip(live, predictions, strict=True):
            try:
                outcomes.append(self._route(p, pred))
            except Exception:  # one odd prediction must not cost the batch its answers
                log.exception("task.route_failed", task=self.name, job_id=p.job.id)
                outcomes.append(Outcome(p, self._result(p, "error", error=INTERNAL_ERROR)))
        return outcomes

    def _to_redact(self, o: Outcome) -> bool:
        """Whether ``o`` may leave the device (an escalation, or an answer to audit) and is
        to be redacted first."""
        if self.redactor is None or not self.cloud_available:
            return False
        return bool(o.escalate) or (self.config.audit_rate > 0 and o.cacheable)

    def _audits_redacted(self) -> bool:
        """Whether confident answers may go to the cloud for audit, redacted first."""
        return self.redactor is not None and self.cloud_available and self.config.audit_rate > 0

    async def _redact_for_cloud(self, outcomes: list[Outcome]) -> list[Outcome]:
        """Redact, in a worker thread, what may leave the device: escalations and (with
        ``audit_rate``) confident answers.  Redaction is linear in the input but pure
        Python (phone numbers: up to ~0.5 s for a crafted 16 KiB input), so it must not
        run on the event loop, where every task would wait for it; except a batch of at
        most :data:`REDACT_INLINE_CHARS` characters, cheaper to redact than to hand off."""
        redactor = self.redactor
        todo = [i for i, o in enumerate(outcomes) if self._to_redact(o)]
        if redactor is None or not todo:
            return outcomes
        if not self.may_escalate():  # decided now, so nothing is redacted on the loop later
            return [
                dataclasses.replace(o, no_room=True) if i in todo else o
                for i, o in enumerate(outcomes)
            ]

        values = [
            [o.pending.job.input, o.prediction.output if o.prediction else None]
            for o in (outcomes[i] for i in todo)
        ]

        def run() -> list[tuple[Any, dict[str, str], dict[str, int]]]:
            return [redactor.redact_value(v) for v in values]

        try:
            if _chars(values, REDACT_INLINE_CHARS) <= REDACT_INLINE_CHARS:
                done = run()
            else:
                done = await asyncio.to_thread(run)
        except Exception:  # the escalator redacts on the loop instead
            log.exception("redaction.failed", task=self.name)
            return outcomes
        out = list(outcomes)
        for i, red in zip(todo, done, strict=True):
            out[i] = dataclasses.replace(out[i], redacted=red)
        return out

    async def _infer(self, inputs: list[Any]) -> list[Prediction]:
        """Run one batch on the task's thread pool, or on the loop for an ``inline``
        backend when the batch is small (:func:`~edgeagent.backends.base.runs_inline`).

        The concurrency slot is released by the thread itself when the backend
        returns, not when the deadline fires: a stuck call keeps its slot.  An inline
        batch takes no slot and no timeout: its time is bounded by its size.
        """
        if self._inline and _inline_size(inputs) <= INLINE_MAX_CHARS:
            return self._checked(inputs, self.backend.infer_batch(inputs))
        loop = asyncio.get_running_loop()
        await self._slots.acquire()

        def run() -> list[Prediction]:
            try:
                res = self.backend.infer_batch(inputs)
            finally:
                with contextlib.suppress(RuntimeError):  # loop closed at shutdown
                    loop.call_soon_threadsafe(self._slots.release)
            return self._checked(inputs, res)

        fut = loop.run_in_executor(self._executor, run)
        return await asyncio.wait_for(fut, self.config.timeout_s)

    @staticmethod
    def _checked(inputs: list[Any], res: list[Prediction]) -> list[Prediction]:
        if len(res) != len(inputs):
            raise RuntimeError(f"backend returned {len(res)} answers for {len(inputs)}")
        return res

    def _route(self, p: PendingJob, pred: Prediction) -> Outcome:
        route = router.decide(
            pred,
            threshold=self.config.threshold,
            task_policy=self.config.policy,
            job_wish=p.job.escalate,
            cloud_available=self.cloud_available,
            out_of_scope=self.config.out_of_scope,
        )
        if route.action == "answer":
            res = self._result(p, "ok", output=pred.output, confidence=pred.confidence)
            return Outcome(p, res, cacheable=True, prediction=pred)
        reason = route.reason or "low_confidence"
        declined = route.action == "decline"
        message = router.DECLINED_MESSAGE if declined else unrecognized_message(reason, pred)
        err = ErrorInfo(code=reason, message=message)
        res = self._result(p, "unrecognized", confidence=pred.confidence, error=err)
        if route.action == "escalate":
            return Outcome(p, res, prediction=pred, escalate=reason)
        self.metrics.unrecognized.labels(self.name, reason).inc()
        return Outcome(p, res, prediction=pred)

    def _result(
        self,
        p: PendingJob,
        status: Status,
        *,
        output: Any = None,
        confidence: float | None = None,
        error: ErrorInfo | None = None,
    ) -> ResultMessage:
        return build(
            p.job.id,
            self.name,
            status,
            received_at=p.received_at,
            output=output,
            confidence=None if confidence is None else round(float(confidence), 6),
            source="local",
            model=self.backend.model_id,
            error=error,
        )


_UNRECOGNIZED = {
    "low_confidence": "the local model is not confident enough and no cloud agent is configured",
    "out_of_scope": "the input is outside what this task knows and no cloud agent is configured",
    "schema_invalid": "no schema-valid local answer and no cloud agent is configured",
    "forced": "the job or task asks for the cloud agent, and none is configured",
    "open_ended": "open-ended input needs the cloud agent, and none is configured",
}


NO_CONTENT = Prediction(None, 0.0, reason="out_of_scope", details={"failure": NO_CONTENT_FAILURE})
"""What an input without a letter or digit gets (:func:`edgeagent.inputs.has_content`)."""


def unrecognized_message(reason: str, pred: Prediction | None) -> str:
    """The ``error.message`` of an unrecognized result: the reason's text, made precise by
    the backend's ``details`` (an input too long for the model, the field that failed)."""
    base = _UNRECOGNIZED.get(reason, reason)
    details = pred.details if pred is not None else {}
    failure = details.get("failure")
    if failure == NO_CONTENT_FAILURE:
        return "the input has no letter or digit: there is nothing to answer from"
    if failure == "input_too_long":
        if "prompt_tokens" in details and "limit" in details:
            size = f" ({details['prompt_tokens']} prompt tokens, limit {details['limit']})"
        elif "limit_tokens" in details:
            size = f" (more than {details['limit_tokens']} tokens)"
        else:
            size = ""
        return f"the input is too long for the local model{size} and no cloud agent is configured"
    fields = details.get("fields")
    if failure == "ungrounded" and isinstance(fields, list) and fields:
        named = ", ".join(str(f) for f in fields[:5])
        return (
            f"the local answer holds a value that is not in the input ({named}) and no cloud "
            "agent is configured"
        )
    if reason == "schema_invalid" and isinstance(fields, list) and fields:
        why = details.get("message")
        named = ", ".join(str(f) for f in fields[:5])
        return f"{base}; field {named}" + (f": {str(why)[:200]}" if why else "")
    return base


def _chars(value: Any, cap: int) -> int:
    """Characters of the strings (keys too) and numbers in ``value``, counted until more
    than ``cap``."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if isinstance(value, list | tuple):
        total = 0
        for v in value:
            total += _chars(v, cap - total)
            if total > cap:
                break
        return total
    return len(str(value)) if value is not None else 0


def _inline_size(inputs: list[Any]) -> float:
    """Characters an inline backend would scan for ``inputs`` (text, or an object's
    ``text``); infinite for other objects (their size is not known without encoding)."""
    size = 0
    for x in inputs:
        text = x.get("text") if isinstance(x, dict) and len(x) == 1 else x
        if not isinstance(text, str):
            return float("inf")
        size += len(text)
    return size


def expired(p: PendingJob, task: str) -> ResultMessage:
    err = ErrorInfo(code="deadline_exceeded", message=f"deadline of {p.job.deadline_ms} ms passed")
    return build(p.job.id, task, "expired", received_at=p.received_at, error=err)
