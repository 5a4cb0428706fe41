"""Local inference backends: the registry of backend types, and building a task's backend.

A backend type is one module of this package holding its config model (a
:class:`~edgeagent.backends.base.BackendConfig` subclass with ``type: Literal["NAME"]``),
its runtime, and ``BACKEND``, the :class:`~edgeagent.backends.base.BackendType` tying the
two together.  Adding a backend type is that module plus one line in :data:`BUILT_IN`:
the config union (:func:`config_union`, used by :mod:`edgeagent.config`), the README's
config reference and :func:`create` all read the registry.

Importing a backend module is cheap: native runtimes (onnxruntime, llama_cpp) are
imported only when a task's backend loads, so a device with only ``rules`` tasks never
loads them.
"""

from __future__ import annotations

import functools
import importlib
import operator
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from edgeagent.backends.base import Backend, BackendConfig, BackendError, BackendType, Prediction

if TYPE_CHECKING:  # config imports this package for the config union
    from edgeagent.config import TaskConfig

__all__ = [
    "BUILT_IN",
    "Backend",
    "BackendConfig",
    "BackendError",
    "BackendType",
    "Prediction",
    "backend_types",
    "config_union",
    "create",
    "register",
]

#: Modules of the built-in backend types, each with a module-level ``BACKEND``.
BUILT_IN = (
    "edgeagent.backends.rules",
    "edgeagent.backends.onnx",
    "edgeagent.backends.llamacpp",
)

_TYPES: dict[str, BackendType] = {}
_sealed = False


def register(backend: BackendType) -> None:
    """Add a backend type.  Must happen before :mod:`edgeagent.config` is imported: the
    settings model is built once from the registry (a later registration raises
    ``RuntimeError`` rather than being silently ignored by config parsing)."""
    if _sealed:
        raise RuntimeError(
            f"backend type {backend.name!r} registered after the config union was built "
            "(register backends before importing edgeagent.config)"
        )
    if backend.name in _TYPES:
        raise ValueError(f"backend type {backend.name!r} is already registered")
    _TYPES[backend.name] = backend


def backend_types() -> dict[str, BackendType]:
    """The registered backend types by name, in registration order."""
    return dict(_TYPES)


def config_union() -> Any:
    """The ``backend`` field's type: a pydantic union of every registered config model,
    discriminated on ``type``.  Seals the registry (see :func:`register`)."""
    global _sealed
    _sealed = True
    configs = [t.config for t in _TYPES.values()]
    if len(configs) == 1:
        return configs[0]
    return Annotated[functools.reduce(operator.or_, configs), Field(discriminator="type")]


def create(task_name: str, task: TaskConfig) -> Backend:
    """Build (not load) the backend of a task.  Raises :class:`BackendError`."""
    backend_type = _TYPES.get(task.backend.type)
    if backend_type is None:
        raise BackendError(f"task {task_name!r}: unknown backend type {task.backend.type!r}")
    return backend_type.build(task_name, task)


for _module in BUILT_IN:
    register(importlib.import_module(_module).BACKEND)
