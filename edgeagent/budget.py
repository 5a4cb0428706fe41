"""Token bucket for rate limits (escalations to the cloud, retries).  Pure: the clock is
injected, nothing sleeps.

Invariant (property-tested in ``tests/test_budget.py``): from construction until the
clock reads ``t``, at most ``burst + rate_per_s * (t - t0)`` tokens are taken, and the
bucket never holds fewer than 0 nor more than ``burst`` tokens.  A clock that steps
backwards mints nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

__all__ = ["TokenBucket"]


class TokenBucket:
    """Holds up to ``burst`` tokens, refilled continuously at ``rate_per_s``.

    Not thread-safe: one event loop owns it.
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``rate_per_s``: tokens added per second (>= 0).  ``burst``: capacity, and the
        number of tokens the bucket starts with (>= 0).  ``clock``: seconds, monotonic."""
        if not (math.isfinite(rate_per_s) and rate_per_s >= 0):
            raise ValueError(f"rate_per_s must be a finite number >= 0, got {rate_per_s!r}")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 0:
            raise ValueError(f"burst must be an integer >= 0, got {burst!r}")
        self._rate = float(rate_per_s)
        self._burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    @property
    def rate_per_s(self) -> float:
        """Tokens added per second."""
        return self._rate

    @property
    def burst(self) -> int:
        """Capacity (tokens)."""
        return self._burst

    def _refill(self) -> None:
        now = self._clock()
        if now > self._last:  # a clock stepping back neither adds nor later re-adds
            self._tokens = min(float(self._burst), self._tokens + (now - self._last) * self._rate)
            self._last = now

    def try_take(self, n: int = 1) -> bool:
        """Take ``n`` tokens if the bucket holds them; never blocks, never goes below 0.

        ``n`` greater than ``burst`` can never succeed.  ``n == 0`` always succeeds.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n!r}")
        self._refill()
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False

    @property
    def available(self) -> float:
        """Tokens that could be taken now (0 <= available <= burst)."""
        self._refill()
        return self._tokens
