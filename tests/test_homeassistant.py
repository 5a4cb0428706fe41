"""Home Assistant MQTT discovery: retained configs with HA's keys, templates that render
against what the daemon really publishes, re-announcement on HA's birth message."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from edgeagent.homeassistant import (
    STATE_MAX_CHARS,
    discovery_messages,
    last_answer_payload,
)
from tests.broker import Broker
from tests.conftest import DaemonFactory

jinja2 = pytest.importorskip("jinja2")

# Keys of HA's MQTT `sensor` discovery schema that we use, with the shapes the docs give
# (from the Home Assistant MQTT discovery / MQTT sensor documentation, as remembered).
SENSOR_KEYS = {
    "name": str,
    "unique_id": str,
    "state_topic": str,
    "value_template": str,
    "unit_of_measurement": str,
    "state_class": str,
    "icon": str,
    "entity_category": str,
    "availability": list,
    "json_attributes_topic": str,
    "device": dict,
    "origin": dict,
    "qos": int,
}
DEVICE_KEYS = {"identifiers", "name", "manufacturer", "model", "sw_version"}
ORIGIN_KEYS = {"name", "sw_version", "support_url"}
AVAILABILITY_KEYS = {"topic", "value_template", "payload_available", "payload_not_available"}
STATE_CLASSES = {"measurement", "total", "total_increasing"}
ENTITY_CATEGORIES = {"config", "diagnostic"}


def render(template: str, payload: bytes) -> str:
    env = jinja2.Environment()
    return env.from_string(template).render(value_json=json.loads(payload), value=payload)


def check_config(config: dict[str, Any]) -> None:
    assert set(config) <= set(SENSOR_KEYS), set(config) - set(SENSOR_KEYS)
    for key, kind in SENSOR_KEYS.items():
        if key in config:
            assert isinstance(config[key], kind), key
    assert {"name", "unique_id", "state_topic", "device", "availability"} <= set(config)
    assert set(config["device"]) <= DEVICE_KEYS and config["device"]["identifiers"]
    assert set(config["origin"]) <= ORIGIN_KEYS and "name" in config["origin"]
    for a in config["availability"]:
        assert set(a) <= AVAILABILITY_KEYS and "topic" in a
    assert config.get("state_class", "measurement") in STATE_CLASSES
    assert config.get("entity_category", "diagnostic") in ENTITY_CATEGORIES
    assert config["icon"].startswith("mdi:") if "icon" in config else True


def test_configs_use_home_assistant_keys_and_unique_ids() -> None:
    msgs = discovery_messages(
        discovery_prefix="homeassistant", prefix="edgeagent", device="gw.1", tasks={"intent": "m"}
    )
    ids = set()
    for topic, payload in msgs:
        config = json.loads(payload)
        check_config(config)
        assert topic.startswith("homeassistant/sensor/edgeagent_gw_1/")
        assert topic.endswith("/config") and len(topic.split("/")) == 5
        ids.add(config["unique_id"])
    assert len(ids) == len(msgs) == 6


def test_last_answer_state_is_short_and_readable() -> None:
    ok = json.loads(last_answer_payload({"status": "ok", "output": {"label": "fire"}}))
    assert ok["answer"] == "fire"
    long = json.loads(last_answer_payload({"status": "ok", "output": {"text": "x" * 999}}))
    assert len(long["answer"]) == STATE_MAX_CHARS
    unrec = json.loads(
        last_answer_payload(
            {"status": "unrecognized", "output": None, "error": {"code": "low_confidence"}}
        )
    )
    assert (unrec["answer"], unrec["error"]) == ("unrecognized", "low_confidence")


@pytest.mark.e2e
def test_discovery_against_a_real_broker(
    broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    disc = f"ha{device}"
    c = client_factory(broker.port)
    c.subscribe(f"{disc}/#")
    c.subscribe(f"edgeagent/{device}/#")
    d = daemon_factory(
        broker.port,
        extra=f"[topics]\nstats_interval_s = 0.3\n[homeassistant]\nenabled = true\n"
        f'discovery_prefix = "{disc}"\n',
    )
    d.wait_connected()
    c.publish(f"edgeagent/{device}/jobs/alarm", {"v": 1, "id": "j1", "input": "smoke in hall"})
    seen: dict[str, bytes] = {}
    deadline = time.monotonic() + 30
    last_answer = f"edgeagent/{device}/ha/alarm"
    while time.monotonic() < deadline and not (
        len([t for t in seen if t.endswith("/config")]) == 7
        and last_answer in seen
        and json.loads(seen.get(f"edgeagent/{device}/stats", b"{}")).get("jobs")
    ):
        for m in c.drain(0.3):
            seen[m.topic] = m.payload
    configs = {t: json.loads(p) for t, p in seen.items() if t.endswith("/config")}
    assert len(configs) == 7  # 5 counters + a last answer per task (alarm, reading)
    for config in configs.values():
        check_config(config)
        if config["state_topic"] not in seen:  # a task that has answered nothing yet
            assert config["state_topic"] == f"edgeagent/{device}/ha/reading"
            continue
        source = seen[config["state_topic"]]
        state = render(config["value_template"], source)
        if "unit_of_measurement" in config:
            float(state)  # a number, as HA's sensor with a unit requires
        [avail] = config["availability"]
        assert render(avail["value_template"], seen[avail["topic"]]) == "online"
    alarm = next(c for c in configs.values() if c["state_topic"] == last_answer)
    assert render(alarm["value_template"], seen[last_answer]) == "fire"
    # Home Assistant restarts: it says `online` on its status topic; the configs come again.
    c.drain(0.3)
    c.publish(f"{disc}/status", "online")
    again: set[str] = set()
    deadline = time.monotonic() + 30
    while len(again) < 7 and time.monotonic() < deadline:
        again |= {m.topic for m in c.drain(0.3) if m.topic.endswith("/config")}
    assert again == set(configs)
    # The daemon stops: availability turns offline (from the retained `stopped` status).
    d.stop()
    status = next(m for m in c.drain(0.5) if m.topic == f"edgeagent/{device}/status")
    [avail] = alarm["availability"]
    assert render(avail["value_template"], status.payload) == "offline"
