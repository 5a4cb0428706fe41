"""Issue 9 end to end: the daemon subprocess over a real mosquitto, against hostile jobs,
a full state disk, a damaged or unusable state file and a crashed task.

Mounting a tmpfs needs root (CAP_SYS_ADMIN); those tests skip cleanly without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import sqlite3
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeagent import daemon as daemon_module
from edgeagent.config import load_settings
from edgeagent.daemon import Daemon
from tests.broker import Broker, free_port
from tests.conftest import DaemonFactory
from tests.harness import DaemonProcess, write_config

pytestmark = pytest.mark.e2e

SURROGATE_JOB = b'{"v":1,"id":"p1","input":"\\ud800"}'  # issue 9 item 1, verbatim


def _job(text: str, job_id: str) -> str:
    return json.dumps({"v": 1, "id": job_id, "input": text})


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def small_state(tmp_path: Path) -> Iterator[Path]:
    """tmp_path/state as an 8 MiB tmpfs (requested before daemon_factory: unmounted last)."""
    with _tmpfs(tmp_path / "state", "8m") as p:
        yield p


def test_surrogate_job_then_20_good_jobs_are_all_answered(
    broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    """Issue 9 item 1: before the fix the intake task died on this job, the daemon exited 0
    and the broker redelivered it at every start; the 20 jobs behind it were never answered."""
    d = daemon_factory(broker.port)
    d.wait_connected()
    c = client_factory(broker.port)
    c.subscribe(f"edgeagent/{device}/results/#")
    topic = f"edgeagent/{device}/jobs/alarm"
    c.publish_nowait(topic, SURROGATE_JOB)
    for i in range(20):
        c.publish_nowait(topic, _job(f"smoke {i}", f"g{i}"))
    c.wait_published()
    got = {json.loads(m.payload)["id"]: json.loads(m.payload) for m in c.collect(21, timeout=60)}
    assert set(got) == {"p1"} | {f"g{i}" for i in range(20)}
    assert got["p1"]["status"] == "rejected" and got["p1"]["error"]["code"] == "not_json"
    assert all(got[f"g{i}"]["status"] == "ok" for i in range(20))
    assert d.proc is not None and d.proc.poll() is None  # still running
    assert not [r for r in d.log_records() if r.get("event") == "daemon.fatal"]


def test_a_job_whose_results_topic_cannot_exist_is_quarantined(
    broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    """A job topic of 65,535 bytes is valid; its results topic (`jobs` -> `results`) is not,
    and publishing the rejection raised in the daemon at every start."""
    d = daemon_factory(broker.port)
    d.wait_connected()
    c = client_factory(broker.port)
    c.subscribe(f"edgeagent/{device}/results/#")
    head = f"edgeagent/{device}/jobs/"
    c.publish(head + "x" * (65535 - len(head)), _job("smoke", "long-1"))
    c.publish(head + "alarm", _job("smoke", "after-long"))
    [res] = c.collect(1, timeout=30)
    assert json.loads(res.payload)["id"] == "after-long"
    assert d.wait_for_log("job.quarantined")["error"].startswith("its results topic")
    assert d.proc is not None and d.proc.poll() is None


def test_an_id_reused_on_another_task_is_rejected_id_conflict(
    broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    """Issue 14 item 4: the second job used to get task A's stored result."""
    d = daemon_factory(broker.port)
    d.wait_connected()
    c = client_factory(broker.port)
    c.subscribe(f"edgeagent/{device}/results/#")
    c.publish(f"edgeagent/{device}/jobs/alarm", _job("smoke", "shared-1"))
    [first] = c.collect(1)
    assert json.loads(first.payload)["status"] == "ok"
    c.publish(f"edgeagent/{device}/jobs/reading", _job("device=a value=1", "shared-1"))
    [second] = c.collect(1)
    res = json.loads(second.payload)
    assert second.topic == f"edgeagent/{device}/results/reading"
    assert res["task"] == "reading" and res["status"] == "rejected"
    assert res["error"]["code"] == "id_conflict" and "alarm" in res["error"]["message"]


