"""The daemon: builds everything from config; ordered start, signals, reload, phased
drain, the watchdog, status and health, and supervision of a failing state disk.

A job's life is not here: :mod:`edgeagent.pipeline` owns it from the MQTT message to
the published result.  The daemon wires the pipeline to the store, the broker, the task
runtimes and the escalator, starts its loops, and decides what a store failure means.

Thread model: one asyncio event loop owns all state (store, queues, in-flight
maps) and drives paho's socket (:mod:`edgeagent.mqtt`).  Inference threads, the store's
commit thread and the MQTT connect helper only hand results back with
``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import os
import random
import signal
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgeagent import __version__, homeassistant
from edgeagent.backends import BackendError
from edgeagent.backoff import backoff_delay
from edgeagent.config import (
    ConfigError,
    Settings,
    TaskConfig,
    load_settings,
    missing_model_hint,
)
from edgeagent.escalation import Escalator
from edgeagent.exitcodes import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_STATE_CORRUPT,
    EXIT_STATE_FULL,
    EXIT_STATE_IO,
    EXIT_STATE_MISSING,
    EXIT_STATE_NEWER,
    EXIT_STATE_READ_ONLY,
)
from edgeagent.learning.learner import Learner
from edgeagent.lifecycle import run_service, wait_for_stop
from edgeagent.logs import get_logger
from edgeagent.metrics import Metrics
from edgeagent.mqtt import ConnectOptions, Inbound, MqttAdapter, connect_options
from edgeagent.pipeline import Pipeline, TaskRuntime
from edgeagent.protocol import Limits, Topics, truncate
from edgeagent.store import MIN_FREE_BYTES, Store, StoreError, StoreUnavailable
from edgeagent.systemd import Notifier

log = get_logger("edgeagent.daemon")

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

CLOUD_STATUS_SETTLE_S = 0.5
"""At start, jobs wait this long after the first SUBACK before they are admitted, so the
cloud agents' retained statuses (sent by the broker right after the SUBACK) are known
first.  Jobs queued in our session arrive right after the CONNACK: admitted at once,
they found the cloud "unreachable" and got the offline policy (a `reject` task answered
`cloud_unavailable` with two workers online; tests/test_fleet_e2e.py)."""


class FatalError(Exception):
    """Start-up failed in a way a restart will not fix; ``exit_code`` says how to exit."""

    def __init__(self, message: str, exit_code: int = EXIT_CONFIG) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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
        self._inbox: collections.deque[Inbound] = collections.deque()
        """Job messages not yet admitted (the pipeline's inbox; the watchdog watches its head)."""
        self._stop = asyncio.Event()
        self._intake_open = True
        self._background: set[asyncio.Task[Any]] = set()
        self.mqtt: MqttAdapter | None = None
        self.escalator = Escalator(settings.cloud, self.topics, settings.device_id, self.metrics)
        self.pipeline = Pipeline(
            settings, self.topics, self.limits, self.metrics, self.escalator, self, self._inbox
        )
        self._reload_requested = False
        self._wd_head: Inbound | None = None  # the watchdog's view of the inbox head ...
        self._wd_head_since = 0.0  # ... and since when (monotonic seconds)
        self._fatal: tuple[str, int] | None = None  # (reason, exit code) of a fatal error
        self.degraded: str | None = None
        """Why the store refuses writes (``disk_full``, ``io_error``, ``read_only``, ``busy``)."""
        self._degraded_at = 0.0
        self._recovered_at = -1e9
        self._retry_attempt = 0
        self._retry_rng = random.Random()
        self._wake_retry = asyncio.Event()
        self.learner = Learner(
            settings.state_dir(), self.metrics, busy=lambda: not self.pipeline.idle()
        )
        self.pipeline.on_example = self.learner.on_example
        self._models_loaded = False
        self._held: list[Inbound] | None = (
            [] if settings.cloud.enabled and not settings.cloud.assume_online else None
        )
        """Jobs received before the cloud's status could be known (None: admit at once)."""
        self._rate_mark = (self.pipeline.tally.started, 0)  # (time, results) at the last stats

    # The pipeline holds the store and the task runtimes; the daemon opens, swaps and
    # closes them.
    @property
    def store(self) -> Store | None:
        return self.pipeline.store

    @store.setter
    def store(self, store: Store | None) -> None:
        self.pipeline.store = store

    @property
    def runtimes(self) -> dict[str, TaskRuntime]:
        return self.pipeline.runtimes

    @runtimes.setter
    def runtimes(self, runtimes: dict[str, TaskRuntime]) -> None:
        self.pipeline.runtimes = runtimes

    def accepting(self) -> bool:
        """Whether the pipeline may admit new jobs (False from the start of a drain, and
        once a fatal error has been seen: nothing more is journaled)."""
        return self._intake_open and self._fatal is None

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
        if await wait_for_stop(self._stop, fatal, "daemon") is not None:
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
            rt.start(self.pipeline.deliver)
            self._watch_workers(rt)
        # SIGTERM and SIGINT are lifecycle.run_service's; SIGHUP reloads from now on.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        self.pipeline.recover()
        self.mqtt = MqttAdapter(
            self._connect_options(),
            loop=loop,
            subscriptions=self._subscriptions,
            on_message=self._on_message,
            on_connected=self._on_connected,
            on_disconnected=self._on_disconnected,
            on_puback=self.pipeline.on_puback,
            on_publish_refused=self.pipeline.on_publish_refused,
            on_subscription_refused=self._on_subscription_refused,
        )
        self.mqtt.puback_may_wait = self.pipeline.puback_may_wait
        self.pipeline.mqtt = self.mqtt
        self.mqtt.start()
        self._spawn(self.pipeline.intake_loop(), "daemon:intake")
        self._spawn(self.pipeline.outbox_loop(), "daemon:outbox")
        self._spawn(self._housekeeping_loop(), "daemon:housekeeping")
        self._spawn(self._store_retry_loop(), "daemon:store-retry")
        self._spawn(self._maintain_loop(), "daemon:store-maintain")
        if s.cloud.enabled:
            self._spawn(self.pipeline.escalation_loop(), "daemon:escalation")
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
        """Called by the MQTT thread on every CONNACK (reads immutable data and the intake
        flag: a stopping daemon does not rejoin the fleet group)."""
        subs = [self.topics.jobs_filter]
        if self.topics.fleet_filter and self._intake_open:
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
        self.pipeline.wake_outbox.set()
        if self._held is not None:
            asyncio.get_running_loop().call_later(CLOUD_STATUS_SETTLE_S, self._release_held)

    def _release_held(self) -> None:
        held, self._held = self._held, None
        for msg in held or ():
            self.pipeline.receive(msg)

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
            self.pipeline.on_cloud_message(msg)
            return
        if self._held is not None:
            self._held.append(msg)  # not acknowledged yet: the broker's window bounds it
            return
        self.pipeline.receive(msg)

    def _on_subscription_refused(self, topic: str, reason_code: int, reason: str) -> None:
        """After a reconnect the broker refused one of our subscriptions (logged by mqtt.py;
        at start the same is fatal)."""
        self.metrics.subscriptions_refused.labels(topic).inc()
        self.notifier.status(f"broker refused subscription {topic}: {reason}")

    # -- periodic -----------------------------------------------------------------

    async def _housekeeping_loop(self) -> None:
        assert self.store is not None
        while True:
            await asyncio.sleep(300)
            try:  # also while degraded: rows past retention are the space to win back
                pruned = self.store.prune(retention_s=self.settings.store.journal_retention_s)
            except StoreError as exc:
                self.store_trouble(exc, "prune")
                continue
            if pruned:
                log.info("store.pruned", jobs=pruned)

    async def _maintain_loop(self) -> None:
        """Keep the state directory small: when idle, truncate the WAL and free pages."""
        assert self.store is not None
        while True:
            await asyncio.sleep(MAINTAIN_INTERVAL_S)
            if not self.pipeline.idle() or self.degraded is not None:
                continue
            try:
                self.store.maintain()
            except StoreUnavailable:
                continue  # a checkpoint that cannot run now runs later; nothing is lost
            except StoreError as exc:
                self.store_trouble(exc, "maintain")

    # -- store failures -------------------------------------------------------------

    def store_trouble(self, exc: BaseException, where: str) -> None:
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
            self._retry_attempt = 0  # a new episode, not a flapping one
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
                delay = backoff_delay(
                    self._retry_attempt, STORE_RETRY_MIN_S, STORE_RETRY_MAX_S, self._retry_rng
                )
                self._retry_attempt += 1
                await asyncio.sleep(delay)
                self._retry_store()
            self._wake_retry.clear()

    def _retry_store(self) -> None:
        assert self.store is not None
        try:
            self.store.probe()
        except StoreUnavailable:
            return
        except StoreError as exc:
            self.store_trouble(exc, "probe")
            return
        log.info(
            "store.recovered",
            reason=self.degraded,
            degraded_s=round(time.monotonic() - self._degraded_at, 1),
            waiting_results=self.pipeline.waiting,
            waiting_jobs=len(self._inbox),
        )
        self.degraded = None
        self._recovered_at = time.monotonic()
        self.metrics.degraded.set(0)
        self.notifier.status(f"connected; {len(self.runtimes)} task(s)")
        self._publish_status("online")
        self.pipeline.resume()

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
            and self.pipeline.has_capacity()
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
        st = self.pipeline.tally
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
                "queue_depth": len(self.pipeline.open),
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
            dirty = self.pipeline.tally.last_answers
            if not dirty or self.mqtt is None or not self.mqtt.connected:
                continue
            self.pipeline.tally.last_answers = {}
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
        self.pipeline.settings = self.settings
        for rt in fresh.values():
            rt.start(self.pipeline.deliver)
            self._watch_workers(rt)
        for rt in old.values():
            self.pipeline.requeue(rt)  # to the new runtime of the same task (or rejected)
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
        fresh[name].start(self.pipeline.deliver)
        if old is not None:
            self.pipeline.requeue(old)
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
        if self.mqtt is not None and self.topics.fleet_filter:
            # Leave the fleet group: mosquitto would go on dealing fleet jobs to this
            # stopped device's session (a day, mqtt.session_expiry_s), not to the others.
            self.mqtt.unsubscribe([self.topics.fleet_filter])
        deadline = time.monotonic() + (self.settings.runtime.drain_timeout_s if graceful else 0)
        jobs = self.pipeline
        while jobs.open and self.degraded is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # (degraded: nothing can commit; the journal has them)
        if jobs.open:
            log.warning("daemon.drain_timeout", open_jobs=len(jobs.open))
        # Results are committed; give the broker a moment to acknowledge what is in flight.
        flush_until = time.monotonic() + (5.0 if graceful else 0)
        while (
            self.mqtt is not None
            and self.mqtt.connected
            and (jobs.inflight or (self.store and self.store.outbox_depth))
            and time.monotonic() < flush_until
        ):
            jobs.wake_outbox.set()
            await asyncio.sleep(0.02)
        if (graceful or self._fatal) and self.mqtt is not None and self.mqtt.connected:
            status = (
                self._status_payload("stopped")
                if self._fatal is None
                else self._status_payload("failed", reason=truncate(self._fatal[0], 300))
            )
            mid = self.mqtt.publish(self.topics.status, status, retain=True)
            until = time.monotonic() + 2.0
            jobs.inflight[mid or -1] = -1  # not an outbox row: its PUBACK deletes nothing
            while mid is not None and mid in jobs.inflight and time.monotonic() < until:
                await asyncio.sleep(0.02)
        for t in list(self._background):
            t.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.mqtt is not None:
            await asyncio.to_thread(self.mqtt.stop)
        jobs.close(commit=self._fatal is None or self._fatal[1] != EXIT_STATE_CORRUPT)
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
                self.store_trouble(exc, task.get_name())  # a damaged file: its own exit code
                return
            self._fail(f"task {task.get_name()} crashed: {exc!r}", EXIT_FAILURE)


def run(settings: Settings, config_path: Path | None) -> int:
    """Run the daemon until SIGTERM/SIGINT; SIGHUP reloads once it has started."""
    return run_service(
        lambda: Daemon(settings, config_path),
        "daemon",
        hup_hint="the daemon is still starting: reload once it is ready",
    )
