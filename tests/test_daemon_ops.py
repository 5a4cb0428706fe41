"""Operating the daemon: TLS/auth/ACL, fatal login errors, SIGHUP, sd_notify, metrics, submit."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.broker import Broker, free_port
from tests.conftest import DaemonFactory
from tests.harness import REPO, RULES_TASKS, write_config

pytestmark = pytest.mark.e2e

ACL = """
user edgeagent
topic readwrite edgeagent/#

user producer
topic readwrite edgeagent/#
topic readwrite forbidden/#
"""


@pytest.fixture
def secure_broker(tmp_path: Path) -> Broker:
    b = Broker(
        tmp_path / "secure-broker",
        tls=True,
        users={"edgeagent": "right-password", "producer": "p"},
        acl=ACL,
    )
    b.start()
    yield b  # type: ignore[misc]
    b.stop()


def _tls_extra(b: Broker) -> str:
    return f'username = "edgeagent"\n[mqtt.tls]\nenabled = true\nca_file = "{b.ca_file}"\n'


def _secure_pair(
    b: Broker, daemon_factory: DaemonFactory, client_factory: Any, tmp_path: Path
) -> tuple[Any, Any]:
    """The daemon (password from a file, TLS) and a producer, both connected to ``b``."""
    pw = tmp_path / "pw"
    pw.write_text("right-password\n")
    d = daemon_factory(b.port, mqtt_extra=f'password_file = "{pw}"\n' + _tls_extra(b))
    d.wait_connected()
    c = client_factory(b.port, username="producer", password="p", tls_ca=b.ca_file)
    return d, c


def test_tls_password_acl(
    secure_broker: Broker,
    daemon_factory: DaemonFactory,
    client_factory,
    device: str,
    tmp_path: Path,
) -> None:
    _d, c = _secure_pair(secure_broker, daemon_factory, client_factory, tmp_path)
    c.subscribe(f"edgeagent/{device}/results/#")
    c.subscribe("forbidden/#")
    c.publish(f"edgeagent/{device}/jobs/alarm", {"v": 1, "id": "s1", "input": "smoke"})
    # A job that asks for a reply outside the allowed prefix never makes the daemon publish there.
    c.publish(
        f"edgeagent/{device}/jobs/alarm",
        {"v": 1, "id": "s2", "input": "smoke"},
        response_topic="forbidden/steal",
    )
    msgs = c.collect(2, timeout=30) + c.drain(1.0)
    by_id = {json.loads(m.payload)["id"]: (m.topic, json.loads(m.payload)) for m in msgs}
    assert by_id["s1"][1]["status"] == "ok"
    assert not [m for m in msgs if m.topic.startswith("forbidden/")]
    assert by_id["s2"][1]["error"]["code"] == "reply_topic_not_allowed"
    assert by_id["s2"][0] == f"edgeagent/{device}/results/alarm"


def test_password_from_systemd_credential(
    secure_broker: Broker, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("right-password")
    d = daemon_factory(
        secure_broker.port,
        mqtt_extra=_tls_extra(secure_broker),
        env={"CREDENTIALS_DIRECTORY": str(creds)},
    )
    d.wait_connected()


def test_wrong_password_exits_cleanly_with_clear_message(
    secure_broker: Broker, daemon_factory: DaemonFactory
) -> None:
    d = daemon_factory(
        secure_broker.port,
        mqtt_extra=_tls_extra(secure_broker),
        env={"EDGEAGENT_MQTT__PASSWORD": "Zq9-not-the-password"},
    )
    assert d.wait(30) == 78  # EX_CONFIG: systemd's RestartPreventExitStatus stops a retry storm
    fatal = [r for r in d.log_records() if r.get("event") == "mqtt.fatal"]
    # mosquitto 2.0 answers a wrong password with 135 "not authorized" on v5
    assert fatal and "refused the connection" in fatal[0]["error"]
    assert "bad user name or password" in fatal[0]["error"] or "not authorized" in fatal[0]["error"]
    assert "Zq9-not" not in d.log_path.read_text()  # the secret is never logged


def test_untrusted_broker_certificate_is_fatal(
    secure_broker: Broker, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    d = daemon_factory(
        secure_broker.port,
        mqtt_extra='username = "edgeagent"\npassword = "right-password"\n'
        "[mqtt.tls]\nenabled = true\n",  # system CAs: our throwaway CA is not among them
    )
    assert d.wait(30) == 78
    assert any(r.get("event") == "mqtt.fatal" for r in d.log_records())


def test_sighup_reloads_tasks_without_losing_jobs(
    broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str, tmp_path: Path
) -> None:
    d = daemon_factory(broker.port)
    d.wait_connected()
    c = client_factory(broker.port)
    c.subscribe(f"edgeagent/{device}/results/#")
    c.publish(f"edgeagent/{device}/jobs/alarm", {"v": 1, "id": "h1", "input": "sparks seen"})
    [before] = c.collect(1)
    assert json.loads(before.payload)["status"] == "unrecognized"
    new_tasks = RULES_TASKS.replace(
        'keywords = ["smoke", "fire"]', 'keywords = ["smoke", "sparks"]'
    )
    write_config(
        d.config, port=broker.port, state_dir=tmp_path / "state", device=device, tasks=new_tasks
    )
    d.signal(signal.SIGHUP)
    d.wait_for_log("reload.done")
    c.publish(f"edgeagent/{device}/jobs/alarm", {"v": 1, "id": "h2", "input": "sparks seen"})
    [after] = c.collect(1)
    res = json.loads(after.payload)
    assert res["status"] == "ok" and res["output"] == {"label": "fire"}
    assert res["source"] == "local"  # a changed task config never serves the old cached answer
    # An invalid config on reload keeps the old tasks running.
    d.config.write_text("[mqtt]\nprot = 1\n")
    d.signal(signal.SIGHUP)
    d.wait_for_log("reload.invalid_config")
    c.publish(f"edgeagent/{device}/jobs/alarm", {"v": 1, "id": "h3", "input": "smoke"})
    [still] = c.collect(1)
    assert json.loads(still.payload)["status"] == "ok"


def test_sd_notify_ready_watchdog_stopping(
    broker: Broker, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(20)
    d = daemon_factory(
        broker.port,
        env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"},
        start=False,
    )
    d.env["NOTIFY_SOCKET"] = str(sock_path)  # the harness strips it by default
    d.start()
    seen: list[str] = []
    try:
        while not any("WATCHDOG=1" in m for m in seen) or not any("READY=1" in m for m in seen):
            seen.append(sock.recv(4096).decode())
        d.signal(signal.SIGTERM)
        while not any("STOPPING=1" in m for m in seen):
            seen.append(sock.recv(4096).decode())
    finally:
        sock.close()
    assert d.wait(30) == 0


def test_metrics_endpoint(
    broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    port = free_port()
    d = daemon_factory(broker.port, env={"EDGEAGENT_METRICS__LISTEN": f"127.0.0.1:{port}"})
    d.wait_connected()
    c = client_factory(broker.port)
    c.subscribe(f"edgeagent/{device}/results/#")
    c.publish(f"edgeagent/{device}/jobs/alarm", {"v": 1, "input": "smoke"})
    c.collect(1)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'edgeagent_jobs_total{source="local",status="ok",task="alarm"} 1.0' in body
    for name in (
        "edgeagent_job_latency_seconds_bucket",
        "edgeagent_queue_depth",
        "edgeagent_outbox_depth",
        "edgeagent_cache_total",
    ):
        assert name in body


def test_stats_topic(
    broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    c = client_factory(broker.port)
    c.subscribe(f"edgeagent/{device}/stats")
    d = daemon_factory(broker.port, extra="[topics]\nstats_interval_s = 0.5\n")
    d.wait_connected()
    [msg] = c.collect(1, timeout=10)
    stats = json.loads(msg.payload)
    assert stats["device"] == device and "latency_ms" in stats and "outbox_depth" in stats


def test_submit_cli(
    broker: Broker, daemon_factory: DaemonFactory, device: str, tmp_path: Path
) -> None:
    d = daemon_factory(broker.port)
    d.wait_connected()
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('"smoke in hall"\n{"input": "door forced", "id": "x-2"}\n')
    for extra in ([], ["--v311"]):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "edgeagent",
                "submit",
                "--config",
                str(d.config),
                "alarm",
                "--file",
                str(jobs),
                "--timeout",
                "20",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            env=os.environ.copy(),
        )
        assert out.returncode == 0, out.stderr
        results = [json.loads(line) for line in out.stdout.splitlines()]
        assert sorted(r["output"]["label"] for r in results) == ["fire", "intrusion"]
    # Nothing answers on another device: exit 3 after the timeout.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeagent",
            "submit",
            "--config",
            str(d.config),
            "alarm",
            "--text",
            "smoke",
            "--device",
            f"nobody-{uuid.uuid4().hex[:6]}",
            "--timeout",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert out.returncode == 3


def test_tls_burst_keeps_the_connection_intact(
    secure_broker: Broker,
    daemon_factory: DaemonFactory,
    client_factory,
    device: str,
    tmp_path: Path,
) -> None:
    """Acks and results are written while the network thread reads: with TLS that must never
    corrupt a record (all socket writes happen on the MQTT network thread)."""
    d, c = _secure_pair(secure_broker, daemon_factory, client_factory, tmp_path)
    c.subscribe(f"edgeagent/{device}/results/#")
    for i in range(300):
        c.publish_nowait(
            f"edgeagent/{device}/jobs/alarm", json.dumps({"id": f"b{i}", "input": f"smoke {i}"})
        )
    c.wait_published()
    got = {json.loads(m.payload)["id"] for m in c.collect(300, timeout=60)}
    assert got == {f"b{i}" for i in range(300)}
    # The fixture's start-up probe (a bare TCP connect to the TLS port, closed before any
    # handshake) is logged as an <unknown> client's protocol error: not one of ours.
    log = "\n".join(
        line
        for line in secure_broker.log_tail(10_000).splitlines()
        if "Client <unknown> disconnected: Protocol error" not in line
        and "unexpected eof while reading" not in line
    )
    assert "bad record mac" not in log and "Protocol error" not in log
    assert not [r for r in d.log_records() if r.get("event") == "mqtt.disconnected"]
