"""Test harness: a paho test client and the daemon as a real subprocess.

Tests may import paho directly (the rule "only mqtt.py imports paho" is about
the package).  Everything here has bounded waits.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPO = Path(__file__).resolve().parents[1]

RULES_TASKS = """
[tasks.alarm]
kind = "classify"
labels = ["fire", "intrusion", "water_leak"]
[tasks.alarm.backend]
type = "rules"
[[tasks.alarm.backend.rules]]
label = "fire"
keywords = ["smoke", "fire"]
[[tasks.alarm.backend.rules]]
label = "intrusion"
keywords = ["door forced", "glass break"]
[[tasks.alarm.backend.rules]]
label = "water_leak"
patterns = ["\\\\bwater\\\\b.*\\\\bleak"]

[tasks.reading]
kind = "extract"
[tasks.reading.schema]
type = "object"
required = ["device_id", "value"]
properties.device_id = { type = "string" }
properties.value = { type = "number" }
[tasks.reading.backend]
type = "rules"
fields.device_id = "device=([A-Za-z0-9_-]+)"
fields.value = "value=(-?[0-9.]+)"
"""


def write_config(
    path: Path,
    *,
    port: int,
    state_dir: Path,
    device: str = "dev1",
    extra: str = "",
    tasks: str = RULES_TASKS,
    mqtt_extra: str = "",
) -> Path:
    path.write_text(
        f"""
device_id = "{device}"
[mqtt]
host = "127.0.0.1"
port = {port}
reconnect_min_s = 0.1
reconnect_max_s = 1.0
{mqtt_extra}
[store]
state_dir = "{state_dir}"
synchronous = "normal"
[metrics]
listen = ""
[log]
format = "json"
level = "info"
{extra}
{tasks}
"""
    )
    return path


def _props(**kw: Any) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for k, v in kw.items():
        setattr(props, k, v)
    return props


class TestClient:
    """A synchronous MQTT client that collects what it receives."""

    __test__ = False

    def __init__(
        self,
        port: int,
        *,
        v5: bool = True,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        tls_ca: Path | None = None,
        persistent: bool = False,
    ) -> None:
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-{uuid.uuid4().hex[:10]}",
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        )
        self.client.max_inflight_messages_set(1000)
        if username:
            self.client.username_pw_set(username, password)
        if tls_ca:
            self.client.tls_set(ca_certs=str(tls_ca))
        self._subscribed = threading.Event()
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.reconnect_delay_set(1, 2)
        self._infos: list[paho.MQTTMessageInfo] = []
        connect_props = None
        if persistent and v5:
            connect_props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            connect_props.SessionExpiryInterval = 3600
        self.client.connect(
            "127.0.0.1",
            port,
            keepalive=30,
            clean_start=not persistent if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=connect_props,
        )
        self.client.loop_start()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self._subscribed.clear()
        self.client.subscribe(topic, qos)
        if not self._subscribed.wait(10):
            raise TimeoutError(f"no SUBACK for {topic}")

    def publish(
        self,
        topic: str,
        payload: bytes | str | dict[str, Any],
        *,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        qos: int = 1,
        retain: bool = False,
    ) -> None:
        data = json.dumps(payload) if isinstance(payload, dict) else payload
        props = None
        if response_topic or correlation:
            kw: dict[str, Any] = {}
            if response_topic:
                kw["ResponseTopic"] = response_topic
            if correlation:
                kw["CorrelationData"] = correlation
            props = _props(**kw)
        info = self.client.publish(topic, data, qos=qos, retain=retain, properties=props)
        info.wait_for_publish(10)

    def publish_nowait(self, topic: str, payload: bytes | str, qos: int = 1) -> None:
        self._infos.append(self.client.publish(topic, payload, qos=qos))

    def wait_published(self, timeout: float = 60.0) -> None:
        until = time.monotonic() + timeout
        for info in self._infos:
            info.wait_for_publish(max(0.1, until - time.monotonic()))
        self._infos.clear()

    def collect(
        self, n: int, timeout: float = 20.0, where: Callable[[paho.MQTTMessage], bool] | None = None
    ) -> list[paho.MQTTMessage]:
        """Wait for ``n`` messages (matching ``where``); return what arrived by the timeout."""
        out: list[paho.MQTTMessage] = []
        until = time.monotonic() + timeout
        while len(out) < n:
            left = until - time.monotonic()
            if left <= 0:
                break
            try:
                m = self.messages.get(timeout=left)
            except queue.Empty:
                break
            if where is None or where(m):
                out.append(m)
        return out

    def drain(self, quiet: float = 0.5) -> list[paho.MQTTMessage]:
        """Everything that arrives until nothing has for ``quiet`` seconds."""
        out: list[paho.MQTTMessage] = []
        while True:
            try:
                out.append(self.messages.get(timeout=quiet))
            except queue.Empty:
                return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def results_by_id(messages: list[paho.MQTTMessage]) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for m in messages:
        out.setdefault(json.loads(m.payload)["id"], []).append(bytes(m.payload))
    return out


class DaemonProcess:
    """``edgeagent run`` as a real subprocess."""

    def __init__(self, config: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.env.pop("NOTIFY_SOCKET", None)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeagent", "run", "--config", str(self.config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=REPO,
        )
        return self

    def wait_for_log(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            for rec in self.log_records():
                if rec.get("event") == event:
                    return rec
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.log_tail()}")
            time.sleep(0.05)
        raise TimeoutError(f"no {event!r} in daemon log:\n{self.log_tail()}")

    def wait_for_records(
        self, event: str, count: int, timeout: float = 30.0
    ) -> list[dict[str, Any]]:
        """The ``event`` records once there are at least ``count`` (a result is published
        as soon as its commit lands; its ``job.done`` line follows in the same loop turn)."""
        until = time.monotonic() + timeout
        while True:
            found = [r for r in self.log_records() if r.get("event") == event]
            if len(found) >= count or time.monotonic() > until:
                return found
            time.sleep(0.05)

    def wait_connected(self, timeout: float = 30.0) -> None:
        self.wait_for_log("mqtt.connected", timeout)

    def log_records(self) -> list[dict[str, Any]]:
        out: list[paho.MQTTMessage] = []
        if not self.log_path.exists():
            return out
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def log_tail(self, n: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if hasattr(self, "_log"):
            self._log.close()
