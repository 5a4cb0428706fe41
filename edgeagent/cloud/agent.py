"""The cloud agent: escalation requests in over MQTT, a chat completion each, replies out.

Thread model: one event loop owns all state; it also drives the MQTT adapter's socket
(only a connect runs in a helper thread, which hands over with ``call_soon_threadsafe``);
httpx runs on the loop.

A request's life (PROTOCOL.md, "Escalation"):

```
PUBLISH on $share/{group}/{prefix}/cloud/requests/{task}   (QoS 1, not yet acked)
  → bounded queue (never fuller than the broker's Receive Maximum allows)
  → one of max_concurrency workers: parse + validate      (bad request: an `error` reply)
  → chat completion with retries, within the deadline     (past it: an `expired` reply)
  → validate the answer; one corrective retry             (still bad: `error`, invalid_output)
  → PUBLISH the reply on the Response Topic, QoS 1
  → broker's PUBACK → PUBACK of the request               (only now)
```

A crash before the last step gets the request redelivered: a reply can be sent
twice, never lost.  The daemon keys replies by ``escalation_id``.

The LLM is called at most once per escalation (``device``, ``escalation_id``) while
its answer is in flight or remembered: a redelivery that arrives while the first copy
is being answered is acknowledged with it, and a request re-sent after its reply went
out (a daemon that re-sends escalations it has no reply to yet) gets the remembered
reply re-published (:class:`RecentReplies`, bounded by ``agent.reply_cache_ttl_s`` and
``agent.reply_cache_max_entries``; per worker, in memory).

The wire messages are in :mod:`edgeagent.cloud.messages`, what the LLM is asked and how
its answer is checked in :mod:`edgeagent.cloud.prompts`; this module is the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import structlog

from edgeagent import __version__
from edgeagent.cloud.config import CloudSettings
from edgeagent.cloud.llm import LlmClient, LlmError
from edgeagent.cloud.messages import (
    DEADLINE_EXCEEDED,
    INTERNAL,
    INVALID_OUTPUT,
    BadRequest,
    CloudReply,
    CloudRequest,
    ReplyStatus,
    Usage,
    parse_request,
    reply_topic_for,
    short_str,
)
from edgeagent.cloud.prompts import (
    InvalidOutput,
    build_messages,
    check_output,
    corrective_messages,
    response_format,
)
from edgeagent.exitcodes import EXIT_CONFIG, EXIT_OK
from edgeagent.lifecycle import run_service, wait_for_stop
from edgeagent.logs import get_logger
from edgeagent.mqtt import ConnectOptions, Inbound, MqttAdapter, connect_options
from edgeagent.protocol import PROTOCOL_VERSION, ErrorInfo, truncate

log = get_logger("edgeagent.cloud")

EscalationKey = tuple[str, str]
"""(device, escalation_id): escalation ids are unique per device."""

CACHEABLE_ERRORS = frozenset({INVALID_OUTPUT})
"""Error replies worth remembering: asking again would cost the same calls for the same
answer.  Transient failures (deadline, upstream down) are not: a re-sent request is a
fresh attempt."""


class RecentReplies:
    """Replies already published, by escalation: bounded in age and number.

    ``ttl_s`` seconds of the ``clock`` (``time.monotonic``); at most ``max_entries``
    replies, the oldest dropped first.  Only replies a re-ask would not improve are kept
    (``ok``, and the errors in :data:`CACHEABLE_ERRORS`).
    """

    def __init__(
        self, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._items: OrderedDict[EscalationKey, tuple[float, CloudReply]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: EscalationKey) -> CloudReply | None:
        self._expire()
        item = self._items.get(key)
        return None if item is None else item[1]

    def put(self, key: EscalationKey, reply: CloudReply) -> bool:
        """Remember ``reply`` if it is worth it; True if it was kept."""
        if self.max_entries <= 0 or self.ttl_s <= 0:
            return False
        final_error = (
            reply.status == "error"
            and reply.error is not None
            and reply.error.code in CACHEABLE_ERRORS
        )
        if reply.status != "ok" and not final_error:
            return False
        self._items.pop(key, None)
        self._items[key] = (self._clock() + self.ttl_s, reply)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)
        self._expire()
        return True

    def _expire(self) -> None:
        now = self._clock()
        while self._items:
            key, (expires, _) = next(iter(self._items.items()))
            if expires > now:
                break
            del self._items[key]


@dataclass
class _Active:
    """A request being answered, and redeliveries of it that arrived meanwhile."""

    duplicates: list[Inbound]


class CloudAgent:
    """One worker of a shared-subscription group.  Create and run on the event loop."""

    def __init__(
        self,
        settings: CloudSettings,
        *,
        api_key: str | None,
        llm: LlmClient | None = None,
    ) -> None:
        self.settings = settings
        a = settings.agent
        self.prefix = a.prefix
        self.requests_filter = f"$share/{a.group}/{a.prefix}/cloud/requests/+"
        self.status_topic = (
            f"{a.prefix}/cloud/status/{a.worker_id}"
            if a.status_per_worker
            else f"{a.prefix}/cloud/status"
        )
        self.llm = llm or LlmClient(settings.llm, api_key)
        # The broker sends at most receive_maximum unacknowledged requests; the queue
        # holds them all (QoS 0 requests beyond it are refused, see _on_message).
        self._queue: asyncio.Queue[Inbound] = asyncio.Queue()
        self._queue_limit = settings.receive_maximum
        self._over_window_logged = False
        self._accepting = True
        self._stop = asyncio.Event()
        self._active: dict[EscalationKey, _Active] = {}
        self._recent = RecentReplies(a.reply_cache_ttl_s, a.reply_cache_max_entries)
        self._handling: set[asyncio.Task[Any]] = set()
        self._workers: list[asyncio.Task[None]] = []
        self._pubacks: dict[int, asyncio.Future[None]] = {}
        self._refused: dict[int, str] = {}  # packet id -> why the broker refused it
        self._started = time.time()
        self.mqtt: MqttAdapter | None = None

    # -- lifecycle ------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until :meth:`request_stop` (SIGTERM/SIGINT, see :func:`run`: exit 0) or a
        fatal broker error (exit 78)."""
        loop = asyncio.get_running_loop()
        self.mqtt = MqttAdapter(
            self._connect_options(),
            loop=loop,
            subscriptions=lambda: [self.requests_filter] if self._accepting else [],
            on_message=self._on_message,
            on_connected=self._on_connected,
            on_disconnected=lambda: log.warning("cloud.disconnected"),
            on_puback=self._on_puback,
            on_publish_refused=self._on_publish_refused,
            name="cloud-mqtt",
        )
        self._workers = [
            loop.create_task(self._worker(), name=f"cloud:worker:{i}")
            for i in range(self.settings.agent.max_concurrency)
        ]
        self.mqtt.start()
        s = self.settings
        log.info(
            "cloud.started",
            version=__version__,
            worker=s.agent.worker_id,
            subscription=self.requests_filter,
            model=s.llm.model,
            endpoint=s.llm.base_url,
            max_concurrency=s.agent.max_concurrency,
            receive_maximum=s.receive_maximum,
        )
        if await wait_for_stop(self._stop, self.mqtt.fatal, "cloud") is not None:
            await self._shutdown(graceful=False)
            return EXIT_CONFIG
        await self._shutdown(graceful=True)
        return EXIT_OK

    def request_stop(self) -> None:
        log.info("cloud.stop_requested")
        self._stop.set()

    async def _shutdown(self, *, graceful: bool) -> None:
        # 1. Stop intake: requests not yet started stay unacknowledged with the broker, and
        # leave the group, so that new requests go to the other workers (mosquitto deals
        # a member's share to its session while it is away: those waited for a re-send).
        self._accepting = False
        if self.mqtt is not None:
            self.mqtt.unsubscribe([self.requests_filter])
        for w in self._workers:
            if w not in self._handling:
                w.cancel()
        # 2. Drain what is in flight, within the deadline.
        busy = [w for w in self._workers if w in self._handling]
        if busy and graceful:
            _, pending = await asyncio.wait(busy, timeout=self.settings.agent.drain_timeout_s)
            if pending:
                log.warning("cloud.drain_timeout", in_flight=len(pending))
        # 3. Cancel the rest (their requests are redelivered).
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        # 4. Status `stopped`, then a clean disconnect (no last will).
        if self.mqtt is not None:
            if graceful and self.mqtt.connected:
                mid = self.mqtt.publish(
                    self.status_topic, self._status_payload("stopped"), retain=True
                )
                if mid is not None:
                    await self._await_puback(mid, 2.0)
            await asyncio.to_thread(self.mqtt.stop)
        await self.llm.aclose()
        log.info("cloud.stopped", graceful=graceful)

    def _connect_options(self) -> ConnectOptions:
        s = self.settings
        m = s.mqtt
        key = s.tls_key_file()
        return connect_options(
            m,
            client_id=s.client_id,
            password=s.mqtt_password(),
            key_file=key,
            protocol="5",
            receive_maximum=s.receive_maximum,
            will_topic=self.status_topic,
            will_payload=self._status_payload("offline", since=self._started),
        )

    def _status_payload(self, state: str, since: float | None = None) -> bytes:
        when = datetime.fromtimestamp(time.time() if since is None else since, tz=timezone.utc)
        return json.dumps(
            {
                "v": PROTOCOL_VERSION,
                "state": state,
                "worker": self.settings.agent.worker_id,
                "version": __version__,
                "since": when.isoformat(timespec="seconds"),
                "model": self.settings.llm.model,
            }
        ).encode()

    # -- MQTT callbacks (event loop thread, via call_soon_threadsafe) ------------------

    def _on_connected(self, session_present: bool) -> None:
        log.info("cloud.connected", session_present=session_present)
        if self.mqtt is not None and self._accepting:
            self.mqtt.publish(self.status_topic, self._status_payload("online"), retain=True)

    def _on_message(self, msg: Inbound) -> None:
        if not self._accepting:
            return  # shutting down: left unacknowledged, the broker redelivers it
        if self._queue.qsize() >= self._queue_limit:
            if msg.qos == 0:
                # Receive Maximum does not count QoS 0: such a request may be dropped.
                log.warning("cloud.queue_full", topic=msg.topic, qos=msg.qos)
                return
            # A QoS 1 request is never dropped: it would stay unacknowledged (the broker
            # redelivers it only after a reconnect) and its daemon would re-send it.
            # With mosquitto 2.0.11 this agent was seen holding 12 unacknowledged requests
            # (8 queued, 4 being answered) under a Receive Maximum of 8; dropping the
            # excess left 37 % of a burst unanswered (tests: burst_beyond_the_window).
            if not self._over_window_logged:
                self._over_window_logged = True
                log.warning(
                    "cloud.broker_exceeds_receive_maximum",
                    receive_maximum=self._queue_limit,
                    queued=self._queue.qsize(),
                )
        self._queue.put_nowait(msg)

    def _on_publish_refused(self, mid: int, reason_code: int, reason: str) -> None:
        """The broker refused a reply (PUBACK >= 0x80, e.g. its ACL): noted for _reply,
        which runs when the PUBACK itself arrives (just after this)."""
        self._refused[mid] = f"{reason} (reason code {reason_code})"

    def _on_puback(self, mid: int) -> None:
        fut = self._pubacks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _await_puback(self, mid: int, timeout: float) -> bool:
        fut = self._pubacks.setdefault(mid, asyncio.get_running_loop().create_future())
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except (TimeoutError, asyncio.TimeoutError):  # distinct classes on 3.10
            self._pubacks.pop(mid, None)
            return False
        return True

    # -- workers --------------------------------------------------------------------

    async def _worker(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        while self._accepting:
            msg = await self._queue.get()
            if not self._accepting:
                return
            self._handling.add(me)
            try:
                await self._handle(msg)
            except Exception as exc:  # a bug must not take the worker down
                log.exception("cloud.handler_crashed", error=repr(exc))
            finally:
                self._handling.discard(me)

    async def _handle(self, msg: Inbound) -> None:
        a = self.settings.agent
        try:
            req = parse_request(msg.payload, a.max_request_bytes)
        except BadRequest as bad:
            eid = bad.escalation_id or _decode(msg.correlation)
            with _bound(eid, bad.device, _task_of(msg.topic, self.prefix)):
                log.warning("cloud.bad_request", code=bad.code, error=str(bad))
                topic = self._reply_topic(msg, bad.device)
                if topic is not None:
                    reply = CloudReply(
                        escalation_id=eid,
                        status="error",
                        error=ErrorInfo(code=bad.code, message=str(bad)),
                    )
                    await self._reply(msg, topic, reply, [])
            return
        with _bound(req.escalation_id, req.device, req.task):
            topic = self._reply_topic(msg, req.device)
            if topic is None:
                return
            key = (req.device, req.escalation_id)
            active = self._active.get(key)
            if active is not None:
                # A redelivery of a request we are answering: ack it with the original.
                active.duplicates.append(msg)
                return
            known = self._recent.get(key)
            if known is not None:
                # Re-sent after we answered it: the same reply again, no second LLM call
                # (no tokens spent this time).
                log.info("cloud.request_answered_before", redelivered=msg.dup)
                await self._reply(msg, topic, known.model_copy(update={"usage": Usage()}), [])
                return
            active = self._active[key] = _Active([])
            try:
                await self._answer_and_reply(msg, topic, req, active.duplicates, key)
            finally:
                self._active.pop(key, None)

    def _reply_topic(self, msg: Inbound, device: str | None) -> str | None:
        """Where to reply; None (the request is logged and acknowledged) if nowhere safe."""
        topic = reply_topic_for(self.prefix, msg.response_topic, device)
        if topic is None:
            log.warning(
                "cloud.unanswerable",
                response_topic=truncate(msg.response_topic or "", 120),
                hint="the Response Topic must be {prefix}/{device}/cloud/replies",
            )
            assert self.mqtt is not None
            self.mqtt.ack(msg)
        return topic

    async def _answer_and_reply(
        self,
        msg: Inbound,
        topic: str,
        req: CloudRequest,
        duplicates: list[Inbound],
        key: EscalationKey,
    ) -> None:
        a = self.settings.agent
        patience_ms = min(req.deadline_ms or a.default_deadline_ms, a.max_deadline_ms)
        deadline = msg.received_at + (patience_ms - a.deadline_margin_ms) / 1000.0
        log.info(
            "cloud.request",
            kind=req.kind,
            input_chars=len(req.input) if isinstance(req.input, str) else None,
            deadline_ms=patience_ms,
            redelivered=msg.dup,
        )
        try:
            reply = await self.answer(req, deadline)
        except Exception as exc:  # a bug: answer with an error rather than stall the request
            log.exception("cloud.answer_crashed", error=repr(exc))
            reply = _error(req, INTERNAL, f"the cloud agent failed: {exc!r}", None, Usage())
        # Remembered before it is published: a copy re-sent while the PUBACK is awaited,
        # or after it never came, is answered without another call.
        self._recent.put(key, reply)
        await self._reply(msg, topic, reply, duplicates)

    async def answer(self, req: CloudRequest, deadline: float) -> CloudReply:
        """The reply to one valid request; ``deadline`` is a ``time.monotonic()`` instant."""
        cfg = self.settings.llm
        messages = build_messages(req)
        fmt = response_format(req, cfg.structured_output, cfg.strict_schema)
        usage = Usage()
        model: str | None = None
        try:
            for attempt in (1, 2):
                completion = await self.llm.chat(messages, response_format=fmt, deadline=deadline)
                usage.prompt_tokens += completion.prompt_tokens
                usage.completion_tokens += completion.completion_tokens
                model = completion.model
                try:
                    output = check_output(req, completion.content)
                except InvalidOutput as bad:
                    log.warning("cloud.invalid_output", attempt=attempt, reason=str(bad))
                    if attempt == 2:
                        return _error(req, INVALID_OUTPUT, str(bad), model, usage)
                    messages = messages + corrective_messages(req, completion.content, str(bad))
                    continue
                return CloudReply(
                    escalation_id=req.escalation_id,
                    status="ok",
                    output=output,
                    model=model,
                    usage=usage,
                )
        except LlmError as exc:
            status: ReplyStatus = "expired" if exc.code == DEADLINE_EXCEEDED else "error"
            return _error(req, exc.code, str(exc), model or cfg.model, usage, status)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _reply(
        self, msg: Inbound, topic: str, reply: CloudReply, duplicates: list[Inbound]
    ) -> None:
        """Publish ``reply``; once the broker has it, acknowledge the request (and its
        redeliveries).  Without a PUBACK in time the request stays unacknowledged."""
        assert self.mqtt is not None
        fields: dict[str, Any] = {
            "status": reply.status,
            "latency_ms": round((time.monotonic() - msg.received_at) * 1000, 1),
            "prompt_tokens": reply.usage.prompt_tokens,
            "completion_tokens": reply.usage.completion_tokens,
        }
        if reply.error is not None:
            fields["code"] = reply.error.code
            fields["error"] = truncate(reply.error.message, 300)
        correlation = msg.correlation
        if correlation is None and reply.escalation_id is not None:
            correlation = reply.escalation_id.encode()
        mid = self.mqtt.publish(topic, reply.to_bytes(), qos=1, correlation=correlation)
        if mid is None or not await self._await_puback(mid, self.settings.agent.publish_timeout_s):
            log.warning("cloud.reply_unconfirmed", topic=topic, **fields)
            return
        self._ack(msg, duplicates)
        refused = self._refused.pop(mid, None)
        if refused is not None:
            # Sending it again cannot help: the request is acknowledged, and the daemon's
            # escalation runs into its deadline and follows its offline policy.
            log.error(
                "cloud.reply_refused",
                topic=topic,
                reason=refused,
                hint="the broker's ACL must let this agent's user write {prefix}/+/cloud/replies",
                **fields,
            )
            return
        log.info("cloud.reply", topic=topic, **fields)

    def _ack(self, msg: Inbound, duplicates: list[Inbound]) -> None:
        assert self.mqtt is not None
        for m in (msg, *duplicates):
            self.mqtt.ack(m)
        duplicates.clear()


def _error(
    req: CloudRequest,
    code: str,
    message: str,
    model: str | None,
    usage: Usage,
    status: ReplyStatus = "error",
) -> CloudReply:
    return CloudReply(
        escalation_id=req.escalation_id,
        status=status,
        model=model,
        usage=usage,
        error=ErrorInfo(code=code, message=truncate(message, 500)),
    )


def _decode(data: bytes | None) -> str | None:
    if data is None:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return short_str(text)


def _task_of(topic: str, prefix: str) -> str | None:
    head = f"{prefix}/cloud/requests/"
    return topic[len(head) :] if topic.startswith(head) else None


@contextlib.contextmanager
def _bound(escalation_id: str | None, device: str | None, task: str | None) -> Iterator[None]:
    with structlog.contextvars.bound_contextvars(
        escalation_id=escalation_id, device=device, task=task
    ):
        yield


def run(settings: CloudSettings) -> int:
    """Run one worker until SIGTERM (reads the API key once, at start).  SIGHUP reloads
    nothing: it is logged (``cloud.sighup_ignored``) and the agent keeps serving."""
    return run_service(
        lambda: CloudAgent(settings, api_key=settings.api_key()),
        "cloud",
        hup_hint="restart to apply changes",
    )


__all__ = ["CloudAgent", "RecentReplies", "run"]
