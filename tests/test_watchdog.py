"""systemd's watchdog is fed from the event loop only while the daemon is healthy.

Issue 9: a regex held the GIL for seconds and the watchdog was starved; the reverse
matters as much: a daemon whose intake is wedged must stop feeding the watchdog, so
that systemd restarts it, however responsive its event loop still is.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edgeagent.config import load_settings
from edgeagent.daemon import Daemon


class Pings:
    def __init__(self) -> None:
        self.count = 0

    def watchdog(self) -> None:
        self.count += 1


class NamedTask:
    def __init__(self, name: str) -> None:
        self.name = name

    def get_name(self) -> str:
        return self.name


class Store:
    outbox_depth = 0


def daemon(tmp_path: Path) -> Daemon:
    config = tmp_path / "edgeagent.toml"
    config.write_text(f'device_id = "wd"\n[store]\nstate_dir = "{tmp_path}"\n')
    settings, _ = load_settings(config)
    d = Daemon(settings)
    d.store = Store()  # type: ignore[assignment]
    d._background.add(NamedTask("daemon:intake"))  # type: ignore[arg-type]
    return d


def test_health_reasons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("edgeagent.daemon.time.monotonic", lambda: clock[0])
    d = daemon(tmp_path)

    def check(lag: float = 0.0) -> str | None:
        return d._watchdog_withheld(lag, max_lag_s=5.0, wedged_after_s=10.0)

    assert check() is None
    assert check(lag=6.0) == "event_loop_lag"
    d._inbox.append(object())  # type: ignore[arg-type]  # a message nobody takes
    assert check() is None  # just arrived
    clock[0] += 11.0
    assert check() == "intake_wedged"
    d._intake_open = False  # intake paused on purpose (draining, full disk): not a wedge
    assert check() is None
    d._intake_open = True
    d._inbox.popleft()
    d._inbox.append(object())  # type: ignore[arg-type]  # progress: a new head
    assert check() is None
    d._background.clear()
    assert check() == "intake_stopped"


def test_loop_feeds_the_watchdog_while_healthy_and_stops_when_wedged(tmp_path: Path) -> None:
    d = daemon(tmp_path)
    pings = Pings()
    d.notifier = pings  # type: ignore[assignment]

    async def scenario() -> tuple[int, int, int]:
        task = asyncio.create_task(d._watchdog_loop(0.05), name="test:watchdog")
        try:
            while pings.count < 3:
                await asyncio.sleep(0.01)
            healthy = pings.count
            d._inbox.append(object())  # type: ignore[arg-type]  # intake never takes it
            await asyncio.sleep(0.5)  # the wedge is seen after one interval
            wedged_start = pings.count
            await asyncio.sleep(0.5)
            wedged_end = pings.count
            return healthy, wedged_start, wedged_end
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    healthy, wedged_start, wedged_end = asyncio.run(scenario())
    assert healthy >= 3
    assert wedged_end == wedged_start  # no ping at all while wedged
