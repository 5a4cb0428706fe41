"""Shared fixtures: a real mosquitto on a free port, the daemon as a subprocess."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

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
