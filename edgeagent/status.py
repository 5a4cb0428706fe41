"""`edgeagent status`: the retained status and stats of one device or the fleet, as a table.

Reads only what daemons already publish (PROTOCOL.md, "Status and stats"): the retained
``{prefix}/{device}/status`` (state, version, models, since) and the retained
``{prefix}/{device}/stats`` (counters, sent every ``topics.stats_interval_s``).  No
request goes to any daemon, so it works for stopped ones too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from edgeagent.config import Settings
from edgeagent.exitcodes import EXIT_NO_ANSWER
from edgeagent.mqtt import Inbound, MqttAdapter, connect_options

QUIET_S = 0.4
"""Retained messages come right after the SUBACK: stop after this long without one."""


@dataclass
class DeviceView:
    device: str
    status: dict[str, Any] | None = None
    stats: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def collect(
    settings: Settings, filters: list[str], *, timeout: float = 5.0
) -> tuple[list[Inbound], str | None]:
    """Subscribe to ``filters`` and return the retained messages (and an error, if any)."""
    return asyncio.run(_collect(settings, filters, timeout))


async def _collect(
    settings: Settings, filters: list[str], timeout: float
) -> tuple[list[Inbound], str | None]:
    loop = asyncio.get_running_loop()
    got: list[Inbound] = []
    last = [time.monotonic()]
    connected = asyncio.Event()

    def on_message(msg: Inbound) -> None:
        adapter.ack(msg)
        got.append(msg)
        last[0] = time.monotonic()

    options = connect_options(
        settings.mqtt,
        client_id=f"status-{uuid.uuid4().hex[:12]}",
        password=settings.mqtt_password(),
        key_file=settings.tls_key_file(),
        session_expiry_s=0,
        clean_start=True,
        reconnect_min_s=0.2,
        reconnect_max_s=1.0,
    )
    adapter = MqttAdapter(
        options,
        loop=loop,
        subscriptions=lambda: filters,
        on_message=on_message,
        on_connected=lambda _sp: connected.set(),
        on_disconnected=lambda: None,
        on_puback=lambda _mid: None,
        name="status-mqtt",
    )
    adapter.start()
    deadline = time.monotonic() + timeout
    try:
        while not connected.is_set() and time.monotonic() < deadline:
            if adapter.fatal.done():
                return [], adapter.fatal.result()
            await asyncio.sleep(0.05)
        if not connected.is_set():
            m = settings.mqtt
            return [], f"cannot reach broker {m.host}:{m.port}"
        last[0] = time.monotonic()
        while time.monotonic() < deadline:
            if adapter.subscriptions_refused is not None and time.monotonic() - last[0] > QUIET_S:
                break
            await asyncio.sleep(0.05)
        return got, None
    finally:
        await asyncio.to_thread(adapter.stop)


def views(messages: list[Inbound], prefix: str) -> dict[str, DeviceView]:
    """Group ``{prefix}/{device}/status|stats`` payloads by device (bad JSON ignored)."""
    out: dict[str, DeviceView] = {}
    for msg in messages:
        parts = msg.topic.split("/")
        if len(parts) != 3 or parts[0] != prefix or parts[2] not in ("status", "stats"):
            continue
        try:
            data = json.loads(msg.payload)
        except ValueError:
            continue
        if not isinstance(data, dict):
            continue
        view = out.setdefault(parts[1], DeviceView(parts[1]))
        if parts[2] == "status":
            view.status = data
        else:
            view.stats = data
    return out


def _fmt_uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60}m"
    if s >= 60:
        return f"{s // 60}m{s % 60}s"
    return f"{s}s"


def row(view: DeviceView) -> dict[str, str]:
    """One table row; '-' where the device has not published the value."""
    status = view.status or {}
    stats = view.stats or {}
    models = status.get("models") or {}
    tasks = (
        ", ".join(f"{t}={m}" for t, m in sorted(models.items()))
        if isinstance(models, dict)
        else "-"
    )
    jobs = stats.get("jobs") or {}
    total = sum(v for v in jobs.values() if isinstance(v, int)) if isinstance(jobs, dict) else 0
    sources = stats.get("sources") or {}
    answered = sum(sources.get(k, 0) for k in ("local", "cache", "cloud"))
    local = sources.get("local", 0) + sources.get("cache", 0)
    state = str(status.get("state", "-"))
    if status.get("warnings"):
        state += " (!)"
    return {
        "DEVICE": view.device,
        "STATE": state,
        "UPTIME": _fmt_uptime(stats.get("uptime_s")) if state == "online" else "-",
        "SINCE": str(status.get("since", "-")),
        "TASKS (MODEL)": tasks or "-",
        "JOBS": str(total) if view.stats else "-",
        "LOCAL": f"{100.0 * local / answered:.0f}%" if answered else "-",
        "ESCALATED": (
            f"{sources.get('cloud', 0)} (+{stats.get('escalations_in_flight', 0)} waiting)"
            if view.stats
            else "-"
        ),
        "OUTBOX": str(stats.get("outbox_depth", "-")),
    }


def table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols).rstrip()]
    lines += ["  ".join(r[c].ljust(width[c]) for c in cols).rstrip() for r in rows]
    return "\n".join(lines)


def main(settings: Settings, args: argparse.Namespace) -> int:
    prefix = settings.topics.prefix
    device = "+" if args.fleet else (args.device or settings.device_id)
    filters = [f"{prefix}/{device}/status", f"{prefix}/{device}/stats"]
    messages, error = collect(settings, filters, timeout=args.timeout)
    if error:
        print(f"edgeagent status: {error}", file=sys.stderr)
        return 1
    found = views(messages, prefix)
    found.pop("cloud", None)  # the cloud agents' status has another shape
    if not found:
        where = f"{prefix}/+/status" if args.fleet else f"{prefix}/{device}/status"
        print(f"edgeagent status: no retained status on {where}", file=sys.stderr)
        return EXIT_NO_ANSWER
    if args.json:
        for v in sorted(found.values(), key=lambda v: v.device):
            print(json.dumps({"device": v.device, "status": v.status, "stats": v.stats}))
        return 0
    ordered = sorted(found.values(), key=lambda v: v.device)
    print(table([row(v) for v in ordered]))
    for v in ordered:
        for w in (v.status or {}).get("warnings") or []:
            print(f"(!) {v.device}: {w}")
    return 0
