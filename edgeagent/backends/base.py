"""The one interface every local inference backend implements, and how a backend type
is described to the registry (:mod:`edgeagent.backends`).

A backend is built from its task's config, loaded once (``load`` then
``warmup``), asked to answer *batches* of inputs from a worker thread
(never on the event loop, unless it is ``inline``: :func:`runs_inline`), and closed at
shutdown or reload.  A backend's module
holds its config model (a :class:`BackendConfig`) and its runtime, and imports its
native runtime (onnxruntime, llama_cpp) only in ``load``, so a device that only
uses the ``rules`` backend never imports onnxruntime or llama_cpp.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # the settings tree imports the backend configs, not the reverse
    from edgeagent.config import TaskConfig

JSONValue = Any
"""Anything ``json.dumps`` accepts."""


class BackendError(Exception):
    """A backend could not be built or loaded (bad config, missing or corrupt model).

    Raised at start-up or reload, never mid-job: the message names the task and
    the offending file or key so an operator can fix it.
    """


#: ``Prediction.details`` key: the out-of-scope score minus the decline cut-off (> 0: the
#: job may be declined, :func:`edgeagent.router.confidently_out_of_scope`).  Defined here,
#: beside :class:`Prediction`, so backends need not import the router.
OOS_MARGIN = "oos_margin"


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
    not thread-safe keeps its own lock.  A backend whose answers take microseconds
    and whose time is bounded by the input's size may set the class attribute
    ``inline = True`` (:func:`runs_inline`): a batch of small inputs (at most
    :data:`INLINE_MAX_CHARS` in all) is then answered on the event loop, without
    the thread hand-offs (about as costly as a rules answer itself).
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


INLINE_MAX_CHARS: Final = 2048
"""Most characters of text (a whole batch) an ``inline`` backend answers on the event loop;
a larger batch goes to the task's inference thread like any other.  The rules backend
(RE2: linear time) takes ~0.05 ms for 4 KiB against the benchmark's 7 patterns, so a
batch under this bound holds the loop well under a millisecond even with ~100 rules."""


def runs_inline(backend: object) -> bool:
    """Whether ``backend`` declares (class attribute ``inline``) that a small batch may be
    answered on the event loop: microseconds per input, time linear in its size, never
    blocking on I/O or a lock another thread holds for long."""
    return getattr(type(backend), "inline", False) is True


class BackendConfig(BaseModel):
    """Base of every backend's config model (``[tasks.NAME.backend]``).

    A subclass declares ``type: Literal["NAME"] = "NAME"``: the registry key and the
    discriminator of the config union.  Unknown keys are errors; configs are immutable.
    The hooks below let :class:`~edgeagent.config.TaskConfig` check a task without
    knowing any backend type.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str

    def check_task(self, task: TaskConfig) -> None:
        """Raise ``ValueError`` when this backend cannot answer ``task`` as configured
        (called while the task is validated, after its own fields are checked)."""

    def learns(self, kind: str) -> bool:
        """Can a task of ``kind`` on this backend learn from the cloud (``learn.enabled``)?"""
        return False

    def missing_model_hint(self, task_name: str) -> str | None:
        """If the model this config names does not exist: what is missing and the command
        that prepares it (for check-config and the daemon's start-up error); else None."""
        return None


@dataclass(frozen=True, slots=True)
class BackendType:
    """One backend type for the registry: its config model and how to build its runtime.

    ``build(task_name, task)`` builds (does not load) the backend of a task whose
    ``backend`` is a ``config``; it raises :class:`BackendError` for a task it cannot
    serve (a kind it does not do).
    """

    config: type[BackendConfig]
    build: Callable[[str, TaskConfig], Backend]

    @property
    def name(self) -> str:
        """The ``type`` value that selects this backend (the config's ``type`` default)."""
        default = self.config.model_fields["type"].default
        if not isinstance(default, str) or not default:
            raise TypeError(f"{self.config.__name__}.type needs a string default (its name)")
        return default
