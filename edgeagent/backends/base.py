"""The one interface every local inference backend implements.

A backend is built from its task's config, loaded once (``load`` then
``warmup``), asked to answer *batches* of inputs from a worker thread
(never on the event loop), and closed at shutdown or reload.  Backends are
imported lazily by :func:`edgeagent.backends.create`, so a device that only
uses the ``rules`` backend never imports onnxruntime or llama_cpp.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

JSONValue = Any
"""Anything ``json.dumps`` accepts."""


class BackendError(Exception):
    """A backend could not be built or loaded (bad config, missing or corrupt model).

    Raised at start-up or reload, never mid-job: the message names the task and
    the offending file or key so an operator can fix it.
    """


@dataclass(frozen=True, slots=True)
class Prediction:
    """One local answer.

    ``output`` is the task's answer object (``{"label": ...}`` for classify,
    the extracted object for extract, ``{"text": ...}`` for generate) or
    ``None`` when the backend has no answer at all.  ``confidence`` is a
    calibrated probability in [0, 1].  ``reason`` is set when the backend
    itself knows the answer must not be used locally: ``out_of_scope``,
    ``schema_invalid``, ``low_confidence`` or ``open_ended``.
    """

    output: dict[str, JSONValue] | None
    confidence: float
    reason: str | None = None
    details: dict[str, JSONValue] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """A loaded local model (or rule set) for one task.

    Thread model: ``load``, ``warmup`` and ``close`` are called from a worker
    thread at start-up/reload; ``infer_batch`` from a worker thread, at most
    ``concurrency`` calls at a time (the task's config), so a backend that is
    not thread-safe keeps its own lock.
    """

    @property
    def model_id(self) -> str:
        """Short human-readable model id, e.g. ``intent-minilm@3e1a9c``."""
        ...

    @property
    def fingerprint(self) -> str:
        """Hex digest that changes whenever the answers could change (weights,
        labels, calibration, prompts).  Part of every cache key."""
        ...

    def load(self) -> None:
        """Open files and build sessions.  Raises :class:`BackendError`."""
        ...

    def warmup(self) -> None:
        """Run one throwaway inference so the first job is not slow."""
        ...

    def infer_batch(self, inputs: list[JSONValue]) -> list[Prediction]:
        """Answer each input; the result list has the same length and order."""
        ...

    def close(self) -> None:
        """Release native resources.  Idempotent."""
        ...
