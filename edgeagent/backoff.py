"""The one retry delay formula: capped exponential backoff with jitter.

Used for broker reconnects (:mod:`edgeagent.mqtt`), LLM request retries
(:mod:`edgeagent.cloud.llm`), escalation re-sends (:mod:`edgeagent.escalation`) and the
probes of a degraded store (:mod:`edgeagent.daemon`).
Attempt ``n`` (from 0) waits a uniform random time in ``[d/2, d]`` with
``d = min(max_s, min_s * 2**n)``: the jitter keeps a fleet that lost its broker at the
same moment from reconnecting in lockstep.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["backoff_delay", "backoff_delays"]

_MAX_DOUBLINGS = 30  # 2**30 * any sane min_s is past every cap; keeps the float finite


def backoff_delay(attempt: int, min_s: float, max_s: float, rng: random.Random) -> float:
    """The delay (seconds) before retry ``attempt`` (0 = the first retry)."""
    d = min(max_s, min_s * (2 ** min(attempt, _MAX_DOUBLINGS)))
    return rng.uniform(d / 2, d)


def backoff_delays(min_s: float, max_s: float, rng: random.Random) -> Callable[[int], float]:
    """:func:`backoff_delay` with its bounds and random source fixed: ``delay(attempt)``."""

    def delay(attempt: int) -> float:
        return backoff_delay(attempt, min_s, max_s, rng)

    return delay
