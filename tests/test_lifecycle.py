"""The shared service plumbing: the one backoff formula, and run_service's signals."""

from __future__ import annotations

import asyncio
import os
import random
import signal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from edgeagent.backoff import backoff_delay, backoff_delays
from edgeagent.lifecycle import (
    limit_malloc_arenas,
    release_free_memory,
    run_service,
    wait_for_stop,
)


@given(
    attempt=st.integers(min_value=0, max_value=10_000),
    min_s=st.floats(min_value=0.001, max_value=10.0),
    span=st.floats(min_value=1.0, max_value=1000.0),
    seed=st.integers(),
)
def test_backoff_is_capped_exponential_with_jitter(
    attempt: int, min_s: float, span: float, seed: int
) -> None:
    max_s = min_s * span
    d = min(max_s, min_s * 2.0 ** min(attempt, 30))
    delay = backoff_delay(attempt, min_s, max_s, random.Random(seed))
    assert d / 2 <= delay <= d <= max_s


def test_backoff_delays_is_the_same_formula_with_bound_arguments() -> None:
    delays = backoff_delays(0.5, 30.0, random.Random(7))
    rng = random.Random(7)
    assert [delays(n) for n in range(12)] == [backoff_delay(n, 0.5, 30.0, rng) for n in range(12)]


class _Service:
    """Serves until asked to stop; SIGHUPs itself first (which must not end it)."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.stopped_by: list[str] = []

    async def run(self) -> int:
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.sleep(0)
        os.kill(os.getpid(), signal.SIGTERM)
        await self.stop.wait()
        return 0 if self.stopped_by == ["request_stop"] else 1

    def request_stop(self) -> None:
        self.stopped_by.append("request_stop")
        self.stop.set()


def test_run_service_stops_on_sigterm_and_survives_sighup() -> None:
    with capture_logs() as logs:
        code = run_service(_Service, "svc", hup_hint="restart to apply changes")
    assert code == 0
    assert {"event": "svc.sighup_ignored", "hint": "restart to apply changes"} in [
        {k: r[k] for k in ("event", "hint") if k in r} for r in logs
    ]


def test_wait_for_stop_reports_a_fatal_broker_error() -> None:
    async def main() -> tuple[str | None, str | None]:
        loop = asyncio.get_running_loop()
        stop, fatal = asyncio.Event(), loop.create_future()
        loop.call_soon(fatal.set_result, "not authorized")
        first = await wait_for_stop(stop, fatal, "t")
        stop.set()
        second = await wait_for_stop(stop, loop.create_future(), "t")
        return first, second

    with capture_logs() as logs:
        assert asyncio.run(main()) == ("not authorized", None)
    assert [r["event"] for r in logs] == ["mqtt.fatal"]


def test_malloc_arenas_capped_unless_the_operator_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    import platform
    import subprocess
    import sys

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False  # the operator's setting wins
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    # In a fresh process (the cap must come before threads start): glibc takes it.
    code = "from edgeagent.lifecycle import limit_malloc_arenas; print(limit_malloc_arenas())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_release_free_memory_hands_back_what_a_load_freed() -> None:
    """glibc: freed blocks below the top of the heap stay resident until malloc_trim."""
    import platform
    import subprocess
    import sys

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        assert release_free_memory() is False
        return
    code = (
        "from edgeagent.lifecycle import release_free_memory\n"
        "blocks = [bytearray(64 * 1024) for _ in range(400)]\n"  # under the mmap threshold
        "keep = blocks[-1]\n"
        "del blocks\n"
        "print(release_free_memory())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
