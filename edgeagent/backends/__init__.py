"""Local inference backends, built from a task's config.

Each runtime lives in its own module and is imported only when a task uses it,
so a device with only ``rules`` tasks never loads onnxruntime or llama_cpp.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, cast

from edgeagent.backends.base import Backend, BackendError, Prediction

if TYPE_CHECKING:  # config imports the backend config classes from this package
    from edgeagent.config import TaskConfig

__all__ = ["Backend", "BackendError", "Prediction", "create"]

# backend type -> (module, class, pip extra)
_REGISTRY = {
    "rules": ("edgeagent.backends.rules", "RulesBackend", None),
    "onnx": ("edgeagent.backends.onnx", "OnnxBackend", "onnx"),
    "llamacpp": ("edgeagent.backends.llamacpp", "LlamaCppBackend", "llamacpp"),
}
# (backend type, task kind) -> a different class for that kind
_BY_KIND = {
    ("onnx", "extract"): ("edgeagent.backends.tagger", "OnnxTaggerBackend", "onnx"),
}


def create(task_name: str, task: TaskConfig) -> Backend:
    """Build (not load) the backend of a task.  Raises :class:`BackendError`."""
    kind = task.backend.type
    if kind not in _REGISTRY:
        raise BackendError(f"task {task_name!r}: unknown backend type {kind!r}")
    module_name, class_name, extra = _BY_KIND.get((kind, task.kind), _REGISTRY[kind])
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = f" (pip install 'edgeagent[{extra}]')" if extra else ""
        raise BackendError(
            f"task {task_name!r}: the {kind} backend is unavailable{hint}: {exc}"
        ) from exc
    return cast(Backend, getattr(module, class_name)(task_name, task))
