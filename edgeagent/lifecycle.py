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
import ctypes
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from edgeagent.logs import get_logger

__all__ = [
    "MALLOC_ARENAS",
    "Service",
    "limit_malloc_arenas",
    "release_free_memory",
    "run_service",
    "wait_for_stop",
]

MALLOC_ARENAS = 2
"""glibc malloc arenas a service process keeps (glibc's default: 8 per core)."""

log = get_logger("edgeagent.lifecycle")


class Service(Protocol):
    """A long-running process body: ``run`` returns its exit code."""

    def run(self) -> Coroutine[Any, Any, int]: ...

    def request_stop(self) -> None:
        """Begin a graceful stop (event loop thread)."""
        ...


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas at ``arenas`` for this process, unless the operator set
    ``MALLOC_ARENA_MAX`` (which wins).  Returns whether the cap was applied.

    Every thread that allocates (the MQTT connect helper, inference workers, onnxruntime and
    llama.cpp threads) may get an arena of its own, each keeping freed pages it does not
    return: on a daemon with a classifier and a GGUF model that is ~15 MB of resident memory
    for nothing (bench_llamacpp.py --rss-with-classifier).  The daemon's threads mostly wait,
    so they rarely contend for an arena.  Must run before the threads start; a no-op where
    there is no glibc ``mallopt``.
    """
    mallopt = None if os.environ.get("MALLOC_ARENA_MAX") else _glibc("mallopt")
    if mallopt is None:
        return False
    m_arena_max = -8  # <malloc.h> M_ARENA_MAX
    return bool(mallopt(ctypes.c_int(m_arena_max), ctypes.c_int(arenas)))


def release_free_memory() -> bool:
    """Hand the pages glibc's malloc holds free back to the system (``malloc_trim(0)``,
    every arena); returns whether any were.  Loading a model frees large temporaries (file
    buffers, arrays converted or sorted), and glibc keeps freed memory at the top of its
    heaps and between live blocks for later: after a classifier with 15,100 training
    embeddings, megabytes of resident memory the daemon never uses again
    (bench_llamacpp.py --rss-with-classifier).  Call it after a load, not per job (it walks
    every arena under its lock).  A no-op returning False without glibc.
    """
    malloc_trim = _glibc("malloc_trim")
    return malloc_trim is not None and bool(malloc_trim(ctypes.c_size_t(0)))


def _glibc(name: str) -> Any:
    """The C library's function ``name`` on Linux, None where there is none (musl has no
    ``malloc_trim``; other systems no such tuning)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def run_service(make: Callable[[], Service], name: str, *, hup_hint: str) -> int:
    """Build the service with ``make()`` on a new event loop, install the stop signals,
    run it, and return its exit code.  ``name`` prefixes the SIGHUP log event
    (``{name}.sighup_ignored``); ``hup_hint`` tells the operator what to do instead.
    glibc's malloc arenas are capped first (:func:`limit_malloc_arenas`)."""
    limit_malloc_arenas()

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
