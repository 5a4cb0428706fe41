"""Reply-topic scope end to end (issue 9, item 6) on a plain broker: the daemon itself
never publishes outside its namespace, whatever the broker would allow."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.broker import Broker
from tests.conftest import DaemonFactory
from tests.harness import REPO

pytestmark = pytest.mark.e2e


def test_jobs_cannot_make_the_daemon_publish_for_another_device(
    broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    d = daemon_factory(broker.port)
    d.wait_connected()
    c = client_factory(broker.port)
    c.subscribe("#")
    c.drain(0.3)
    refused = [
        "edgeagent/d2/results/alarm",
        "edgeagent/victim/x",
        "edgeagent/",
        "edgeagent//",
        f"edgeagent/{device}//x",
        f"edgeagent/{device}/status",
        f"edgeagent/{device}/cloud/replies",
        "edgeagent/cloud/requests/alarm",
    ]
    for i, topic in enumerate(refused):
        # Both ways of naming a reply topic: the v5 Response Topic and `reply_to`.
        c.publish(
            f"edgeagent/{device}/jobs/alarm",
            {"v": 1, "id": f"rt-{i}", "input": "smoke"},
            response_topic=topic,
        )
        c.publish(
            f"edgeagent/{device}/jobs/alarm",
            {"v": 1, "id": f"rj-{i}", "input": "smoke", "reply_to": topic},
        )
    own = f"edgeagent/{device}/replies/me/r"
    c.publish(
        f"edgeagent/{device}/jobs/alarm",
        {"v": 1, "id": "own", "input": "smoke"},
        response_topic=own,
    )
    published = c.collect(2 * len(refused) + 1, timeout=30, where=lambda m: "/jobs/" not in m.topic)
    published += [m for m in c.drain(1.0) if "/jobs/" not in m.topic]
    by_id = {}
    for m in published:
        data = json.loads(m.payload)
        if isinstance(data, dict) and "id" in data:
            by_id.setdefault(data["id"], []).append((m.topic, data))
    for i in range(len(refused)):
        for job_id in (f"rt-{i}", f"rj-{i}"):
            [(topic, res)] = by_id[job_id]
            assert topic == f"edgeagent/{device}/results/alarm", (job_id, topic)
            assert res["error"]["code"] == "reply_topic_not_allowed"
    [(topic, res)] = by_id["own"]
    assert topic == own and res["status"] == "ok"
    # Nothing else the daemon published: only its status and its own results/replies.
    for m in published:
        assert m.topic.startswith(f"edgeagent/{device}/"), m.topic


def test_submit_fleet_with_default_scope(
    broker: Broker, daemon_factory: DaemonFactory, device: str
) -> None:
    """`edgeagent submit --fleet` names no reply topic (any device may take the job) and
    reads the result from the taking device's results topic."""
    d = daemon_factory(broker.port, extra=f'[topics]\nfleet_group = "g-{device}"\n')
    d.wait_connected()
    out = subprocess.run(
        [sys.executable, "-m", "edgeagent", "submit", "--config", str(d.config), "alarm",
         "--fleet", "--text", "smoke in hall", "--timeout", "20"],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=os.environ.copy(),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    [result] = [json.loads(line) for line in out.stdout.splitlines()]
    assert result["output"] == {"label": "fire"}
