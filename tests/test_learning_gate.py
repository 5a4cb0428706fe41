"""The refit yields to jobs (edgeagent.learning.gate) and never outlives the daemon."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edgeagent.learning.gate import GateStats, yield_to_jobs
from edgeagent.learning.refit import PARENT_ENV

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="process states from /proc (Linux)"
)

REPO = Path(__file__).resolve().parents[1]
SPIN = "while True:\n    pass\n"


def state(pid: int) -> str:
    """The process's state letter from /proc (R running, S sleeping, T stopped, ...)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "gone"
    return stat.rsplit(")", 1)[1].split()[0]


async def until(pred, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        await asyncio.sleep(0.01)
    return bool(pred())


@pytest.fixture
def spinner():  # type: ignore[no-untyped-def]
    proc = subprocess.Popen([sys.executable, "-c", SPIN])
    yield proc
    proc.kill()
    proc.wait()


def test_the_refit_is_stopped_while_jobs_are_in_flight_and_continues_after(spinner) -> None:  # type: ignore[no-untyped-def]
    busy = [False]
    stats = GateStats()

    async def main() -> None:
        gate = asyncio.create_task(yield_to_jobs(spinner.pid, lambda: busy[0], 0.02, 0.01, stats))
        await asyncio.sleep(0.1)
        assert state(spinner.pid) != "T"  # idle daemon: the refit runs
        busy[0] = True
        assert await until(lambda: state(spinner.pid) == "T")  # a job: paused
        busy[0] = False
        assert await until(lambda: state(spinner.pid) != "T")  # idle again: continued
        busy[0] = True
        assert await until(lambda: state(spinner.pid) == "T")
        gate.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gate
        assert state(spinner.pid) != "T"  # the gate never leaves it stopped

    asyncio.run(main())
    assert stats.pauses >= 2
    assert stats.paused_s > 0


def test_under_continuous_traffic_the_refit_still_gets_its_share(spinner) -> None:  # type: ignore[no-untyped-def]
    stats = GateStats()

    async def main() -> None:
        gate = asyncio.create_task(yield_to_jobs(spinner.pid, lambda: True, 0.02, 0.3, stats))
        # it is paused and continued again and again, never starved
        assert await until(lambda: stats.pauses >= 3 and stats.ran_s > 0.2)
        gate.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gate

    asyncio.run(main())
    assert state(spinner.pid) != "T"


def test_the_gate_ends_when_the_refit_has_exited() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()

    async def main() -> None:
        await asyncio.wait_for(yield_to_jobs(proc.pid, lambda: True, 0.02, 0.01, GateStats()), 10)

    asyncio.run(main())


def test_a_refit_dies_with_a_killed_daemon(tmp_path: Path) -> None:
    """A stopped refit would otherwise linger forever after a SIGKILL of the daemon."""
    pidfile = tmp_path / "child.pid"
    child = textwrap.dedent(
        f"""
        import os, signal, time
        from edgeagent.learning.refit import _die_with_parent
        _die_with_parent()
        open({str(pidfile)!r}, "w").write(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)  # as if the gate had paused it
        time.sleep(600)
        """
    )
    parent = textwrap.dedent(
        f"""
        import os, subprocess, sys, time
        env = {{**os.environ, {PARENT_ENV!r}: str(os.getpid())}}
        subprocess.Popen([sys.executable, "-c", {child!r}], env=env)
        time.sleep(600)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    daemon = subprocess.Popen([sys.executable, "-c", parent], env=env)
    try:
        end = time.monotonic() + 30
        while not pidfile.exists() and time.monotonic() < end:
            time.sleep(0.05)
        pid = int(pidfile.read_text())
        while state(pid) != "T" and time.monotonic() < end:
            time.sleep(0.05)
        assert state(pid) == "T"
    finally:
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
    end = time.monotonic() + 30
    while state(pid) not in ("gone", "Z") and time.monotonic() < end:
        time.sleep(0.05)
    assert state(pid) in ("gone", "Z")
