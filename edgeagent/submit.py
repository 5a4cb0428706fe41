"""`edgeagent submit`: publish jobs and print their results as JSON lines.

The producer tool for humans and scripts.  MQTT v5: each job carries a
Response Topic under ``{prefix}/clients/{client}/`` and its id as Correlation
Data; with ``--v311`` the job names ``reply_to`` instead.  Exit 0 when every
job got a result, 3 when some did not before ``--timeout``, 1 if the broker
cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from edgeagent.config import Settings
from edgeagent.mqtt import ConnectOptions, Inbound, MqttAdapter

EXIT_TIMEOUT = 3


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
    return asyncio.run(_submit(settings, args, jobs))


async def _submit(settings: Settings, args: argparse.Namespace, jobs: list[dict[str, Any]]) -> int:
    loop = asyncio.get_running_loop()
    prefix = settings.topics.prefix
    device = args.device or settings.device_id
    client = f"submit-{uuid.uuid4().hex[:12]}"
    reply_topic = f"{prefix}/clients/{client}/results"
    v311 = bool(args.v311)
    pending = {str(j["id"]) for j in jobs}
    done = asyncio.Event()
    connected = asyncio.Event()
    if not pending:
        return 0

    def on_message(msg: Inbound) -> None:
        adapter.ack(msg)
        try:
            result = json.loads(msg.payload)
        except ValueError:
            return
        rid = str(result.get("id"))
        print(json.dumps(result, ensure_ascii=False), flush=True)
        pending.discard(rid)
        if not pending:
            done.set()

    m = settings.mqtt
    key = settings.tls_key_file()
    options = ConnectOptions(
        host=m.host,
        port=m.port,
        client_id=client,
        protocol="3.1.1" if v311 else "5",
        username=m.username,
        password=settings.mqtt_password(),
        tls=m.tls.enabled,
        ca_file=str(m.tls.ca_file) if m.tls.ca_file else None,
        cert_file=str(m.tls.cert_file) if m.tls.cert_file else None,
        key_file=str(key) if key else None,
        tls_insecure=m.tls.insecure_skip_verify,
        session_expiry_s=0,
        clean_start=True,
        reconnect_min_s=0.2,
        reconnect_max_s=2.0,
    )
    adapter = MqttAdapter(
        options,
        loop=loop,
        subscriptions=lambda: [reply_topic],
        on_message=on_message,
        on_connected=lambda _sp: connected.set(),
        on_disconnected=lambda: None,
        on_puback=lambda _mid: None,
        name="submit-mqtt",
    )
    adapter.start()
    deadline = time.monotonic() + args.timeout
    try:
        waiter: asyncio.Future[Any] = asyncio.ensure_future(connected.wait())
        fatal: asyncio.Future[Any] = adapter.fatal
        await asyncio.wait(
            {waiter, fatal},
            timeout=max(0.1, deadline - time.monotonic()),
            return_when=asyncio.FIRST_COMPLETED,
        )
        if adapter.fatal.done():
            print(f"edgeagent submit: {adapter.fatal.result()}", file=sys.stderr)
            return 1
        if not connected.is_set():
            waiter.cancel()
            print(f"edgeagent submit: cannot reach broker {m.host}:{m.port}", file=sys.stderr)
            return 1
        topic = (
            f"{prefix}/fleet/jobs/{args.task}"
            if args.fleet
            else f"{prefix}/{device}/jobs/{args.task}"
        )
        for job in jobs:
            if v311:
                job["reply_to"] = reply_topic
                adapter.publish(topic, json.dumps(job).encode())
            else:
                adapter.publish(
                    topic,
                    json.dumps(job).encode(),
                    correlation=str(job["id"]).encode(),
                    response_topic=reply_topic,
                )
        try:
            await asyncio.wait_for(done.wait(), max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            print(
                f"edgeagent submit: {len(pending)} of {len(jobs)} job(s) got no result "
                f"within {args.timeout}s",
                file=sys.stderr,
            )
            return EXIT_TIMEOUT
        return 0
    finally:
        await asyncio.to_thread(adapter.stop)
