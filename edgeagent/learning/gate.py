"""The refit yields to jobs: paused (``SIGSTOP``) while the daemon has work in flight.

``SCHED_IDLE`` keeps the refit off a core that something else wants, but a job's path
hops between processes and threads (client, broker, the daemon's network thread and
event loop), and each hop that lands on the core the refit was using pays for it: on
the 2-core benchmark machine jobs were 1.3-1.5x slower throughout a round
(``bench_learning.py --only cost``).  So while the daemon is busy, and for
``refit_yield_ms`` after, the refit process is stopped; it continues when the daemon
is idle.  Under continuous traffic it would never finish, so it is owed
``refit_min_share`` of the wall time: when its share falls below that it runs a slice
of :data:`SLICE_S` whatever the traffic.

The gate runs on the event loop (a tick every :data:`TICK_S`, only while a refit runs).
It leaves the process running when it stops (cancellation included).  The refit process
also asks the kernel to kill it if the daemon dies (``PR_SET_PDEATHSIG`` in
:mod:`edgeagent.learning.refit`), so a stopped refit never outlives a killed daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

TICK_S = 0.002
"""How often the gate looks at the daemon (seconds): a job waits at most this long for
the refit to stop."""
SLICE_S = 0.1
"""How long the refit runs when it is owed its share under continuous traffic."""

CAN_PAUSE = hasattr(signal, "SIGSTOP") and hasattr(signal, "SIGCONT")


@dataclass
class GateStats:
    """What the gate did: seconds the refit ran and was paused, and how often it was
    stopped (the round record keeps them)."""

    ran_s: float = 0.0
    paused_s: float = 0.0
    pauses: int = 0

    def as_dict(self) -> dict[str, float]:
        return {
            "ran_s": round(self.ran_s, 2),
            "paused_s": round(self.paused_s, 2),
            "pauses": self.pauses,
        }


async def yield_to_jobs(
    pid: int,
    busy: Callable[[], bool],
    linger_s: float,
    min_share: float,
    stats: GateStats,
) -> None:
    """Stop process ``pid`` while ``busy()`` (and ``linger_s`` after), continue it
    otherwise, with at least ``min_share`` of the time running; until cancelled or the
    process is gone.  The process is left running."""
    loop = asyncio.get_running_loop()
    stopped = False
    since = loop.time()
    last_busy = float("-inf")
    forced_until = 0.0
    try:
        while True:
            await asyncio.sleep(TICK_S)
            now = loop.time()
            if stopped:
                stats.paused_s += now - since
            else:
                stats.ran_s += now - since
            since = now
            if busy():
                last_busy = now
            want_stop = now - last_busy < linger_s and now >= forced_until
            if want_stop and stats.ran_s < min_share * (stats.ran_s + stats.paused_s):
                forced_until = now + SLICE_S  # owed its share: run a slice anyway
                want_stop = False
            if want_stop != stopped:
                os.kill(pid, signal.SIGSTOP if want_stop else signal.SIGCONT)
                stopped = want_stop
                stats.pauses += stopped
    except ProcessLookupError:
        return  # the refit has exited
    finally:
        if stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
