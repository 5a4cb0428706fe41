"""Progress with an ETA for long build-time loops (fine-tuning, tagger training).

On a terminal: one bar redrawn in place (``\\r``), at most a few times a second.  Anywhere
else (a log file, systemd, CI, a pipe): one plain line after the first step and then one
every ``every`` seconds, so a log shows that the run is alive and when it will end without
flooding it.  Standard library
only; tqdm was considered but has no line-per-interval mode for non-terminals.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any


def format_seconds(seconds: float) -> str:
    """``75`` -> ``1m15s``, ``3725`` -> ``1h02m``, ``9`` -> ``9s`` (whole seconds)."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """Counts ``total`` steps of ``label``; :meth:`update` after each step, :meth:`close` at
    the end.  The ETA is the mean time per step so far times the steps left (the first
    steps include warm-up, so it errs on the long side early on).

    ``log`` receives the plain lines (non-terminal mode and the final summary);
    ``stream`` is where the terminal bar is drawn; ``tty`` forces one mode (default:
    ``stream.isatty()``)."""

    def __init__(
        self,
        total: int,
        label: str,
        *,
        log: Callable[..., Any] = print,
        every: float = 30.0,
        stream: IO[str] | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = max(1, total)
        self.label = label
        self.log = log
        self.every = every
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(self.stream.isatty()) if tty is None else tty
        self.clock = clock
        self.done = 0
        self.started = clock()
        self._last = self.started
        self._drawn = False

    def eta(self) -> float:
        """Seconds left at the current mean rate (``inf`` before the first step)."""
        if self.done == 0:
            return float("inf")
        per_step = (self.clock() - self.started) / self.done
        return per_step * (self.total - self.done)

    def status(self, extra: str = "") -> str:
        """``label: 120/266 (45%), 2m30s elapsed, ETA 3m12s[, extra]``"""
        eta = self.eta()
        eta_s = "?" if eta == float("inf") else format_seconds(eta)
        text = (
            f"{self.label}: {self.done}/{self.total} ({self.done / self.total:.0%}), "
            f"{format_seconds(self.clock() - self.started)} elapsed, ETA {eta_s}"
        )
        return f"{text}, {extra}" if extra else text

    def update(self, n: int = 1, extra: str = "") -> None:
        """``n`` more steps done; ``extra`` (e.g. the loss) is shown with the progress."""
        self.done = min(self.total, self.done + n)
        now = self.clock()
        if self.tty:
            if now - self._last >= 0.2 or self.done == self.total:
                self._last = now
                width = 24
                filled = round(width * self.done / self.total)
                bar = "#" * filled + "-" * (width - filled)
                self.stream.write(f"\r[{bar}] {self.status(extra)}\x1b[K")
                self.stream.flush()
                self._drawn = True
        elif now - self._last >= self.every or self.done == 1:  # an ETA from the first step
            self._last = now
            self.log(f"  {self.status(extra)}")

    def close(self, extra: str = "") -> float:
        """End the bar (terminal) and log the summary line; returns the elapsed seconds."""
        elapsed = self.clock() - self.started
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
        done = f"{self.label}: {self.done}/{self.total} in {format_seconds(elapsed)}"
        self.log(f"  {done}, {extra}" if extra else f"  {done}")
        return elapsed