def test_full_state_disk_degrades_then_resumes_without_losing_a_job(
    small_state: Path, broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    metrics_port = free_port()
    d = daemon_factory(broker.port, env={"EDGEAGENT_METRICS__LISTEN": f"127.0.0.1:{metrics_port}"})
    d.wait_connected()
    c = client_factory(broker.port)
    c.subscribe(f"edgeagent/{device}/results/#")
    c.subscribe(f"edgeagent/{device}/status")
    topic = f"edgeagent/{device}/jobs/alarm"
    c.publish(topic, _job("smoke", "before"))
    assert [json.loads(m.payload)["id"] for m in c.collect(1, where=_results)] == ["before"]

    # Empty the WAL (the next commit must grow a file), then fill the file system.
    db = sqlite3.connect(small_state / "edgeagent.db")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    filler = small_state / "filler"
    with filler.open("wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    with pytest.raises(OSError) as full:
        (small_state / "probe").write_bytes(b"\0" * 8192)
    assert full.value.errno == errno.ENOSPC

    for i in range(20):
        c.publish_nowait(topic, _job(f"fire {i}", f"full-{i}"))
    c.wait_published()
    [status] = c.collect(1, timeout=60, where=lambda m: _state(m) == "degraded")
    assert json.loads(status.payload)["reason"] == "disk_full"
    assert d.proc is not None and d.proc.poll() is None
    assert d.wait_for_log("store.degraded")["reason"] == "disk_full"
    assert "edgeagent_degraded 1.0" in _metrics(metrics_port)

    filler.unlink()  # space returns: the daemon resumes by itself
    got = {json.loads(m.payload)["id"] for m in c.collect(20, timeout=120, where=_results)}
    assert got == {f"full-{i}" for i in range(20)}
    d.wait_for_log("store.recovered")
    assert "edgeagent_degraded 0.0" in _metrics(metrics_port)
    assert [r for r in d.log_records() if r.get("event") == "store.degraded"] != []
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0


@pytest.fixture
def tiny_state(tmp_path: Path) -> Iterator[Path]:
    """tmp_path/state as a 2 MiB tmpfs: the state disk of issue 9 item 3."""
    with _tmpfs(tmp_path / "state", "2m") as p:
        yield p


def test_a_2_mib_state_disk_is_not_filled_by_the_wal(
    tiny_state: Path, broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    """Issue 9 item 3: with SQLite's default checkpointing the WAL alone filled 2 MB after a
    few dozen jobs and the daemon stopped.  Now 400 jobs fit with room to spare."""
    d = daemon_factory(broker.port)
    d.wait_connected()
    c = client_factory(broker.port)
    c.subscribe(f"edgeagent/{device}/results/#")
    for i in range(400):
        c.publish_nowait(f"edgeagent/{device}/jobs/alarm", _job(f"smoke {i} in hall " * 3, f"s{i}"))
    c.wait_published()
    got = {json.loads(m.payload)["id"] for m in c.collect(400, timeout=120)}
    assert got == {f"s{i}" for i in range(400)}
    assert d.proc is not None and d.proc.poll() is None
    assert not [r for r in d.log_records() if r.get("event") in ("store.degraded", "daemon.fatal")]
    # Less than MIN_FREE_BYTES free at start: said once, and not fatal.
    low = [r for r in d.log_records() if r.get("event") == "store.low_space"]
    assert len(low) == 1 and low[0]["free_bytes"] < low[0]["min_free_bytes"]


def _metrics(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def _results(m: object) -> bool:
    return "/results/" in getattr(m, "topic", "")


def _state(m: object) -> str | None:
    if not getattr(m, "topic", "").endswith("/status"):
        return None
    return json.loads(getattr(m, "payload", b"{}")).get("state")


def test_a_page_damaged_at_run_time_is_fatal_with_its_own_exit_code(
    broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str, tmp_path: Path
) -> None:
    """Issue 9 item 2: this used to end in a drain and exit 0 (never restarted, never said)."""
    d = daemon_factory(broker.port)
    d.wait_connected()
    c = client_factory(broker.port)
    c.subscribe(f"edgeagent/{device}/results/#")
    topic = f"edgeagent/{device}/jobs/alarm"
    for i in range(30):
        c.publish_nowait(topic, _job(f"smoke {i} " + "x" * 500, f"w{i}"))
    c.wait_published()
    assert len(c.collect(30, timeout=60)) == 30
    path = tmp_path / "state" / "edgeagent.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page now lives in the main file
    db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('touch', '1')")
    db.commit()  # a new WAL frame: the daemon drops its page cache at its next read
    db.close()
    size = path.stat().st_size
    with path.open("r+b") as f:  # garbage over every page but the first (the schema)
        f.seek(4096)
        f.write(os.urandom(size - 4096))
    c.publish(topic, _job("smoke after", "after"))
    assert d.wait(60) == daemon_module.EXIT_STATE_CORRUPT
    fatal = [r for r in d.log_records() if r.get("event") == "daemon.fatal"]
    assert len(fatal) == 1 and "damaged" in fatal[0]["reason"]


def _start_fails(tmp_path: Path, port: int, state_dir: Path, name: str) -> tuple[int, str]:
    cfg = write_config(tmp_path / f"{name}.toml", port=port, state_dir=state_dir)
    d = DaemonProcess(cfg, tmp_path / f"{name}.log").start()
    try:
        code = d.wait(60)
    finally:
        d.stop()
    failed = [r for r in d.log_records() if r.get("event") == "daemon.start_failed"]
    assert len(failed) == 1, d.log_tail()
    return code, str(failed[0]["error"])


def test_state_open_errors_have_their_own_exit_code_and_message(
    broker: Broker, tmp_path: Path
) -> None:
    code, msg = _start_fails(tmp_path, broker.port, tmp_path / "absent" / "state", "missing")
    assert code == daemon_module.EXIT_STATE_MISSING and "is its disk mounted" in msg

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "edgeagent.db").write_bytes(b"SQLite format 3\0" + os.urandom(8192))
    code, msg = _start_fails(tmp_path, broker.port, corrupt, "corrupt")
    assert code == daemon_module.EXIT_STATE_CORRUPT and "damaged" in msg

    newer = tmp_path / "newer"
    newer.mkdir()
    from edgeagent.store import Store

    Store(newer / "edgeagent.db").close()
    db = sqlite3.connect(newer / "edgeagent.db")
    db.execute("UPDATE meta SET value='99' WHERE key='schema'")
    db.commit()
    db.close()
    code, msg = _start_fails(tmp_path, broker.port, newer, "newer")
    assert code == daemon_module.EXIT_STATE_NEWER and "newer edgeagent" in msg


def test_read_only_state_is_not_reported_as_damaged(broker: Broker, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    with _tmpfs(ro, "4m"):
        from edgeagent.store import Store

        Store(ro / "edgeagent.db").close()
        r = subprocess.run(["mount", "-o", "remount,ro", str(ro)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot remount read-only: {r.stderr.strip()}")
        code, msg = _start_fails(tmp_path, broker.port, ro, "ro")
    assert code == daemon_module.EXIT_STATE_READ_ONLY
    assert "read-only file system" in msg and "damaged" not in msg.replace("not damaged", "")


def test_a_crashed_background_task_exits_non_zero(
    broker: Broker, tmp_path: Path, device: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 9 item 2: any task crash used to end in exit 0, which Restart=on-failure ignores."""
    cfg = write_config(
        tmp_path / "c.toml", port=broker.port, state_dir=tmp_path / "state", device=device
    )
    settings, path = load_settings(cfg)

    async def main() -> int:
        d = Daemon(settings, path)
        run = asyncio.get_running_loop().create_task(d.run())
        for _ in range(600):
            if d.mqtt is not None and d.mqtt.connected:
                break
            await asyncio.sleep(0.05)

        async def crash() -> None:
            raise RuntimeError("boom " + uuid.uuid4().hex)

        d._spawn(crash(), "daemon:test-crash")
        return await asyncio.wait_for(run, 60)

    assert asyncio.run(main()) == daemon_module.EXIT_FAILURE
    out = capsys.readouterr()
    text = out.out + out.err
    assert "daemon.fatal" in text and "daemon:test-crash" in text


def test_a_job_with_200000_user_properties_does_not_freeze_the_daemon(
    broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    """MQTT v5 lets a producer attach any number of User Properties (the broker forwards
    them): 200,000 in one PUBLISH (1 MB) took paho's decoder minutes in the daemon's network
    thread, which holds the GIL, so no other job was answered meanwhile."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    d = daemon_factory(broker.port)
    d.wait_connected()
    c = client_factory(broker.port)
    c.subscribe(f"edgeagent/{device}/results/#")
    flood = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    flood.UserProperty = [("k", "v")] * 200_000
    topic = f"edgeagent/{device}/jobs/alarm"
    c.client.publish(topic, _job("smoke", "flood"), qos=1, properties=flood).wait_for_publish(30)
    c.publish(topic, _job("smoke", "after-flood"))
    got = {json.loads(m.payload)["id"]: json.loads(m.payload) for m in c.collect(2, timeout=60)}
    assert set(got) == {"flood", "after-flood"}
    assert all(r["status"] == "ok" for r in got.values())
    assert d.proc is not None and d.proc.poll() is None


def test_a_job_over_the_packet_cap_never_reaches_the_daemon(
    broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    """`mqtt.max_packet_bytes` (MQTT v5 Maximum Packet Size): the broker discards a bigger
    job for us instead of sending it (decoding holds ~3 copies: a job of hundreds of MB could
    exhaust a small device's memory, and the broker would send it again at every restart).
    Below the cap, a payload over `limits.max_payload_bytes` is still answered `too_large`."""
    d = daemon_factory(broker.port, mqtt_extra="max_packet_bytes = 1048576")
    d.wait_connected()
    c = client_factory(broker.port)
    c.subscribe(f"edgeagent/{device}/results/#")
    topic = f"edgeagent/{device}/jobs/alarm"
    c.publish(topic, _job("a" * 2_000_000, "over-cap"))
    c.publish(topic, _job("a" * 500_000, "over-limit"))
    c.publish(topic, _job("smoke", "normal"))
    got = [json.loads(m.payload) for m in c.collect(2, timeout=60) + c.drain(1.0)]
    # Two answers: the 500 kB job (too large to read its id: a derived one), the normal job.
    assert sorted((r["status"], (r.get("error") or {}).get("code")) for r in got) == [
        ("ok", None),
        ("rejected", "too_large"),
    ]
    assert [r["id"] for r in got if r["status"] == "ok"] == ["normal"]
    assert d.proc is not None and d.proc.poll() is None


def test_a_packet_cap_below_the_payload_limit_is_a_config_error() -> None:
    from pydantic import ValidationError

    from edgeagent.config import Settings

    with pytest.raises(ValidationError, match="max_packet_bytes"):
        Settings(mqtt={"max_packet_bytes": 100_000}, limits={"max_payload_bytes": 65536})
    Settings(mqtt={"max_packet_bytes": 0}, limits={"max_payload_bytes": 10_000_000})  # no cap
