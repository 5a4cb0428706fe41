"""The daemon: builds everything from config; ordered start, intake, outbox, signals, phased drain.

Thread model: one asyncio event loop owns all state (store, queues, in-flight
maps).  The MQTT network thread and inference threads only hand results back
with ``call_soon_threadsafe``.

A job's life (PROTOCOL.md): PUBLISH → parse → journal commit → PUBACK →
cache/infer → result + outbox + ``answered`` in one commit → PUBLISH →
broker PUBACK → outbox row deleted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import os
import signal
import sqlite3
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgeagent import __version__, homeassistant
from edgeagent.backends import BackendError
from edgeagent.config import (
    ConfigError,
    Settings,
    TaskConfig,
    load_settings,
    missing_model_hint,
)
from edgeagent.escalation import Answer, Escalator
from edgeagent.learning.learner import Learner
from edgeagent.logs import get_logger
from edgeagent.metrics import Metrics
from edgeagent.mqtt import ConnectOptions, Inbound, MqttAdapter, connect_options
from edgeagent.pipeline import Outcome, PendingJob, TaskRuntime
from edgeagent.protocol import (
    ID_CONFLICT,
    REPLY_TOPIC_NOT_ALLOWED,
    UNPROCESSABLE,
    ErrorInfo,
    Job,
    Limits,
    Rejection,
    ResultMessage,
    Topics,
    derive_job_id,
    job_id_of,
    parse_job,
    publishable,
    reply_to_of,
    truncate,
)
from edgeagent.store import (
    MIN_FREE_BYTES,
    ReplyTarget,
    Store,
    StoreError,
    StoreUnavailable,
    Transaction,
    cache_key,
)
from edgeagent.systemd import Notifier

log = get_logger("edgeagent.daemon")

EXIT_OK = 0
EXIT_FAILURE = 1  # an internal error (a crashed task): systemd restarts the daemon
EXIT_CONFIG = 78  # EX_CONFIG: systemd must not restart (RestartPreventExitStatus=78)
# The state file (README "Troubleshooting"); sysexits(3) codes where one fits.
EXIT_STATE_CORRUPT = 65  # EX_DATAERR: damaged state file; not restarted
EXIT_STATE_MISSING = 73  # EX_CANTCREAT: the state directory is missing (disk not mounted?)
EXIT_STATE_IO = 74  # EX_IOERR: I/O error on the state file at start
EXIT_STATE_FULL = 75  # EX_TEMPFAIL: no space to open/migrate the state file at start
EXIT_STATE_READ_ONLY = 77  # EX_NOPERM: state file/directory/file system not writable
EXIT_STATE_NEWER = 79  # a newer edgeagent wrote the state file (downgrade); not restarted
STORE_EXIT_CODES = {
    "corrupt": EXIT_STATE_CORRUPT,
    "missing_dir": EXIT_STATE_MISSING,
    "io": EXIT_STATE_IO,
    "full": EXIT_STATE_FULL,
    "read_only": EXIT_STATE_READ_ONLY,
    "newer_schema": EXIT_STATE_NEWER,
}

STORE_RETRY_MIN_S = 0.5
STORE_RETRY_MAX_S = 30.0
"""Backoff (seconds) between attempts to write to a full or failing state disk."""
MAINTAIN_INTERVAL_S = 30.0
"""Idle WAL truncation / free-page release period (seconds)."""

INTAKE_BATCH = 256
MAX_OPEN_JOBS = 2048
"""Jobs journaled but not answered before intake pauses (the broker holds the rest)."""
QOS0_INBOX_CAP = 10000


class FatalError(Exception):
    """Start-up failed in a way a restart will not fix; ``exit_code`` says how to exit."""

    def __init__(self, message: str, exit_code: int = EXIT_CONFIG) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class _Stats:
    """Counters for the `stats` topic (Prometheus has the full picture)."""

    started: float
    by_status: collections.Counter[str]
    by_source: collections.Counter[str]
    reasons: collections.Counter[str]
    latencies: collections.deque[float]
    cache_hits: int = 0


class Daemon:
    def __init__(self, settings: Settings, config_path: Path | None = None) -> None:
        self.settings = settings
        self.config_path = config_path
        self.topics = Topics(
            settings.topics.prefix, settings.device_id, settings.topics.fleet_group
        )
        self.limits = Limits(
            settings.limits.max_payload_bytes,
            settings.limits.max_input_bytes,
            settings.limits.default_deadline_ms,
            settings.limits.max_deadline_ms,
        )
        self.metrics = Metrics()
        self.notifier = Notifier()
        self.runtimes: dict[str, TaskRuntime] = {}
        self._inbox: collections.deque[Inbound] = collections.deque()
        self._wake_intake = asyncio.Event()
        self._wake_outbox = asyncio.Event()
        self._stop = asyncio.Event()
        self._intake_open = True
        self._open: set[str] = set()  # job ids scheduled, not answered
        self._inflight: dict[int, int] = {}  # MQTT packet id -> outbox seq
        self._last_sent_seq = 0
        self._acked: list[int] = []
        self._flush_scheduled = False
        self._background: set[asyncio.Task[Any]] = set()
        self._stats = _Stats(
            time.time(),
            collections.Counter(),
            collections.Counter(),
            collections.Counter(),
            collections.deque(maxlen=2048),
        )
        self.store: Store | None = None
        self.mqtt: MqttAdapter | None = None
        self.escalator = Escalator(settings.cloud, self.topics, settings.device_id, self.metrics)
        self._reload_requested = False
        self._wd_head: Inbound | None = None  # the watchdog's view of the inbox head ...
        self._wd_head_since = 0.0  # ... and since when (monotonic seconds)
        self._fatal: tuple[str, int] | None = None  # (reason, exit code) of a fatal error
        self.degraded: str | None = None
        """Why the store refuses writes (``disk_full``, ``io_error``, ``read_only``, ``busy``)."""
        self._degraded_at = 0.0
        self._recovered_at = -1e9
        self._retry_delay = STORE_RETRY_MIN_S
        self._wake_retry = asyncio.Event()
        self._stash: list[Outcome] = []  # results computed while the store refused writes
        self._cloud_backlog: list[Inbound] = []  # cloud messages not yet committed
        self.learner = Learner(settings.state_dir(), self.metrics)
        self.escalator.on_example = self.learner.on_example
        self._models_loaded = False
        self._rate_mark = (self._stats.started, 0)  # (time, results) at the last stats
        self._ha_dirty: dict[str, ResultMessage] = {}  # task -> last answer not yet sent

    # -- start-up -----------------------------------------------------------------

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT (exit 0) or a fatal error (its exit code)."""
        loop = asyncio.get_running_loop()
        try:
            await self._start(loop)
        except FatalError as exc:
            log.error("daemon.start_failed", error=str(exc))
            await self._close_runtimes()
            self.metrics.close()
            return exc.exit_code
        fatal = self.mqtt.fatal if self.mqtt else loop.create_future()
        stop_wait = loop.create_task(self._stop.wait(), name="daemon:stop-wait")
        done, _ = await asyncio.wait({stop_wait, fatal}, return_when=asyncio.FIRST_COMPLETED)
        if fatal in done:
            stop_wait.cancel()
            log.error("mqtt.fatal", error=fatal.result())
            await self._shutdown(graceful=False)
            return EXIT_CONFIG
        if self._fatal is not None:
            # An internal failure: exit non-zero so that systemd restarts (or, for a damaged
            # state file, stops) the service.  A damaged store gets no drain: nothing commits.
            await self._shutdown(graceful=self._fatal[1] != EXIT_STATE_CORRUPT)
            return self._fatal[1]
        await self._shutdown(graceful=True)
        return EXIT_OK

    async def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        s = self.settings
        db_path = s.state_dir() / "edgeagent.db"
        try:
            self.store = Store(db_path, synchronous=s.store.synchronous)
        except StoreError as exc:
            raise FatalError(str(exc), STORE_EXIT_CODES.get(exc.kind, EXIT_FAILURE)) from exc
        free = self.store.free_bytes()
        if free < MIN_FREE_BYTES:
            # Not fatal: the broker keeps what we cannot journal, and we resume by ourselves.
            log.warning(
                "store.low_space",
                path=str(db_path),
                free_bytes=free,
                min_free_bytes=MIN_FREE_BYTES,
                hint="intake pauses (status `degraded`) whenever a write fails for lack of space",
            )
        log.info(
            "store.opened",
            path=str(db_path),
            open_jobs=self.store.open_job_count(),
            outbox=self.store.outbox_depth,
        )
        if s.metrics.listen:  # first, so /healthz and /readyz answer while models load
            try:
                self.metrics.serve(s.metrics.listen, readiness=self.readiness)
            except OSError as exc:
                raise FatalError(f"metrics.listen {s.metrics.listen}: {exc.strerror}") from exc
        self.notifier.status("loading models")
        self.runtimes = await self._build_runtimes(s.tasks)
        self._models_loaded = True
        self._configure_escalation(self.runtimes)
        self.escalator.recover(self.store)
        for rt in self.runtimes.values():
            rt.start(self._deliver)
            self._watch_workers(rt)
        for sig, handler in (
            (signal.SIGTERM, self.request_stop),
            (signal.SIGINT, self.request_stop),
            (signal.SIGHUP, self.request_reload),
        ):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, handler)
        self._recover()
        self.mqtt = MqttAdapter(
            self._connect_options(),
            loop=loop,
            subscriptions=self._subscriptions,
            on_message=self._on_message,
            on_connected=self._on_connected,
            on_disconnected=self._on_disconnected,
            on_puback=self._on_puback,
            on_publish_refused=self._on_publish_refused,
            on_subscription_refused=self._on_subscription_refused,
        )
        self.mqtt.start()
        self._spawn(self._intake_loop(), "daemon:intake")
        self._spawn(self._outbox_loop(), "daemon:outbox")
        self._spawn(self._housekeeping_loop(), "daemon:housekeeping")
        self._spawn(self._store_retry_loop(), "daemon:store-retry")
        self._spawn(self._maintain_loop(), "daemon:store-maintain")
        if s.cloud.enabled:
            self._spawn(self._escalation_loop(), "daemon:escalation")
        if any(t.learn.enabled or t.learn.few_shot for t in s.tasks.values()):
            learn = self.learner.run(self.store, lambda: self.runtimes, self._swap_task)
            self._spawn(learn, "daemon:learn")
        if self.notifier.watchdog_interval_s:
            self._spawn(self._watchdog_loop(self.notifier.watchdog_interval_s), "daemon:watchdog")
        if s.topics.stats_interval_s > 0:
            self._spawn(self._stats_loop(s.topics.stats_interval_s), "daemon:stats")
        if s.homeassistant.enabled:
            self._spawn(self._homeassistant_loop(), "daemon:homeassistant")
        self.notifier.ready(f"serving {len(self.runtimes)} task(s); connecting to broker")
        log.info(
            "daemon.started",
            version=__version__,
            device=s.device_id,
            tasks=sorted(self.runtimes),
            broker=f"{s.mqtt.host}:{s.mqtt.port}",
        )

    async def _build_runtimes(self, tasks: dict[str, TaskConfig]) -> dict[str, TaskRuntime]:
        built: dict[str, TaskRuntime] = {}
        for name, cfg in tasks.items():
            cfg = self.learner.serving_config(name, cfg)  # a learned version, if promoted
            try:
                rt = await asyncio.to_thread(TaskRuntime.build, name, cfg, self.metrics)
            except BackendError as exc:
                for b in built.values():
                    b.close()
                hint = missing_model_hint(name, cfg)
                raise FatalError(f"task {name!r}: {hint}" if hint else str(exc)) from exc
            except Exception as exc:
                for b in built.values():
                    b.close()
                raise FatalError(f"task {name!r}: backend failed to load: {exc!r}") from exc
            built[name] = rt
            self.learner.attach(name, rt)
            log.info("task.loaded", task=name, kind=cfg.kind, model=rt.backend.model_id)
        return built

    def _connect_options(self) -> ConnectOptions:
        s = self.settings
        m = s.mqtt
        key = s.tls_key_file()
        try:
            password = s.mqtt_password()
        except ConfigError as exc:
            raise FatalError(str(exc)) from exc
        return connect_options(
            m,
            client_id=s.client_id,
            password=password,
            key_file=key,
            will_topic=self.topics.status,
            will_payload=self._status_payload("offline"),
        )

    def _subscriptions(self) -> list[str]:
        """Called by the MQTT thread on every CONNACK (reads immutable data only)."""
        subs = [self.topics.jobs_filter]
        if self.topics.fleet_filter:
            subs.append(self.topics.fleet_filter)
        if self.settings.cloud.enabled:
            subs += [
                self.topics.cloud_replies,
                self.topics.cloud_status,
                self.topics.cloud_status + "/+",
            ]
        if self.settings.homeassistant.enabled:
            subs.append(self._ha_status_topic)
        return subs

    def _configure_escalation(self, runtimes: dict[str, TaskRuntime]) -> None:
        self.escalator.configure({name: rt.config for name, rt in runtimes.items()})
        for rt in runtimes.values():
            rt.cloud_available = self.escalator.usable(rt.config)
            rt.redactor = self.escalator.redactor(rt.name)
            rt.may_escalate = functools.partial(self.escalator.has_room, rt.name)

    def _cloud_reachable(self) -> bool:
        return self.escalator.cloud_online and self.mqtt is not None and self.mqtt.connected

    def _recover(self) -> None:
        """Assume we were killed last time: re-run every job the journal holds open."""
        assert self.store is not None
        waiting = self.store.pending_escalation_jobs()  # these wait for the cloud, not a model
        jobs = [j for j in self.store.open_jobs() if j.id not in waiting]
        for job in jobs:
            received = self.store.received_at(job.id) or time.time()
            self._schedule(job, received)
        if jobs or self.store.outbox_depth:
            log.info("daemon.recovered", jobs=len(jobs), outbox=self.store.outbox_depth)

    # -- MQTT events (loop thread) ------------------------------------------------

    def _on_connected(self, session_present: bool) -> None:
        self.metrics.connected.set(1)
        self.metrics.reconnects.inc()
        log.info("mqtt.connected", session_present=session_present)
        self.notifier.status(f"connected; {len(self.runtimes)} task(s)")
        if self.mqtt is not None:
            extra = {} if self.degraded is None else {"reason": self.degraded}
            state = "online" if self.degraded is None else "degraded"
            self.mqtt.publish(self.topics.status, self._status_payload(state, **extra), retain=True)
        self._announce_homeassistant()
        self._wake_outbox.set()

    def _on_disconnected(self) -> None:
        self.metrics.connected.set(0)
        self.notifier.status("disconnected from broker; retrying")

    def _on_message(self, msg: Inbound) -> None:
        if self.settings.homeassistant.enabled and msg.topic == self._ha_status_topic:
            if self.mqtt is not None:
                self.mqtt.ack(msg)
            if msg.payload.strip() == b"online":  # Home Assistant (re)started
                self._announce_homeassistant()
            return
        if msg.topic == self.topics.cloud_replies or msg.topic.startswith(self.topics.cloud_status):
            self._on_cloud_message(msg)
            return
        if msg.qos == 0 and len(self._inbox) >= QOS0_INBOX_CAP:
            log.warning("job.qos0_dropped", topic=msg.topic)  # QoS 0 carries no guarantee
            return
        self._inbox.append(msg)
        self._wake_intake.set()

    def _on_cloud_message(self, msg: Inbound) -> None:
        """A cloud reply or the agent's status: committed, then acknowledged."""
        assert self.store is not None and self.mqtt is not None
        if self.degraded is not None:
            self._cloud_backlog.append(msg)  # unacknowledged until it is committed
            return
        answers: list[Answer] = []
        try:
            with self.store.transaction() as tx:
                if msg.topic != self.topics.cloud_replies:
                    if self.escalator.on_status(msg.topic, msg.payload):
                        self.escalator.resend_all_now(tx, self.store)
                else:
                    answers = self.escalator.on_reply(
                        tx,
                        self.store,
                        msg.payload,
                        msg.correlation,
                        self.runtimes,
                        self.settings.cache.ttl_s,
                        self.settings.cache.max_entries,
                    )
        except StoreError as exc:
            if isinstance(exc, StoreUnavailable):
                self._cloud_backlog.append(msg)
            self._resync_escalator()
            self._store_trouble(exc, "cloud_reply")
            return
        except Exception as exc:
            # Rolled back; the escalation stays pending (re-sent, or its deadline decides).
            # Acknowledged so that it does not come back at every reconnect.
            self._resync_escalator()
            log.error(
                "cloud.reply_failed",
                topic=truncate(msg.topic, 120),
                error=truncate(repr(exc), 300),
                payload=truncate(repr(msg.payload), 200),
            )
        self.mqtt.ack(msg)
        self._answered(answers)

    def _answered(self, answers: list[Answer]) -> None:
        for a in answers:
            self._count(a.result)
            log.info(
                "job.done",
                job_id=a.job_id,
                task=a.task,
                status=a.result.status,
                source=a.result.source,
                confidence=a.result.confidence,
                latency_ms=a.result.latency_ms,
                supersedes=a.result.supersedes,
                code=a.result.error.code if a.result.error else None,
            )
        self.metrics.escalations_in_flight.set(self.escalator.in_flight)
        if answers and self._pump():
            self._wake_outbox.set()

    async def _escalation_loop(self) -> None:
        assert self.store is not None
        while True:
            await asyncio.sleep(0.5)
            if not self.escalator.in_flight or self.degraded is not None:
                continue  # nothing pending: no transaction (an fsync with synchronous=full)
            try:
                with self.store.transaction() as tx:
                    answers = self.escalator.tick(tx, self.store, reachable=self._cloud_reachable())
            except StoreError as exc:
                self._resync_escalator()
                self._store_trouble(exc, "escalation")
                continue
            self._answered(answers)
            if self._pump():
                self._wake_outbox.set()

    def _on_puback(self, mid: int) -> None:
        seq = self._inflight.pop(mid, None)
        if seq is None or seq < 0:  # not an outbox row (the `stopped` status)
            return
        self._acked.append(seq)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_acked)
        self._wake_outbox.set()

    def _on_publish_refused(self, mid: int, reason_code: int, reason: str) -> None:
        """The broker refused an outbox publish (v5 PUBACK >= 0x80, e.g. its ACL): resending
        cannot help, so the row becomes a dead letter (the result stays in the journal;
        `edgeagent results JOB_ID` shows both)."""
        seq = self._inflight.pop(mid, None)
        if seq is None or seq < 0 or self.store is None:
            return  # not an outbox row (status); mqtt.py has logged it
        dead = self.store.dead_letter(seq, reason_code, reason)
        self.metrics.dead_letters.labels(_reason_label(reason)).inc()
        self.metrics.outbox_depth.set(self.store.outbox_depth)
        log.error(
            "outbox.dead_letter",
            seq=seq,
            job_id=dead.job_id if dead else None,
            topic=truncate(dead.topic, 120) if dead else None,
            reason_code=reason_code,
            reason=reason,
            hint="the broker refused it (ACL?); `edgeagent results JOB_ID` shows it",
        )
        self._wake_outbox.set()

    def _on_subscription_refused(self, topic: str, reason_code: int, reason: str) -> None:
        """After a reconnect the broker refused one of our subscriptions (logged by mqtt.py;
        at start the same is fatal)."""
        self.metrics.subscriptions_refused.labels(topic).inc()
        self.notifier.status(f"broker refused subscription {topic}: {reason}")

    def _flush_acked(self) -> None:
        self._flush_scheduled = False
        if self.store is None or not self._acked:
            return
        acked, self._acked = self._acked, []
        try:
            self.store.outbox_done(acked)
        except StoreError as exc:
            self._acked = acked + self._acked  # deleted later: a restart would resend them
            self._store_trouble(exc, "outbox_done")
            return
        self.metrics.outbox_depth.set(self.store.outbox_depth)
        self._wake_intake.set()  # outbox space may unblock intake

    # -- intake -------------------------------------------------------------------

    async def _intake_loop(self) -> None:
        assert self.store is not None and self.mqtt is not None
        while True:
            await self._wake_intake.wait()
            self._wake_intake.clear()
            while (
                self._inbox and self._intake_open and self.degraded is None and self._has_capacity()
            ):
                batch = [self._inbox.popleft() for _ in range(min(INTAKE_BATCH, len(self._inbox)))]
                scheduled: list[tuple[Job, float]] = []
                try:
                    with self.store.transaction() as tx:
                        for msg in batch:
                            self._admit_isolated(tx, msg, scheduled)
                except StoreError as exc:
                    # Nothing was committed, so nothing is acknowledged: the messages go back
                    # to the head of the inbox and the broker holds everything behind them.
                    self._inbox.extendleft(reversed(batch))
                    self._store_trouble(exc, "intake")
                    break
                # Durable now: only at this point do we acknowledge to the broker.
                for msg in batch:
                    self.mqtt.ack(msg)
                for job, received in scheduled:
                    self._schedule(job, received)
                if self._pump():
                    self._wake_outbox.set()
                await asyncio.sleep(0)

    def _has_capacity(self) -> bool:
        assert self.store is not None
        return (
            len(self._open) < MAX_OPEN_JOBS
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
            self.metrics.quarantined.inc()
            log.error(
                "job.quarantined",
                topic=truncate(msg.topic, 120),
                error="its results topic is not a valid MQTT topic",
                payload=truncate(repr(msg.payload), 200),
            )
            return
        try:
            with tx.savepoint():
                self._admit(tx, msg, mine)
            scheduled.extend(mine)
            return
        except StoreError:
            raise
        except Exception as exc:
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
            self.metrics.quarantined.inc()
            log.error(
                "job.quarantined",
                topic=truncate(msg.topic, 120),
                error=truncate(repr(exc), 300),
                payload=truncate(repr(msg.payload), 200),
            )

    def _admit(self, tx: Transaction, msg: Inbound, scheduled: list[tuple[Job, float]]) -> None:
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
        res = ResultMessage(
            id=rej.id,
            task=task,
            status="rejected",
            error=ErrorInfo(code=rej.code, message=rej.message),
        )
        tx.enqueue(target.topic, res.to_bytes(), target.correlation)
        self.metrics.rejected.labels(rej.code).inc()
        self.metrics.jobs.labels(task, "rejected", "").inc()
        self._stats.by_status["rejected"] += 1
        log.info("job.rejected", job_id=rej.id, task=truncate(task, 64), code=rej.code)

    def _answer_from_cache(self, tx: Transaction, job: Job, received: float) -> bool:
        rt = self.runtimes.get(job.task)
        if (
            rt is None
            or not (self.settings.cache.enabled and rt.config.cache)
            or job.escalate == "always"
        ):
            return False
        assert self.store is not None
        hit = self.store.cache_get(cache_key(job.task, rt.fingerprint, job.input))
        self.metrics.cache.labels(job.task, "hit" if hit else "miss").inc()
        if hit is None:
            return False
        res = ResultMessage(
            id=job.id,
            task=job.task,
            status="ok",
            output=hit.get("output"),
            confidence=hit.get("confidence"),
            source="cache",
            model=hit.get("model"),
            latency_ms=round((time.time() - received) * 1000.0, 3),
        )
        tx.answer(job.id, res.to_bytes(), fallback=ReplyTarget(self.topics.results(job.task)))
        self._stats.cache_hits += 1
        self._count(res)
        return True

    def _schedule(self, job: Job, received_at: float) -> None:
        rt = self.runtimes.get(job.task)
        self._open.add(job.id)
        self.metrics.queue_depth.set(len(self._open))
        if rt is None:
            # The task was removed by a reload after the job was journaled.
            res = ResultMessage(
                id=job.id,
                task=job.task,
                status="rejected",
                error=ErrorInfo(code="unknown_task", message=f"task {job.task!r} was removed"),
            )
            self._deliver([Outcome(PendingJob(job, received_at), res)])
            return
        rt.queue.put_nowait(PendingJob(job, received_at))

    # -- results ------------------------------------------------------------------

    def _deliver(self, outcomes: list[Outcome]) -> None:
        """Commit a batch of results (one transaction) and hand them to the outbox."""
        if not outcomes or self.store is None:
            return
        if self.degraded is not None:
            self._stash.extend(outcomes)  # committed once the store takes writes again
            return
        reachable = self._cloud_reachable()
        done: list[ResultMessage] = []
        try:
            with self.store.transaction() as tx:
                for o in outcomes:
                    result = self._commit_outcome_isolated(tx, o, reachable)
                    if result is not None:
                        done.append(result)
        except StoreError as exc:
            # Nothing committed: the jobs stay `received` in the journal and open here; the
            # store-retry task commits them later (or the next start re-runs them).
            self._stash.extend(outcomes)
            self._resync_escalator()
            self._store_trouble(exc, "deliver")
            return
        for o in outcomes:
            self._open.discard(o.pending.job.id)
        for res in done:
            self._count(res)
            log.info(
                "job.done",
                job_id=res.id,
                task=res.task,
                status=res.status,
                source=res.source,
                confidence=res.confidence,
                latency_ms=res.latency_ms,
                provisional=res.provisional or None,
                code=res.error.code if res.error else None,
            )
        self.metrics.escalations_in_flight.set(self.escalator.in_flight)
        self.metrics.queue_depth.set(len(self._open))
        if self._pump():
            self._wake_outbox.set()
        self._wake_intake.set()

    def _commit_outcome_isolated(
        self, tx: Transaction, o: Outcome, reachable: bool
    ) -> ResultMessage | None:
        """Commit one outcome; a failure of our own code answers the job ``error`` instead."""
        job = o.pending.job
        try:
            with tx.savepoint():
                return self._commit_outcome(tx, o, reachable)
        except StoreError:
            raise
        except Exception as exc:
            log.error("job.commit_failed", job_id=job.id, task=job.task, error=repr(exc))
        res = ResultMessage(
            id=job.id,
            task=job.task,
            status="error",
            error=ErrorInfo(code="internal_error", message="the daemon failed on this job"),
        )
        try:
            with tx.savepoint():
                tx.answer(
                    job.id, res.to_bytes(), fallback=ReplyTarget(self.topics.results(job.task))
                )
        except StoreError:
            raise
        except Exception as exc:
            self.metrics.quarantined.inc()
            log.error("job.quarantined", job_id=job.id, task=job.task, error=repr(exc))
            return None
        return res

    def _commit_outcome(self, tx: Transaction, o: Outcome, reachable: bool) -> ResultMessage | None:
        """One job's result, cache entry and escalation rows; None while it waits for the cloud."""
        job = o.pending.job
        rt = self.runtimes.get(job.task)
        result: ResultMessage | None = o.result
        if o.escalate and rt is not None and rt.cloud_available:
            result = self.escalator.escalate(tx, o, rt, reachable=reachable)
        if result is None:  # waits for the cloud: durable in the escalations table
            return None
        tx.answer(job.id, result.to_bytes(), fallback=ReplyTarget(self.topics.results(job.task)))
        if not (o.cacheable and rt is not None):
            return result
        if self.settings.cache.enabled and rt.config.cache:
            tx.cache_put(
                cache_key(job.task, rt.fingerprint, job.input),
                job.task,
                {
                    "output": result.output,
                    "confidence": result.confidence,
                    "model": result.model,
                },
                ttl_s=self.settings.cache.ttl_s,
                max_entries=self.settings.cache.max_entries,
            )
        audit = rt.config.audit_rate
        if rt.cloud_available and audit > 0 and self.escalator.rng.random() < audit:
            self.escalator.escalate(tx, o, rt, reachable=reachable, audit=True)
        return result

    def _count(self, res: ResultMessage) -> None:
        source = res.source or ""
        self.metrics.jobs.labels(res.task, res.status, source).inc()
        if res.latency_ms is not None:
            self.metrics.latency.labels(res.task, source).observe(res.latency_ms / 1000.0)
            self._stats.latencies.append(res.latency_ms)
        self._stats.by_status[res.status] += 1
        self._stats.by_source[source] += 1
        if self.settings.homeassistant.enabled:
            self._ha_dirty[res.task] = res  # serialised by _homeassistant_loop, once a second
        if res.error is not None and res.status == "unrecognized":
            self._stats.reasons[res.error.code] += 1

    # -- outbox -------------------------------------------------------------------

    async def _outbox_loop(self) -> None:
        while True:
            await self._wake_outbox.wait()
            self._wake_outbox.clear()
            if self._pump():
                self._wake_outbox.set()
                await asyncio.sleep(0)

    def _pump(self) -> bool:
        """Publish outbox rows not yet in flight, up to the window.  True if more are waiting.

        Called right after each commit (results go out without another loop turn) and by
        the outbox task on reconnect and PUBACKs.  Rows go out in ``seq`` order.
        """
        if self.store is None or self.mqtt is None or not self.mqtt.connected:
            return False
        room = self.settings.mqtt.max_inflight - len(self._inflight)
        if room <= 0 or self._last_sent_seq >= self.store.last_seq:
            return False
        try:
            rows = self.store.outbox(after=self._last_sent_seq, limit=room)
        except StoreError as exc:
            self._store_trouble(exc, "outbox")
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
            self._inflight[mid] = row.seq
            self._last_sent_seq = row.seq
        self.metrics.outbox_depth.set(self.store.outbox_depth)
        return len(rows) == room

    # -- periodic -----------------------------------------------------------------

    async def _housekeeping_loop(self) -> None:
        assert self.store is not None
        while True:
            await asyncio.sleep(300)
            try:  # also while degraded: rows past retention are the space to win back
                pruned = self.store.prune(retention_s=self.settings.store.journal_retention_s)
            except StoreError as exc:
                self._store_trouble(exc, "prune")
                continue
            if pruned:
                log.info("store.pruned", jobs=pruned)

    async def _maintain_loop(self) -> None:
        """Keep the state directory small: when idle, truncate the WAL and free pages."""
        assert self.store is not None
        while True:
            await asyncio.sleep(MAINTAIN_INTERVAL_S)
            if self._open or self._inbox or self._inflight or self.degraded is not None:
                continue
            try:
                self.store.maintain()
            except StoreUnavailable:
                continue  # a checkpoint that cannot run now runs later; nothing is lost
            except StoreError as exc:
                self._store_trouble(exc, "maintain")

    # -- store failures -------------------------------------------------------------

    def _store_trouble(self, exc: BaseException, where: str) -> None:
        """A store write or read failed: degrade (disk full, I/O) or stop (damaged file)."""
        if isinstance(exc, StoreUnavailable):
            self._degrade(exc.reason, str(exc), where)
        elif isinstance(exc, StoreError):
            self._fail(f"{where}: {exc}", STORE_EXIT_CODES.get(exc.kind, EXIT_FAILURE))
        else:
            self._fail(f"{where}: {exc!r}", EXIT_FAILURE)

    def _degrade(self, reason: str, detail: str, where: str) -> None:
        self.metrics.store_errors.labels(reason).inc()
        if self.degraded is not None:
            return
        now = time.monotonic()
        if now - self._recovered_at > 60.0:
            self._retry_delay = STORE_RETRY_MIN_S  # a new episode, not a flapping one
        self.degraded = reason
        self._degraded_at = now
        self.metrics.degraded.set(1)
        log.error(
            "store.degraded",
            reason=reason,
            where=where,
            error=truncate(detail, 300),
            free_bytes=self._free_bytes(),
            hint="not acknowledging jobs (the broker keeps them); retrying with backoff",
        )
        self.notifier.status(f"degraded: {reason}; jobs wait at the broker")
        self._publish_status("degraded", reason=reason)
        self._wake_retry.set()

    def _free_bytes(self) -> int | None:
        try:
            return self.store.free_bytes() if self.store is not None else None
        except OSError:
            return None

    def _fail(self, reason: str, exit_code: int) -> None:
        """A fatal internal error: one log line, then a drain and a non-zero exit."""
        if self._fatal is not None:
            return
        self._fatal = (reason, exit_code)
        log.error("daemon.fatal", reason=truncate(reason, 500), exit_code=exit_code)
        self._stop.set()

    async def _store_retry_loop(self) -> None:
        """While degraded: probe the store with backoff; on success commit what waited."""
        while True:
            await self._wake_retry.wait()
            while self.degraded is not None and self._fatal is None:
                await asyncio.sleep(self._retry_delay)
                self._retry_delay = min(self._retry_delay * 2, STORE_RETRY_MAX_S)
                self._retry_store()
            self._wake_retry.clear()

    def _retry_store(self) -> None:
        assert self.store is not None
        try:
            self.store.probe()
        except StoreUnavailable:
            return
        except StoreError as exc:
            self._store_trouble(exc, "probe")
            return
        log.info(
            "store.recovered",
            reason=self.degraded,
            degraded_s=round(time.monotonic() - self._degraded_at, 1),
            waiting_results=len(self._stash),
            waiting_jobs=len(self._inbox),
        )
        self.degraded = None
        self._recovered_at = time.monotonic()
        self.metrics.degraded.set(0)
        self.notifier.status(f"connected; {len(self.runtimes)} task(s)")
        self._publish_status("online")
        stash, self._stash = self._stash, []
        self._deliver(stash)
        backlog, self._cloud_backlog = self._cloud_backlog, []
        for msg in backlog:
            self._on_cloud_message(msg)
        self._flush_acked()
        self._wake_intake.set()
        self._wake_outbox.set()

    def _resync_escalator(self) -> None:
        # A rolled-back escalation leaves the in-memory in-flight count ahead of the table.
        with contextlib.suppress(StoreError, sqlite3.Error):
            assert self.store is not None
            self.escalator.recover(self.store)

    def _publish_status(self, state: str, **extra: Any) -> None:
        if self.mqtt is not None and self.mqtt.connected:
            self.mqtt.publish(self.topics.status, self._status_payload(state, **extra), retain=True)

    async def _watchdog_loop(self, interval: float) -> None:
        """Feed systemd's watchdog from the event loop, and only while the daemon is
        healthy (:meth:`_watchdog_withheld`): a stalled or sluggish loop or a wedged
        intake stops the pings, and systemd restarts us after ``WatchdogSec``.

        ``interval`` is half of ``WatchdogSec`` (seconds).  The loop ticks more often
        (at most every second) to measure its own lag: how late a sleep returns.
        """
        loop = asyncio.get_running_loop()
        tick = min(1.0, interval / 3)
        lag = 0.0
        withheld: str | None = None
        while True:
            reason = self._watchdog_withheld(lag, max_lag_s=interval, wedged_after_s=interval)
            if reason is None:
                self.notifier.watchdog()
            if reason != withheld:
                if reason is not None:
                    log.warning("watchdog.withheld", reason=reason, loop_lag_s=round(lag, 3))
                else:
                    log.info("watchdog.resumed")
                withheld = reason
            due = loop.time() + tick
            await asyncio.sleep(tick)
            lag = max(0.0, loop.time() - due)

    def _watchdog_withheld(
        self, lag_s: float, *, max_lag_s: float, wedged_after_s: float
    ) -> str | None:
        """Why systemd's watchdog must not be fed now, or None when healthy.

        ``event_loop_lag``: the last tick came ``lag_s`` late, more than ``max_lag_s``.
        ``intake_stopped``: the intake task is gone.  ``intake_wedged``: the oldest
        received message has waited ``wedged_after_s`` while intake was open and had
        room (a degraded store or a drain pauses intake on purpose and is not a wedge).
        """
        if lag_s > max_lag_s:
            return "event_loop_lag"
        if not any(t.get_name() == "daemon:intake" for t in self._background):
            return "intake_stopped"
        head = self._inbox[0] if self._inbox else None
        now = time.monotonic()
        if head is not self._wd_head:
            self._wd_head, self._wd_head_since = head, now
        stuck = head is not None and now - self._wd_head_since > wedged_after_s
        if (
            stuck
            and self._intake_open
            and self.degraded is None  # a full disk pauses intake on purpose
            and self.store is not None
            and self._has_capacity()
        ):
            return "intake_wedged"
        return None

    async def _stats_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if self.mqtt is not None and self.mqtt.connected:
                # Retained: `edgeagent status` reads the last one without waiting an interval.
                self.mqtt.publish(self.topics.stats, self.stats_payload(), qos=0, retain=True)

    def stats_payload(self) -> bytes:
        st = self._stats
        lat = sorted(st.latencies)

        def q(p: float) -> float | None:
            if not lat:
                return None
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 3)

        done = sum(st.by_status.values())
        now = time.time()
        mark_t, mark_n = self._rate_mark
        self._rate_mark = (now, done)
        answered = sum(st.by_source[k] for k in ("local", "cache", "cloud"))
        local = st.by_source["local"] + st.by_source["cache"]
        return json.dumps(
            {
                "v": 1,
                "device": self.settings.device_id,
                "uptime_s": round(time.time() - st.started, 1),
                "jobs": dict(st.by_status),
                "sources": dict(st.by_source),
                "latency_ms": {
                    "p50": q(0.5),
                    "p90": q(0.9),
                    "p99": q(0.99),
                    "mean": round(statistics.fmean(lat), 3) if lat else None,
                },
                "cache_hits": st.cache_hits,
                "escalation_rate": round(st.by_source["cloud"] / done, 4) if done else None,
                "jobs_per_s": round((done - mark_n) / (now - mark_t), 3) if now > mark_t else 0.0,
                "local_share": round(local / answered, 4) if answered else None,
                "escalations_in_flight": self.escalator.in_flight,
                "cloud_reachable": self.escalator.cloud_online,
                "unrecognized_reasons": dict(st.reasons),
                "queue_depth": len(self._open),
                "outbox_depth": self.store.outbox_depth if self.store else 0,
                "degraded": self.degraded,
            }
        ).encode()

    def _status_payload(self, state: str, **extra: Any) -> bytes:
        """The retained status: ``online``, ``degraded`` (with ``reason``), ``stopped``,
        ``failed`` (with ``reason``) or ``offline`` (the last will)."""
        return json.dumps(
            {
                "v": 1,
                "state": state,
                "device": self.settings.device_id,
                "version": __version__,
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "models": {name: rt.backend.model_id for name, rt in self.runtimes.items()},
                **extra,
                **self._status_warnings(),
            }
        ).encode()

    def _status_warnings(self) -> dict[str, Any]:
        """Problems worth showing to whoever reads the retained status (`edgeagent status`)."""
        if self.mqtt is not None and self.mqtt.takeover.active:
            return {
                "warnings": [
                    f"client_id_conflict: another client connects as {self.settings.client_id!r}"
                ]
            }
        return {}

    # -- health -------------------------------------------------------------------

    def readiness(self) -> list[str]:
        """Why the daemon cannot serve jobs right now (empty: ready), for ``/readyz``.

        Runs on the metrics HTTP thread: reads state only.  Checks: every task's model is
        loaded, the broker connection is up, the broker granted every subscription, and
        the state directory is writable with at least ``MIN_FREE_BYTES`` free.
        """
        reasons: list[str] = []
        if not self._models_loaded:
            reasons.append("models: still loading")
        m = self.mqtt
        broker = f"{self.settings.mqtt.host}:{self.settings.mqtt.port}"
        if m is not None and m.takeover.active:
            reasons.append(
                f"broker: another client keeps taking over client id {self.settings.client_id!r}"
            )
        if m is None or not m.connected:
            reasons.append(f"broker: not connected to {broker}")
        elif m.subscriptions_refused is None:
            reasons.append("broker: subscriptions not acknowledged yet")
        elif m.subscriptions_refused:
            reasons.append(f"broker: subscriptions refused: {', '.join(m.subscriptions_refused)}")
        if self.degraded is not None:
            reasons.append(f"store: degraded ({self.degraded}); jobs wait at the broker")
        state = self.settings.state_dir()
        try:
            st = os.statvfs(state)
            free = st.f_bavail * st.f_frsize
            if not os.access(state, os.W_OK):
                reasons.append(f"disk: state directory {state} is not writable")
            elif free < MIN_FREE_BYTES:
                reasons.append(f"disk: {free} bytes free in {state}")
        except OSError as exc:
            reasons.append(f"disk: state directory {state}: {exc.strerror}")
        return reasons

    # -- Home Assistant ---------------------------------------------------------

    @property
    def _ha_status_topic(self) -> str:
        return f"{self.settings.homeassistant.discovery_prefix}/status"

    def _announce_homeassistant(self, removed: list[str] | None = None) -> None:
        """Publish the retained discovery configs (and empty ones for removed tasks)."""
        ha = self.settings.homeassistant
        if not ha.enabled or self.mqtt is None or not self.mqtt.connected:
            return
        messages = homeassistant.discovery_messages(
            discovery_prefix=ha.discovery_prefix,
            prefix=self.settings.topics.prefix,
            device=self.settings.device_id,
            tasks={name: rt.backend.model_id for name, rt in self.runtimes.items()},
        )
        if removed:
            messages += homeassistant.removal_messages(
                discovery_prefix=ha.discovery_prefix,
                device=self.settings.device_id,
                tasks=removed,
            )
        for topic, payload in messages:
            self.mqtt.publish(topic, payload, qos=1, retain=True)
        log.info("homeassistant.announced", configs=len(messages), prefix=ha.discovery_prefix)

    async def _homeassistant_loop(self) -> None:
        """Each task's last answer, retained, at most once a second per task."""
        while True:
            await asyncio.sleep(1.0)
            if not self._ha_dirty or self.mqtt is None or not self.mqtt.connected:
                continue
            dirty, self._ha_dirty = self._ha_dirty, {}
            for task, res in dirty.items():
                topic = homeassistant.last_answer_topic(
                    self.settings.topics.prefix, self.settings.device_id, task
                )
                payload = homeassistant.last_answer_payload(res.model_dump(mode="json"))
                self.mqtt.publish(topic, payload, qos=0, retain=True)

    # -- signals ------------------------------------------------------------------

    def request_stop(self) -> None:
        log.info("daemon.stop_requested")
        self._stop.set()

    def request_reload(self) -> None:
        if self._reload_requested:
            return
        self._reload_requested = True
        self._spawn(self._reload(), "daemon:reload")

    async def _reload(self) -> None:
        """SIGHUP: re-read tasks and thresholds; jobs in flight finish on the old backends."""
        self.notifier.reloading()
        try:
            new, _ = load_settings(self.config_path)
        except ConfigError as exc:
            log.error("reload.invalid_config", error=str(exc))
            return
        finally:
            self._reload_requested = False
        if new.model_dump(exclude={"tasks"}) != self.settings.model_dump(exclude={"tasks"}):
            log.warning("reload.restart_needed", hint="only [tasks] change on reload")
        try:
            fresh = await self._build_runtimes(new.tasks)
        except FatalError as exc:
            log.error("reload.failed", error=str(exc))
            self.notifier.ready("reload failed; serving previous tasks")
            return
        old = self.runtimes
        self._configure_escalation(fresh)
        self.runtimes = fresh
        self.settings = self.settings.model_copy(update={"tasks": new.tasks})
        for rt in fresh.values():
            rt.start(self._deliver)
            self._watch_workers(rt)
        for rt in old.values():
            # Hand the queued jobs to the new runtime of the same task (or reject them).
            while not rt.queue.empty():
                p = rt.queue.get_nowait()
                self._open.discard(p.job.id)
                self._schedule(p.job, p.received_at)
            self._spawn(self._retire(rt), f"daemon:retire:{rt.name}")
        log.info("reload.done", tasks=sorted(fresh))
        self._announce_homeassistant(removed=sorted(set(old) - set(fresh)))
        self.notifier.ready(f"reloaded; serving {len(fresh)} task(s)")

    async def _swap_task(self, name: str) -> bool:
        """The learner promoted a new bundle version: reload just this task on it (like a
        SIGHUP for one task; the fingerprint changes, so old cache entries are not served)."""
        cfg = self.settings.tasks.get(name)
        if cfg is None:
            return False
        try:
            fresh = await self._build_runtimes({name: cfg})
        except FatalError as exc:
            log.error("learn.swap_failed", task=name, error=str(exc))
            return False
        old = self.runtimes.get(name)
        runtimes = {**self.runtimes, **fresh}
        self._configure_escalation(runtimes)
        self.runtimes = runtimes
        fresh[name].start(self._deliver)
        if old is not None:
            while not old.queue.empty():
                p = old.queue.get_nowait()
                self._open.discard(p.job.id)
                self._schedule(p.job, p.received_at)
            self._spawn(self._retire(old), f"daemon:retire:{name}")
        log.info("learn.swapped", task=name, model=fresh[name].backend.model_id)
        return True

    async def _retire(self, rt: TaskRuntime) -> None:
        # Let a batch in progress finish, then release the backend.
        await asyncio.sleep(rt.config.timeout_s)
        await rt.stop()
        rt.close()

    # -- shutdown -----------------------------------------------------------------

    async def _shutdown(self, *, graceful: bool) -> None:
        self.notifier.stopping()
        self._intake_open = False  # unacknowledged jobs stay with the broker
        deadline = time.monotonic() + (self.settings.runtime.drain_timeout_s if graceful else 0)
        while self._open and self.degraded is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # (degraded: nothing can commit; the journal has them)
        if self._open:
            log.warning("daemon.drain_timeout", open_jobs=len(self._open))
        # Results are committed; give the broker a moment to acknowledge what is in flight.
        flush_until = time.monotonic() + (5.0 if graceful else 0)
        while (
            self.mqtt is not None
            and self.mqtt.connected
            and (self._inflight or (self.store and self.store.outbox_depth))
            and time.monotonic() < flush_until
        ):
            self._wake_outbox.set()
            await asyncio.sleep(0.02)
        if (graceful or self._fatal) and self.mqtt is not None and self.mqtt.connected:
            status = (
                self._status_payload("stopped")
                if self._fatal is None
                else self._status_payload("failed", reason=truncate(self._fatal[0], 300))
            )
            mid = self.mqtt.publish(self.topics.status, status, retain=True)
            until = time.monotonic() + 2.0
            self._inflight[mid or -1] = -1
            while mid is not None and mid in self._inflight and time.monotonic() < until:
                await asyncio.sleep(0.02)
        for t in list(self._background):
            t.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.mqtt is not None:
            await asyncio.to_thread(self.mqtt.stop)
        if self._fatal is None or self._fatal[1] != EXIT_STATE_CORRUPT:
            self._flush_acked()
        await self._close_runtimes()
        self.metrics.close()
        if self.store is not None:
            self.store.close()
        log.info("daemon.stopped", graceful=graceful)

    async def _close_runtimes(self) -> None:
        for rt in self.runtimes.values():
            await rt.stop()
            rt.close()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._task_done)

    def _watch_workers(self, rt: TaskRuntime) -> None:
        # A dead worker would leave its task silently unanswered: treat it as a crashed task.
        for worker in rt._workers:
            worker.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, StoreError) and not isinstance(exc, StoreUnavailable):
                self._store_trouble(exc, task.get_name())  # a damaged file: its own exit code
                return
            self._fail(f"task {task.get_name()} crashed: {exc!r}", EXIT_FAILURE)


def _reason_label(reason: str) -> str:
    """A metric label from an MQTT reason string: "Not authorized" -> "not_authorized"."""
    return "_".join(reason.lower().split())[:40] or "unknown"


def run(settings: Settings, config_path: Path | None) -> int:
    return asyncio.run(Daemon(settings, config_path).run())
