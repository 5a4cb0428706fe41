"""/healthz and /readyz, `edgeagent status`, and `submit` against a stopped daemon.

The daemon runs as a subprocess against a real mosquitto; readiness is polled with
bounded waits (no timing assertions).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.broker import Broker, free_port
from tests.conftest import DaemonFactory
from tests.harness import REPO


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _until(url: str, code: int, timeout: float = 30.0) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    got = (0, "")
    while time.monotonic() < deadline:
        try:
            got = _get(url)
        except OSError:
            got = (0, "")
        if got[0] == code:
            return got
        time.sleep(0.1)
    return got


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeagent", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=os.environ.copy(),
    )


@pytest.mark.e2e
def test_healthz_readyz_and_unknown_paths(
    own_broker: Broker, daemon_factory: DaemonFactory
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    d = daemon_factory(own_broker.port, env={"EDGEAGENT_METRICS__LISTEN": f"127.0.0.1:{port}"})
    d.wait_connected()
    assert _until(f"{base}/readyz", 200) == (200, "ready\n")
    assert _get(f"{base}/healthz") == (200, "ok\n")
    status, body = _get(f"{base}/metrics")
    assert status == 200 and "edgeagent_queue_depth" in body
    status, body = _get(f"{base}/nope")
    assert status == 404 and "edgeagent_" not in body
    # Broker gone: alive, not ready, and the reason says which broker.
    own_broker.stop()
    status, body = _until(f"{base}/readyz", 503)
    assert status == 503, body
    assert f"broker: not connected to 127.0.0.1:{own_broker.port}" in body
    assert _get(f"{base}/healthz")[0] == 200
    own_broker.start()
    assert _until(f"{base}/readyz", 200)[0] == 200


@pytest.mark.e2e
def test_readyz_reports_an_unwritable_state_directory(
    broker: Broker, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes to read-only directories")
    port = free_port()
    d = daemon_factory(broker.port, env={"EDGEAGENT_METRICS__LISTEN": f"127.0.0.1:{port}"})
    d.wait_connected()
    state = tmp_path / "state"
    state.chmod(0o500)
    try:
        status, body = _until(f"http://127.0.0.1:{port}/readyz", 503)
        assert status == 503 and "is not writable" in body
    finally:
        state.chmod(0o700)


@pytest.mark.e2e
def test_status_table_for_device_and_fleet(
    broker: Broker, daemon_factory: DaemonFactory, device: str
) -> None:
    d = daemon_factory(broker.port, extra="[topics]\nstats_interval_s = 0.3\n")
    d.wait_connected()
    ok = _cli("submit", "--config", str(d.config), "alarm", "--text", "smoke in hall")
    assert ok.returncode == 0, ok.stderr
    d.wait_for_log("job.done")
    # Stats are retained: wait until one counts the job.
    deadline = time.monotonic() + 30
    rows: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        out = _cli("status", "--config", str(d.config), "--json")
        assert out.returncode == 0, out.stderr
        rows = [json.loads(line) for line in out.stdout.splitlines()]
        stats = rows[0]["stats"] if rows else None
        if isinstance(stats, dict) and sum(stats["jobs"].values()) >= 1:
            break
        time.sleep(0.2)
    [row] = rows
    assert row["device"] == device
    assert row["status"]["state"] == "online"  # type: ignore[index]
    assert row["status"]["models"]["alarm"].startswith("rules")  # type: ignore[index]
    table = _cli("status", "--config", str(d.config))
    header, line = table.stdout.splitlines()
    for col in ("DEVICE", "STATE", "UPTIME", "TASKS (MODEL)", "JOBS", "LOCAL", "ESCALATED"):
        assert col in header
    assert line.split()[:2] == [device, "online"]
    assert "100%" in line  # the one job was answered locally
    fleet = _cli("status", "--config", str(d.config), "--fleet")
    assert fleet.returncode == 0 and any(
        ln.split()[:2] == [device, "online"] for ln in fleet.stdout.splitlines()[1:]
    )
    # Stopped: the retained status says so, and submit refuses at once (exit 4, no publish).
    d.stop()
    out = _cli("status", "--config", str(d.config))
    assert out.stdout.splitlines()[1].split()[:2] == [device, "stopped"]
    refused = _cli(
        "submit", "--config", str(d.config), "alarm", "--text", "smoke", "--timeout", "30"
    )
    assert refused.returncode == 4, refused.stderr
    assert "'stopped'" in refused.stderr and "--offline-ok" in refused.stderr
    unknown = _cli("status", "--config", str(d.config), "--device", "nobody-here")
    assert unknown.returncode == 3


def test_readiness_reasons_before_start(tmp_path: Path) -> None:
    """Unit: a daemon that has loaded nothing and has no broker says so, and a missing
    state directory is a disk reason."""
    from edgeagent.config import Settings
    from edgeagent.daemon import Daemon

    settings = Settings(store={"state_dir": tmp_path / "missing"})  # type: ignore[arg-type]
    reasons = Daemon(settings).readiness()
    assert reasons[0] == "models: still loading"
    assert reasons[1] == "broker: not connected to 127.0.0.1:1883"
    assert reasons[2].startswith(f"disk: state directory {tmp_path / 'missing'}: ")
    (tmp_path / "missing").mkdir()
    assert len(Daemon(settings).readiness()) == 2


def test_status_rows_from_retained_payloads() -> None:
    """Unit: the table's local share and escalations come from the stats' sources."""
    from edgeagent.status import DeviceView, row

    view = DeviceView(
        "gw-1",
        status={"state": "online", "models": {"intent": "intent@3e1a"}, "since": "x"},
        stats={
            "uptime_s": 3725,
            "jobs": {"ok": 9, "unrecognized": 1},
            "sources": {"local": 6, "cache": 1, "cloud": 3},
            "escalations_in_flight": 2,
            "outbox_depth": 0,
        },
    )
    r = row(view)
    assert (r["STATE"], r["UPTIME"], r["JOBS"], r["LOCAL"]) == ("online", "1h2m", "10", "70%")
    assert r["ESCALATED"] == "3 (+2 waiting)" and r["TASKS (MODEL)"] == "intent=intent@3e1a"
    stopped = row(DeviceView("gw-2", status={"state": "stopped"}))
    assert (stopped["STATE"], stopped["UPTIME"], stopped["JOBS"]) == ("stopped", "-", "-")
