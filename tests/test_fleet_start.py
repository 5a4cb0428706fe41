"""Unit: at start, a daemon with escalation admits jobs only once the cloud workers'
retained statuses can be known (jobs queued in its session arrive before them)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from edgeagent.config import Settings
from edgeagent.daemon import Daemon
from edgeagent.mqtt import Inbound


def _msg(topic: str, payload: bytes, mid: int) -> Inbound:
    return Inbound(topic=topic, payload=payload, qos=1, mid=mid, dup=False, generation=1)


def test_jobs_before_the_first_suback_wait_for_the_cloud_status(tmp_path: Path) -> None:
    settings = Settings(  # type: ignore[call-arg]
        device_id="d", cloud={"enabled": True}, store={"state_dir": tmp_path}
    )
    received: list[Inbound] = []
    cloud: list[Inbound] = []

    async def main() -> None:
        d = Daemon(settings)
        d.pipeline.receive = received.append  # type: ignore[method-assign]
        d.pipeline.on_cloud_message = cloud.append  # type: ignore[method-assign]
        queued = _msg("edgeagent/d/jobs/alarm", b'{"input": "x"}', 1)
        status = _msg("edgeagent/cloud/status/w1", b'{"state": "online"}', 2)
        d._on_message(queued)  # from the session, right after the CONNACK
        d._on_connected(True)  # the SUBACK; the retained statuses follow it
        d._on_message(status)
        assert (received, cloud) == ([], [status])
        until = time.monotonic() + 10
        while not received and time.monotonic() < until:
            await asyncio.sleep(0.05)
        assert received == [queued]  # admitted after the status was handed over
        later = _msg("edgeagent/d/jobs/alarm", b'{"input": "y"}', 3)
        d._on_message(later)
        assert received == [queued, later]  # from then on, at once
        d.metrics.close()

    asyncio.run(main())


def test_without_escalation_jobs_are_admitted_at_once(tmp_path: Path) -> None:
    d = Daemon(Settings(device_id="d", store={"state_dir": tmp_path}))  # type: ignore[call-arg]
    received: list[Inbound] = []
    d.pipeline.receive = received.append  # type: ignore[method-assign]
    job = _msg("edgeagent/d/jobs/alarm", b"{}", 1)
    d._on_message(job)
    assert received == [job]
    d.metrics.close()
