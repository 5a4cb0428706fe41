"""What the daemon and the cloud agent share about running as a service.

:func:`run_service` runs one service on a fresh event loop: SIGTERM and SIGINT ask it
to stop (:meth:`Service.request_stop`: drain, then exit 0), and SIGHUP — whose default
action would end the process with a status systemd treats as clean, so it would not be
restarted — is logged and ignored until the service installs a handler of its own (the
daemon reloads on SIGHUP once it has started; the cloud agent never does).
:func:`wait_for_stop` is the wait both run loops end in: a stop request, or the broker
connection failing in a way a reconnect cannot fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from edgeagent.logs import get_logger

__all__ = ["Service", "run_service", "wait_for_stop"]

log = get_logger("edgeagent.lifecycle")


class Service(Protocol):
    """A long-running process body: ``run`` returns its exit code."""

    def run(self) -> Coroutine[Any, Any, int]: ...

    def request_stop(self) -> None:
        """Begin a graceful stop (event loop thread)."""
        ...


def run_service(make: Callable[[], Service], name: str, *, hup_hint: str) -> int:
    """Build the service with ``make()`` on a new event loop, install the stop signals,
    run it, and return its exit code.  ``name`` prefixes the SIGHUP log event
    (``{name}.sighup_ignored``); ``hup_hint`` tells the operator what to do instead."""

    async def main() -> int:
        service = make()
        loop = asyncio.get_running_loop()
        handlers: tuple[tuple[signal.Signals, Callable[[], None]], ...] = (
            (signal.SIGTERM, service.request_stop),
            (signal.SIGINT, service.request_stop),
            (signal.SIGHUP, lambda: log.warning(f"{name}.sighup_ignored", hint=hup_hint)),
        )
        for sig, handler in handlers:
            with contextlib.suppress(NotImplementedError, RuntimeError):  # no signals here
                loop.add_signal_handler(sig, handler)
        return await service.run()

    return asyncio.run(main())


async def wait_for_stop(stop: asyncio.Event, fatal: asyncio.Future[str], name: str) -> str | None:
    """Wait until ``stop`` is set or ``fatal`` (the MQTT adapter's fatal-error future)
    completes.  Returns the fatal error (logged as ``mqtt.fatal``), else None."""
    stop_wait: asyncio.Future[Any] = asyncio.get_running_loop().create_task(
        stop.wait(), name=f"{name}:stop-wait"
    )
    waits: set[asyncio.Future[Any]] = {stop_wait, fatal}
    done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    if fatal not in done:
        return None
    stop_wait.cancel()
    error = fatal.result()
    log.error("mqtt.fatal", error=error)
    return error
