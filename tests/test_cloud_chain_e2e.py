"""The whole chain: producer → `edgeagent run` → broker → `edgeagent cloud` → an
OpenAI-compatible endpoint (scripted, on loopback) → back to the producer."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from tests.broker import Broker
from tests.conftest import DaemonFactory
from tests.test_cloud_agent import API_KEY, CloudProcess, ScriptedLLM, llm, write_cloud_config

__all__ = ["llm"]  # the scripted endpoint fixture, shared with test_cloud_agent.py

pytestmark = pytest.mark.e2e

TASK = """
[tasks.alarm]
kind = "classify"
labels = ["fire", "intrusion", "water_leak"]
[tasks.alarm.backend]
type = "rules"
[[tasks.alarm.backend.rules]]
label = "intrusion"
keywords = ["door forced"]
"""


def test_low_confidence_jobs_come_back_answered_by_the_cloud_agent(
    own_broker: Broker,
    llm: ScriptedLLM,
    daemon_factory: DaemonFactory,
    client_factory,
    device: str,
    tmp_path: Path,
) -> None:
    key = tmp_path / "key"
    key.write_text(API_KEY)
    cfg = write_cloud_config(
        tmp_path / "cloud.toml",
        port=own_broker.port,
        base_url=llm.base_url,
        prefix="edgeagent",
        worker="w1",
        key_file=key,
    )
    agent = CloudProcess(cfg, tmp_path / "cloud.log", "w1").start()
    try:
        d = daemon_factory(own_broker.port, extra="[cloud]\nenabled = true\n", tasks=TASK)
        d.wait_connected()
        c = client_factory(own_broker.port)
        c.subscribe(f"edgeagent/{device}/results/#")
        agent.wait_for_log("cloud.connected", timeout=30)
        jobs = {
            "local": "door forced at the back",
            "cloud": f"classify|{uuid.uuid4().hex}",
            "retried": f"rate-limited|{uuid.uuid4().hex}",
        }
        for jid, text in jobs.items():
            c.publish(f"edgeagent/{device}/jobs/alarm", {"id": jid, "input": text})
        got = {json.loads(m.payload)["id"]: json.loads(m.payload) for m in c.collect(3, 60)}
        assert got["local"]["source"] == "local" and got["local"]["output"] == {
            "label": "intrusion"
        }
        for jid in ("cloud", "retried"):
            assert got[jid]["status"] == "ok", got[jid]
            assert got[jid]["source"] == "cloud" and got[jid]["output"] == {"label": "fire"}
            assert got[jid]["escalation"]["reason"] == "out_of_scope"
        assert len(llm.calls_for(jobs["retried"])) == 2  # 429 + Retry-After, then the answer
    finally:
        agent.stop()
