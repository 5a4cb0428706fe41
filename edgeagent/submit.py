"""`edgeagent submit`: publish jobs and print their results as JSON lines.

The producer tool for humans and scripts.  MQTT v5: each job carries the Response
Topic ``{prefix}/{device}/replies/[{user}/]{client}`` (in the target device's own
namespace, where a daemon replies by default; ``{user}`` is ``mqtt.username``) and
its id as Correlation Data; with ``--v311`` the job names ``reply_to`` instead.
``--fleet`` jobs name no reply topic (any device may take them): their results are
read from ``{prefix}/+/results/{task}``.  Exit 0 when every job got a result, 3 when
some did not before ``--timeout``, 1 if the broker cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeagent.config import Settings
from edgeagent.exitcodes import EXIT_NO_ANSWER, EXIT_OFFLINE
from edgeagent.mqtt import Inbound, MqttAdapter, connect_options

STATUS_WAIT_S = 1.0
"""How long to wait for the target's retained status after connecting (seconds)."""


def load_jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    if args.text:
        jobs = [{"input": t} for t in args.text]
    else:
        path = Path(args.file)
        stream = sys.stdin if str(path) == "-" else path.open(encoding="utf-8")
        with stream:
            for n, line in enumerate(stream, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except ValueError as exc:
                    raise SystemExit(f"edgeagent submit: {args.file}:{n}: not JSON: {exc}") from exc
                jobs.append(item if isinstance(item, dict) else {"input": item})
    for job in jobs:
        job.setdefault("v", 1)
        job.setdefault("id", uuid.uuid4().hex)
        if args.escalate:
            job.setdefault("escalate", args.escalate)
        if args.deadline_ms:
            job.setdefault("deadline_ms", args.deadline_ms)
    return jobs


def main(settings: Settings, args: argparse.Namespace) -> int:
    jobs = load_jobs(args)

    def show(result: dict[str, Any]) -> None:
        print(json.dumps(result, ensure_ascii=False), flush=True)

    try:
        missing = asyncio.run(
            exchange(
                settings,
                args.task,
                jobs,
                device=args.device,
                fleet=args.fleet,
                v311=args.v311,
                timeout=args.timeout,
                on_result=show,
                check_status=not (args.fleet or getattr(args, "offline_ok", False)),
                await_superseding=bool(getattr(args, "await_superseding", False)),
            )
        )
    except DeviceOffline as exc:
        print(f"edgeagent submit: {exc}", file=sys.stderr)
        return EXIT_OFFLINE
    except SubmitError as exc:
        print(f"edgeagent submit: {exc}", file=sys.stderr)
        return 1
    if missing:
        print(
            f"edgeagent submit: {len(missing)} of {len(jobs)} job(s) got no result "
            f"within {args.timeout}s",
            file=sys.stderr,
        )
        return EXIT_NO_ANSWER
    return 0


class SubmitError(Exception):
    """The broker cannot be reached or refused us."""


class DeviceOffline(SubmitError):
    """The target device's retained status says no daemon is serving it."""


def offline_message(topic: str, payload: bytes) -> str | None:
    """Why the retained status ``payload`` means nobody answers, or None if it is online."""
    try:
        status = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(status, dict) or status.get("state") in (None, "online"):
        return None
    since = f" since {status['since']}" if status.get("since") else ""
    return (
        f"no daemon is serving: {topic} says {status.get('state')!r}{since}.  Start it "
        "(systemctl start edgeagent), or pass --offline-ok to leave the jobs with the broker"
    )


async def exchange(
    settings: Settings,
    task: str,
    jobs: list[dict[str, Any]],
    *,
    device: str | None = None,
    fleet: bool = False,
    v311: bool = False,
    timeout: float = 30.0,
    on_result: Callable[[dict[str, Any]], None],
    await_superseding: bool = False,
    check_status: bool = False,
) -> set[str]:
    """Publish ``jobs`` to ``task`` and call ``on_result`` for every result that comes back.

    Returns the ids that got no result by ``timeout``.  With ``await_superseding``, a job
    whose result is provisional counts as done only once a superseding result arrives.
    With ``check_status``, the target device's retained status is read first (up to
    ``STATUS_WAIT_S``): if it says the daemon is not online, :class:`DeviceOffline` is
    raised and nothing is published.  No retained status at all: a warning, then publish.
    """
    loop = asyncio.get_running_loop()
    prefix = settings.topics.prefix
    target = device or settings.device_id
    client = f"submit-{uuid.uuid4().hex[:12]}"
    # A reply topic in the target device's own namespace: the only place a daemon replies
    # to by default.  A fleet job may be taken by any device, so its result comes on that
    # device's results topic (matched by id).
    # Under the broker user's name when there is one: the shipped mosquitto ACL lets only
    # that user read `{prefix}/+/replies/{user}/#`.
    user = settings.mqtt.username
    owner = f"{user}/{client}" if user and not set(user) & set("/+#\x00") else client
    reply_topic = None if fleet else f"{prefix}/{target}/replies/{owner}"
    listen = f"{prefix}/+/results/{task}" if reply_topic is None else reply_topic
    pending = {str(j["id"]) for j in jobs}
    ours = set(pending)
    done = asyncio.Event()
    connected = asyncio.Event()
    status_topic = f"{prefix}/{target}/status"
    status_seen = asyncio.Event()
    offline: list[str] = []
    if not pending:
        return set()

    def on_message(msg: Inbound) -> None:
        adapter.ack(msg)
        if msg.topic == status_topic:
            reason = offline_message(status_topic, msg.payload)
            if reason:
                offline.append(reason)
            status_seen.set()
            return
        try:
            result = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(result, dict) or str(result.get("id")) not in ours:
            return
        on_result(result)
        if not (await_superseding and result.get("provisional")):
            pending.discard(str(result.get("id")))
        if not pending:
            done.set()

    m = settings.mqtt
    key = settings.tls_key_file()
    options = connect_options(
        m,
        client_id=client,
        password=settings.mqtt_password(),
        key_file=key,
        protocol="3.1.1" if v311 else "5",
        session_expiry_s=0,
        clean_start=True,
        reconnect_min_s=0.2,
        reconnect_max_s=2.0,
        max_inflight=1000,
    )
    adapter = MqttAdapter(
        options,
        loop=loop,
        subscriptions=lambda: [listen, status_topic] if check_status else [listen],
        on_message=on_message,
        on_connected=lambda _sp: connected.set(),
        on_disconnected=lambda: None,
        on_puback=lambda _mid: None,
        name="submit-mqtt",
    )
    adapter.start()
    deadline = time.monotonic() + timeout
    try:
        waiter: asyncio.Future[Any] = asyncio.ensure_future(connected.wait())
        fatal: asyncio.Future[Any] = adapter.fatal
        await asyncio.wait(
            {waiter, fatal},
            timeout=max(0.1, deadline - time.monotonic()),
            return_when=asyncio.FIRST_COMPLETED,
        )
        if adapter.fatal.done():
            raise SubmitError(adapter.fatal.result())
        if not connected.is_set():
            waiter.cancel()
            raise SubmitError(f"cannot reach broker {m.host}:{m.port}")
        if check_status:
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):  # distinct on 3.10
                await asyncio.wait_for(status_seen.wait(), STATUS_WAIT_S)
            if offline:
                raise DeviceOffline(offline[0])
            if not status_seen.is_set():
                print(
                    f"edgeagent submit: warning: no retained status on {status_topic}; "
                    f"has a daemon with device id {target!r} ever run on this broker?",
                    file=sys.stderr,
                )
        topic = f"{prefix}/fleet/jobs/{task}" if fleet else f"{prefix}/{target}/jobs/{task}"
        for job in jobs:
            if v311:
                if reply_topic is not None:
                    job["reply_to"] = reply_topic
                adapter.publish(topic, json.dumps(job).encode())
            else:
                adapter.publish(
                    topic,
                    json.dumps(job).encode(),
                    correlation=str(job["id"]).encode(),
                    response_topic=reply_topic,
                )
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):  # distinct on 3.10
            await asyncio.wait_for(done.wait(), max(0.1, deadline - time.monotonic()))
        return set(pending)
    finally:
        await asyncio.to_thread(adapter.stop)
