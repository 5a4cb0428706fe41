"""The demo's stand-in LLM (`edgeagent cloud-standin`), and the cloud agent surviving SIGHUP."""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path

import httpx
import pytest

from edgeagent.cloud.messages import CloudRequest
from edgeagent.cloud.prompts import build_messages, response_format
from edgeagent.cloud.standin import MODEL_NAME, classify, extract, serve
from tests.broker import Broker
from tests.test_cloud_agent import CloudProcess, write_cloud_config

LABELS = ["lights_on", "lights_off", "lock_door", "device_status", "oos"]


def test_classify_by_shared_words_and_out_of_scope_label() -> None:
    assert classify("what is the status of the boiler device", LABELS) == "device_status"
    assert classify("please lock the door", LABELS) == "lock_door"
    assert classify("what is the capital of France", LABELS) == "oos"
    assert classify("what is the capital of France", ["a_b", "c_d"]) == "a_b"


def test_extract_fills_schema_properties() -> None:
    schema = {
        "type": "object",
        "properties": {
            "device_id": {"type": "string"},
            "value": {"type": "number"},
            "unit": {"type": "string", "enum": ["C", "V"]},
        },
    }
    got = extract("12:00 device=th-12 temperature 21.5 C", schema)
    assert got == {"device_id": "th-12", "value": 21.5, "unit": "C"}
    got = extract("2026-11-26 07:12:03 WARN sensor=boiler-2 pressure 2.4 V", schema)
    assert got["value"] == 2.4
    assert extract("2026-11-26 load 7 of 9", schema)["value"] == 7.0


def test_answers_what_the_cloud_agent_asks_over_http() -> None:
    """The request body is the one `edgeagent cloud` builds; the answer parses as its JSON."""
    req = CloudRequest.model_validate(
        {
            "escalation_id": "e1",
            "device": "d",
            "task": "intent",
            "kind": "classify",
            "input": "switch the lights off",
            "labels": LABELS,
        }
    )
    server = serve("127.0.0.1", 0)
    try:
        port = server.server_address[1]
        body = {
            "model": "x",
            "messages": build_messages(req),
            "response_format": response_format(req, "json_schema", True),
        }
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=10)
        assert resp.status_code == 200
        data = resp.json()
        assert data["model"] == MODEL_NAME
        assert json.loads(data["choices"][0]["message"]["content"])["label"] in LABELS
        assert httpx.get(f"http://127.0.0.1:{port}/nope", timeout=10).status_code == 404
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.e2e
def test_cloud_agent_logs_and_survives_sighup(broker: Broker, tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("k\n")
    config = write_cloud_config(
        tmp_path / "cloud.toml",
        port=broker.port,
        base_url="http://127.0.0.1:9/v1",
        prefix=f"p{uuid.uuid4().hex[:8]}",
        worker="w1",
        key_file=key,
    )
    agent = CloudProcess(config, tmp_path / "cloud.log", "w1").start()
    try:
        agent.wait_for_log("cloud.connected")
        agent.signal(signal.SIGHUP)
        agent.wait_for_log("cloud.sighup_ignored")
        assert agent.proc is not None and agent.proc.poll() is None
        agent.signal(signal.SIGTERM)
        assert agent.wait() == 0
    finally:
        agent.stop()
