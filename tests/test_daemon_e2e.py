"""End to end: the real `edgeagent run` subprocess, a real mosquitto, jobs over MQTT."""

from __future__ import annotations

import json
import signal
import time
import uuid

import pytest

from tests.broker import Broker
from tests.conftest import DaemonFactory
from tests.harness import TestClient, results_by_id

pytestmark = pytest.mark.e2e


def _job(text: str, job_id: str | None = None, **kw: object) -> dict[str, object]:
    return {"v": 1, "id": job_id or uuid.uuid4().hex, "input": text, **kw}


def test_v5_job_gets_result_with_correlation(
    broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    d = daemon_factory(broker.port)
    d.wait_connected()
    c: TestClient = client_factory(broker.port)
    c.subscribe(f"edgeagent/{device}/replies/me/#")
    c.publish(
        f"edgeagent/{device}/jobs/alarm",
        _job("smoke in the kitchen", "j1"),
        response_topic=f"edgeagent/{device}/replies/me/results",
        correlation=b"corr-1",
    )
    [msg] = c.collect(1)
    assert msg.topic == f"edgeagent/{device}/replies/me/results"
    assert msg.properties.CorrelationData == b"corr-1"
    res = json.loads(msg.payload)
    assert res["id"] == "j1"
    assert res["status"] == "ok"
    assert res["output"] == {"label": "fire"}
    assert res["source"] == "local"
    assert res["confidence"] == 1.0
    assert res["model"].startswith("rules@")


def test_extract_and_unrecognized(
    broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    d = daemon_factory(broker.port)
    d.wait_connected()
    c = client_factory(broker.port)
    c.subscribe(f"edgeagent/{device}/results/#")
    c.publish(f"edgeagent/{device}/jobs/reading", _job("t=4 device=th-9 value=21.5 ok", "r1"))
    c.publish(f"edgeagent/{device}/jobs/reading", _job("device=th-9 only", "r2"))
    c.publish(f"edgeagent/{device}/jobs/alarm", _job("all quiet", "a1"))
    got = {json.loads(m.payload)["id"]: json.loads(m.payload) for m in c.collect(3)}
    assert got["r1"]["status"] == "ok"
    assert got["r1"]["output"] == {"device_id": "th-9", "value": 21.5}
    assert got["r2"]["status"] == "unrecognized"
    assert got["r2"]["error"]["code"] == "schema_invalid"
    assert got["a1"]["status"] == "unrecognized"
    assert got["a1"]["error"]["code"] == "out_of_scope"


def test_v311_falls_back_to_results_topic_and_reply_to(
    broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    d = daemon_factory(broker.port)
    d.wait_connected()
    c = client_factory(broker.port, v5=False)
    c.subscribe(f"edgeagent/{device}/results/alarm")
    c.subscribe(f"edgeagent/{device}/replies/v3")
    c.publish(f"edgeagent/{device}/jobs/alarm", _job("glass break at door 2", "v3-a"))
    c.publish(
        f"edgeagent/{device}/jobs/alarm",
        _job("smoke", "v3-b", reply_to=f"edgeagent/{device}/replies/v3"),
    )
    got = {json.loads(m.payload)["id"]: m for m in c.collect(2)}
    assert got["v3-a"].topic == f"edgeagent/{device}/results/alarm"
    assert json.loads(got["v3-a"].payload)["output"] == {"label": "intrusion"}
    assert got["v3-b"].topic == f"edgeagent/{device}/replies/v3"


BAD_INPUTS = [
    (b"not json at all", "not_json"),
    (b"\xff\xfe\x00", "not_json"),
    (b"[1, 2, 3]", "not_an_object"),
    (b'{"v": 1, "input": 42}', "invalid_field"),
    (b'{"v": 1}', "invalid_field"),
    (b'{"v": 1, "input": "x", "deadline_ms": "soon"}', "invalid_field"),
    (b'{"v": 1, "input": "x", "escalate": "maybe"}', "invalid_field"),
    (b'{"v": 9, "input": "x"}', "unsupported_version"),
    (b'{"v": 1, "input": "' + b"a" * 20000 + b'"}', "input_too_large"),
    (b'{"v": 1, "input": "' + b"a" * 70000 + b'"}', "too_large"),
]


def test_bad_inputs_are_rejected_with_codes_and_daemon_keeps_serving(
    broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    d = daemon_factory(broker.port)
    d.wait_connected()
    c = client_factory(broker.port)
    c.subscribe(f"edgeagent/{device}/replies/bad/#")
    for i, (payload, _code) in enumerate(BAD_INPUTS):
        c.publish(
            f"edgeagent/{device}/jobs/alarm",
            payload,
            response_topic=f"edgeagent/{device}/replies/bad/r",
            correlation=str(i).encode(),
        )
    c.publish(
        f"edgeagent/{device}/jobs/nope",
        _job("x"),
        response_topic=f"edgeagent/{device}/replies/bad/r",
        correlation=b"unknown",
    )
    msgs = c.collect(len(BAD_INPUTS) + 1)
    codes = {m.properties.CorrelationData: json.loads(m.payload) for m in msgs}
    for i, (_payload, code) in enumerate(BAD_INPUTS):
        res = codes[str(i).encode()]
        assert res["status"] == "rejected", (i, res)
        assert res["error"]["code"] == code, (i, res)
    assert codes[b"unknown"]["error"]["code"] == "unknown_task"
    # ... and it still answers good jobs.
    c.publish(
        f"edgeagent/{device}/jobs/alarm",
        _job("fire!", "after"),
        response_topic=f"edgeagent/{device}/replies/bad/r",
    )
    [ok] = c.collect(1)
    assert json.loads(ok.payload)["status"] == "ok"
    assert d.proc is not None and d.proc.poll() is None


def test_reply_topic_outside_allowed_prefix_is_refused(
    broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    d = daemon_factory(broker.port)
    d.wait_connected()
    c = client_factory(broker.port)
    c.subscribe("elsewhere/#")
    c.subscribe(f"edgeagent/{device}/results/#")
    c.subscribe(f"edgeagent/{device}/jobs/#")
    c.drain(0.3)
    for topic in ("elsewhere/inbox", f"edgeagent/{device}/jobs/alarm", "edgeagent/x/status"):
        c.publish(f"edgeagent/{device}/jobs/alarm", _job("smoke"), response_topic=topic)
    msgs = c.drain(1.5)
    results = [m for m in msgs if "/results/" in m.topic]
    assert len(results) == 3
    assert all(json.loads(m.payload)["error"]["code"] == "reply_topic_not_allowed" for m in results)
    assert not [m for m in msgs if m.topic.startswith("elsewhere/")]
    # Only our own three job publishes on the jobs topic: the daemon never answered there.
    assert len([m for m in msgs if "/jobs/" in m.topic]) == 3


def test_same_id_twice_returns_stored_result_computed_once(
    broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    d = daemon_factory(broker.port)
    d.wait_connected()
    c = client_factory(broker.port)
    c.subscribe(f"edgeagent/{device}/results/#")
    c.publish(f"edgeagent/{device}/jobs/alarm", _job("smoke", "same-id"))
    [first] = c.collect(1)
    c.publish(f"edgeagent/{device}/jobs/alarm", _job("different text", "same-id"))
    [second] = c.collect(1)
    assert first.payload == second.payload  # byte-identical: the stored result
    done = [r for r in d.log_records() if r.get("event") == "job.done" and r["job_id"] == "same-id"]
    assert len(done) == 1


def test_cache_hit_for_repeated_input(
    broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    d = daemon_factory(broker.port)
    d.wait_connected()
    c = client_factory(broker.port)
    c.subscribe(f"edgeagent/{device}/results/#")
    c.publish(f"edgeagent/{device}/jobs/alarm", _job("smoke  in hall", "c1"))
    c.collect(1)
    c.publish(f"edgeagent/{device}/jobs/alarm", _job("smoke in hall ", "c2"))
    [hit] = c.collect(1)
    res = json.loads(hit.payload)
    assert res["source"] == "cache"
    assert res["output"] == {"label": "fire"}


def test_whitespace_variants_get_one_answer_and_blank_inputs_none(
    broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    """Issue 14: the cache normalised whitespace while the model saw the raw input, so
    which variant came first decided the answer; and a blank input got an invented one."""
    d = daemon_factory(broker.port)
    d.wait_connected()
    c = client_factory(broker.port)
    c.subscribe(f"edgeagent/{device}/results/#")
    # The rule's keyword is "glass break": only the normalised text contains it.
    c.publish(f"edgeagent/{device}/jobs/alarm", _job("glass\n   break in\tthe hall", "w1"))
    [first] = c.collect(1)
    c.publish(f"edgeagent/{device}/jobs/alarm", _job("glass break in the hall", "w2"))
    [second] = c.collect(1)
    a, b = json.loads(first.payload), json.loads(second.payload)
    assert (a["status"], a["source"], a["output"]) == ("ok", "local", {"label": "intrusion"})
    assert (b["status"], b["source"], b["output"]) == ("ok", "cache", {"label": "intrusion"})
    c.publish(f"edgeagent/{device}/jobs/reading", _job(" \n\t " * 1000, "blank"))
    [blank] = c.collect(1)
    res = json.loads(blank.payload)
    assert res["status"] == "unrecognized"
    assert res["error"]["code"] == "out_of_scope"
    assert "no letter or digit" in res["error"]["message"]
    c.publish(f"edgeagent/{device}/jobs/reading", _job("device=th-9 only", "partial"))
    [partial] = c.collect(1)
    res = json.loads(partial.payload)
    assert res["error"]["code"] == "schema_invalid"
    assert "'value' is a required property" in res["error"]["message"]  # names the field


def test_sigterm_drains_and_publishes_stopped_sigkill_leaves_offline(
    broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    c = client_factory(broker.port)
    c.subscribe(f"edgeagent/{device}/status")
    d = daemon_factory(broker.port)
    d.wait_connected()
    online = c.collect(1, where=lambda m: json.loads(m.payload)["state"] == "online")
    assert online
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0
    stopped = c.collect(1, where=lambda m: json.loads(m.payload)["state"] == "stopped")
    assert stopped, "no `stopped` status after SIGTERM"

    d2 = daemon_factory(broker.port)
    d2.wait_for_log("mqtt.connected")
    c.collect(1, where=lambda m: json.loads(m.payload)["state"] == "online")
    d2.kill()
    offline = c.collect(1, timeout=90, where=lambda m: json.loads(m.payload)["state"] == "offline")
    assert offline, "no `offline` last will after SIGKILL"
    # Retained: a newcomer sees the last state.
    late = client_factory(broker.port)
    late.subscribe(f"edgeagent/{device}/status")
    [retained] = late.collect(1)
    assert retained.retain and json.loads(retained.payload)["state"] == "offline"


def _burst(c: TestClient, device: str, n: int, tag: str) -> list[str]:
    ids = [f"{tag}-{i}" for i in range(n)]
    texts = ["smoke in hall", "door forced open", "water leak under sink", "nothing"]
    for i, jid in enumerate(ids):
        c.publish_nowait(
            f"edgeagent/{device}/jobs/alarm", json.dumps(_job(f"{texts[i % 4]} #{i}", jid))
        )
    return ids


def _assert_all_once(got: dict[str, list[bytes]], ids: list[str]) -> None:
    missing = set(ids) - set(got)
    assert not missing, f"{len(missing)} of {len(ids)} never answered: {sorted(missing)[:20]}"
    # Redelivery of a result is allowed by QoS 1; a second *computation* is not:
    # every copy of a job's result must be byte-identical (same latency_ms, same output).
    recomputed = [k for k, v in got.items() if len(set(v)) > 1]
    assert not recomputed, f"answered twice with different results: {recomputed[:5]}"


def _collect_ids(c: TestClient, ids: list[str], timeout: float) -> dict[str, list[bytes]]:
    """Collect results until every id has one (or the timeout), then linger for duplicates."""
    got: dict[str, list[bytes]] = {}
    want = set(ids)
    until = time.monotonic() + timeout
    while not want <= set(got) and time.monotonic() < until:
        for k, v in results_by_id(c.collect(1, timeout=min(2.0, until - time.monotonic()))).items():
            got.setdefault(k, []).extend(v)
    for k, v in results_by_id(c.drain(quiet=1.0)).items():
        got.setdefault(k, []).extend(v)
    return got


def _stop_mid_burst_then_restart(
    broker: Broker,
    daemon_factory: DaemonFactory,
    client_factory,
    device: str,
    *,
    jobs: int,
    stop_after: int,
    sig: signal.Signals,
) -> None:
    """Send a burst, stop the daemon with ``sig`` once some results are out, restart it:
    every job is answered, none computed twice."""
    # A persistent-session collector: a reconnect of its own under load loses nothing.
    c = client_factory(broker.port, client_id=f"collector-{device}", persistent=True)
    c.subscribe(f"edgeagent/{device}/results/#")
    d = daemon_factory(broker.port)
    d.wait_connected()
    ids = _burst(c, device, jobs, sig.name.lower())
    early = results_by_id(c.collect(stop_after, timeout=30))  # some, not all, are out
    d.signal(sig)
    code = d.wait(60)
    if sig == signal.SIGTERM:  # drained what it had taken, left the rest with the broker
        assert code == 0, f"exit {code}:\n{d.log_tail()}"
    d2 = daemon_factory(broker.port)
    d2.wait_connected()
    got = _collect_ids(c, [i for i in ids if i not in early], timeout=120)
    for k, v in early.items():
        got.setdefault(k, []).extend(v)
    _assert_all_once(got, ids)


def test_sigkill_mid_burst_loses_nothing(
    broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    _stop_mid_burst_then_restart(
        broker,
        daemon_factory,
        client_factory,
        device,
        jobs=1000,
        stop_after=150,
        sig=signal.SIGKILL,
    )


def test_broker_restart_mid_burst_loses_nothing(
    own_broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    # A persistent-session producer/collector: results published while it is away are queued.
    c = client_factory(own_broker.port, client_id=f"collector-{device}", persistent=True)
    c.subscribe(f"edgeagent/{device}/results/#")
    d = daemon_factory(own_broker.port)
    d.wait_connected()
    ids = _burst(c, device, 500, "b")
    c.wait_published()
    got = results_by_id(c.collect(50, timeout=30))
    own_broker.restart()
    for k, v in _collect_ids(c, [i for i in ids if i not in got], timeout=120).items():
        got.setdefault(k, []).extend(v)
    _assert_all_once(got, ids)
    assert d.proc is not None and d.proc.poll() is None


def test_sigterm_mid_burst_then_restart_answers_everything(
    broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    _stop_mid_burst_then_restart(
        broker,
        daemon_factory,
        client_factory,
        device,
        jobs=500,
        stop_after=50,
        sig=signal.SIGTERM,
    )
