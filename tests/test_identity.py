"""Two daemons with one client id: the clash is detected, logged once, backed off, reported."""

from __future__ import annotations

import json
import time

import pytest

from edgeagent.mqtt import TakeoverDetector
from tests.broker import Broker
from tests.conftest import DaemonFactory


def test_detector_needs_repeated_short_connections_and_clears_when_stable() -> None:
    t = TakeoverDetector()
    assert not t.connection_ended(0.5)
    assert not t.connection_ended(30.0)  # a normal reconnect resets the count
    assert not t.connection_ended(0.5) and not t.connection_ended(0.4)
    assert t.connection_ended(0.3)
    assert t.newly_detected() and not t.newly_detected()  # logged once
    assert t.connection_ended(0.2)
    assert not t.connection_ended(t.STABLE_S)
    assert not t.active
    assert t.BACKOFF_S[0] <= t.backoff_s(0.5) <= t.BACKOFF_S[1]


@pytest.mark.e2e
@pytest.mark.slow
def test_two_daemons_with_one_device_id(
    own_broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    c = client_factory(own_broker.port)
    c.subscribe(f"edgeagent/{device}/status")
    a = daemon_factory(own_broker.port)
    a.wait_connected()
    b = daemon_factory(own_broker.port)
    deadline = time.monotonic() + 60
    found = None
    while time.monotonic() < deadline and found is None:
        for d in (a, b):
            recs = [r for r in d.log_records() if r.get("event") == "mqtt.client_id_conflict"]
            if recs:
                found = (d, recs)
        time.sleep(0.2)
    assert found is not None, a.log_tail() + b.log_tail()
    d, recs = found
    assert len(recs) == 1 and recs[0]["backoff_s"] >= 30
    assert "device_id" in recs[0]["hint"]
    # While it backs off (30-60 s) the other one keeps its connection; when it comes back
    # it says so on the retained status, and the clash is logged no more than once.
    warned = None
    deadline = time.monotonic() + 120
    while warned is None and time.monotonic() < deadline:
        for m in c.drain(0.5):
            status = json.loads(m.payload)
            if status.get("warnings"):
                warned = status
    assert warned is not None and "client_id_conflict" in warned["warnings"][0]
    assert len([r for r in d.log_records() if r.get("event") == "mqtt.client_id_conflict"]) == 1
