"""Shared fixtures: a real mosquitto on a free port, the daemon as a subprocess, and the
hygiene check every test runs under (no leftover threads or asyncio tasks)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.broker import Broker, mosquitto_available
from tests.harness import DaemonProcess, TestClient, write_config

DaemonFactory = Callable[..., DaemonProcess]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if mosquitto_available():
        return
    skip = pytest.mark.skip(reason="mosquitto is not installed")
    for item in items:
        if "broker" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


LEFTOVER_GRACE_S = 5.0
"""How long a test's threads get to finish after it (executors shut down asynchronously)."""


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """Fail a test that leaves a non-daemon thread running or an asyncio task pending.

    Tasks: ``asyncio.run`` cancels whatever its main coroutine left behind, which would
    hide it; so ``asyncio.run`` is wrapped to list the tasks still pending when the main
    coroutine returns.  Threads: a non-daemon thread started by the test must be gone
    (within :data:`LEFTOVER_GRACE_S`) once the test and its fixtures are done.
    """
    before = set(threading.enumerate())
    pending: list[str] = []
    real_run = asyncio.run

    def run(main: Coroutine[Any, Any, Any], **kw: Any) -> Any:
        async def checked() -> Any:
            try:
                return await main
            finally:
                me = asyncio.current_task()
                pending.extend(
                    t.get_name() for t in asyncio.all_tasks() if t is not me and not t.done()
                )

        return real_run(checked(), **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(asyncio, "run", run)
        yield
    until = time.monotonic() + LEFTOVER_GRACE_S
    while True:
        threads = [
            t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon
        ]
        if not threads or time.monotonic() > until:
            break
        time.sleep(0.02)
    assert not pending, f"asyncio tasks left pending: {pending}"
    assert not threads, f"threads left running: {[t.name for t in threads]}"


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One production-like broker (persistence on) for the whole session."""
    with Broker(tmp_path_factory.mktemp("broker")) as b:
        yield b


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker of this test's own, for tests that restart or reconfigure it."""
    with Broker(tmp_path / "broker") as b:
        yield b


@pytest.fixture
def device() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def client_factory() -> Iterator[Callable[..., TestClient]]:
    made: list[TestClient] = []

    def make(port: int, **kw: object) -> TestClient:
        c = TestClient(port, **kw)  # type: ignore[arg-type]
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def daemon_factory(tmp_path: Path, device: str) -> Iterator[DaemonFactory]:
    started: list[DaemonProcess] = []

    def make(
        port: int, *, start: bool = True, env: dict[str, str] | None = None, **kw: object
    ) -> DaemonProcess:
        kw.setdefault("device", device)
        cfg = write_config(
            tmp_path / f"edgeagent-{len(started)}.toml",
            port=port,
            state_dir=tmp_path / "state",
            **kw,  # type: ignore[arg-type]
        )
        d = DaemonProcess(cfg, tmp_path / f"daemon-{len(started)}.log", env=env)
        started.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in started:
        d.stop()
