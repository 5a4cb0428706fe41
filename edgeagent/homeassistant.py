"""Home Assistant MQTT discovery: the daemon as a device with sensors.  Pure: no I/O.

With ``[homeassistant] enabled``, the daemon publishes (retained) one discovery config
per sensor on ``{discovery_prefix}/sensor/{node}/{object}/config`` at every connect and
whenever Home Assistant announces itself (``{discovery_prefix}/status`` = ``online``),
as Frigate and Zigbee2MQTT do.  The device's availability is the daemon's retained status
topic; the counters come from its retained stats topic; each task's last answer from a
retained ``{prefix}/{device}/ha/{task}`` topic the daemon keeps up to date.

The config keys follow Home Assistant's MQTT discovery documentation for the `sensor`
platform (``name``, ``unique_id``, ``state_topic``, ``value_template``,
``unit_of_measurement``, ``state_class``, ``icon``, ``entity_category``,
``availability`` with ``topic``/``value_template``, ``json_attributes_topic``,
``device`` with ``identifiers``/``name``/``manufacturer``/``model``/``sw_version``,
``origin`` with ``name``/``sw_version``), written from memory of those
docs and checked by the tests against that list; full key names, no abbreviations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from edgeagent import __version__

ORIGIN = {"name": "edgeagent", "sw_version": __version__}

# Availability: the daemon's retained status is JSON; HA wants one of two payloads.
AVAILABILITY_TEMPLATE = "{{ 'online' if value_json.state == 'online' else 'offline' }}"

STATE_MAX_CHARS = 255
"""Home Assistant refuses sensor states longer than this."""


@dataclass(frozen=True)
class Sensor:
    """One counter from the stats payload."""

    key: str
    name: str
    template: str
    unit: str | None = None
    icon: str | None = None
    state_class: str | None = "measurement"
    diagnostic: bool = False


STATS_SENSORS: tuple[Sensor, ...] = (
    Sensor(
        "jobs_per_s",
        "Jobs per second",
        "{{ value_json.jobs_per_s | default(0) }}",
        unit="jobs/s",
        icon="mdi:speedometer",
    ),
    Sensor(
        "local_share",
        "Answered locally",
        "{{ ((value_json.local_share or 0) * 100) | round(1) }}",
        unit="%",
        icon="mdi:chip",
    ),
    Sensor(
        "escalation_rate",
        "Escalation rate",
        "{{ ((value_json.escalation_rate or 0) * 100) | round(1) }}",
        unit="%",
        icon="mdi:cloud-upload",
    ),
    Sensor(
        "queue_depth",
        "Queue depth",
        "{{ value_json.queue_depth }}",
        unit="jobs",
        icon="mdi:tray-full",
        diagnostic=True,
    ),
    Sensor(
        "outbox_depth",
        "Outbox depth",
        "{{ value_json.outbox_depth }}",
        unit="messages",
        icon="mdi:outbox",
        diagnostic=True,
    ),
)


def node_id(device: str) -> str:
    """The discovery node id: ``edgeagent_{device}`` with only [a-zA-Z0-9_-]."""
    return "edgeagent_" + "".join(c if c.isalnum() or c in "_-" else "_" for c in device)


def last_answer_topic(prefix: str, device: str, task: str) -> str:
    return f"{prefix}/{device}/ha/{task}"


def discovery_messages(
    *,
    discovery_prefix: str,
    prefix: str,
    device: str,
    tasks: dict[str, str],
) -> list[tuple[str, bytes]]:
    """(topic, retained payload) of every sensor config.  ``tasks``: name -> model id."""
    node = node_id(device)
    status_topic = f"{prefix}/{device}/status"
    stats_topic = f"{prefix}/{device}/stats"
    dev = {
        "identifiers": [node],
        "name": f"edgeagent {device}",
        "manufacturer": "edgeagent",
        "model": "edgeagent daemon",
        "sw_version": __version__,
    }
    common: dict[str, Any] = {
        "availability": [{"topic": status_topic, "value_template": AVAILABILITY_TEMPLATE}],
        "device": dev,
        "origin": ORIGIN,
        "qos": 0,
    }
    out: list[tuple[str, bytes]] = []
    for s in STATS_SENSORS:
        config: dict[str, Any] = {
            "name": s.name,
            "unique_id": f"{node}_{s.key}",
            "state_topic": stats_topic,
            "value_template": s.template,
            **common,
        }
        if s.unit:
            config["unit_of_measurement"] = s.unit
        if s.state_class:
            config["state_class"] = s.state_class
        if s.icon:
            config["icon"] = s.icon
        if s.diagnostic:
            config["entity_category"] = "diagnostic"
        out.append((f"{discovery_prefix}/sensor/{node}/{s.key}/config", _dump(config)))
    for task in sorted(tasks):
        topic = last_answer_topic(prefix, device, task)
        config = {
            "name": f"{task} last answer",
            "unique_id": f"{node}_task_{task}",
            "state_topic": topic,
            "value_template": "{{ value_json.answer }}",
            "json_attributes_topic": topic,
            "icon": "mdi:message-text",
            **common,
        }
        out.append((f"{discovery_prefix}/sensor/{node}/task_{task}/config", _dump(config)))
    return out


def removal_messages(
    *, discovery_prefix: str, device: str, tasks: list[str]
) -> list[tuple[str, bytes]]:
    """Empty retained configs: Home Assistant removes those entities (tasks removed by a
    reload)."""
    node = node_id(device)
    return [(f"{discovery_prefix}/sensor/{node}/task_{t}/config", b"") for t in sorted(tasks)]


def last_answer_payload(result: dict[str, Any]) -> bytes:
    """The retained payload of a task's last-answer topic for one result message.

    ``answer`` (the sensor state): the label of a classification, the text of a
    generation, else the compact JSON of the output, else the status; at most 255
    characters.  The other keys become the entity's attributes.
    """
    output = result.get("output")
    status = str(result.get("status"))
    answer: str
    if status != "ok" or output is None:
        answer = status
    elif isinstance(output, dict) and isinstance(output.get("label"), str):
        answer = output["label"]
    elif isinstance(output, dict) and isinstance(output.get("text"), str):
        answer = output["text"]
    else:
        answer = json.dumps(output, ensure_ascii=False, separators=(",", ":"))
    if len(answer) > STATE_MAX_CHARS:
        answer = answer[: STATE_MAX_CHARS - 1] + "…"
    error = result.get("error")
    return _dump(
        {
            "answer": answer,
            "status": status,
            "source": result.get("source"),
            "confidence": result.get("confidence"),
            "model": result.get("model"),
            "provisional": bool(result.get("provisional")),
            "error": error.get("code") if isinstance(error, dict) else None,
            "latency_ms": result.get("latency_ms"),
        }
    )


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
