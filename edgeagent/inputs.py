"""What a local model sees of a job's input, decided once (pure; no I/O).

The result cache and the models must agree on which inputs are "the same": two
inputs that share a cache entry must get the same model answer, or the answer a
producer receives depends on which of them arrived first.  So one function,
:func:`model_input`, gives the form every local backend is fed, and the cache key
(:func:`edgeagent.store.cache_key`) hashes :func:`canonical_input`, the serialised
form of exactly that value.

Text inputs are Unicode NFC-normalised and their whitespace is collapsed: leading and
trailing whitespace dropped, every run of whitespace (spaces, tabs, newlines, the
Unicode spaces ``str.split`` knows) replaced by one ASCII space.  Object inputs keep
their strings as they are; their keys are sorted (recursively), so two objects that
differ only in key order are one input.

:func:`has_content` says whether an input holds anything a model could extract or
classify: at least one letter or digit (Unicode categories ``L*`` and ``N*``; in an
object, in one of its values).  Empty,
whitespace-only and punctuation/control-only inputs do not; the pipeline answers them
``out_of_scope`` (``details.failure = "no_content"``) without running a model, since
whatever a model said about them would be invented (issue 14).
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any

__all__ = ["NO_CONTENT", "canonical_input", "has_content", "model_input", "normalise_text"]

NO_CONTENT = "no_content"
"""``details["failure"]`` of a prediction refused because the input has no content."""


def normalise_text(text: str) -> str:
    """NFC, whitespace runs collapsed to one space, no leading/trailing whitespace."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def model_input(value: str | dict[str, Any]) -> str | dict[str, Any]:
    """The form of a job input a local backend receives (see the module docstring)."""
    if isinstance(value, str):
        return normalise_text(value)
    out: dict[str, Any] = _sorted(value)
    return out


def canonical_input(value: str | dict[str, Any]) -> str:
    """The cache-key form: :func:`model_input`, serialised (objects as compact JSON)."""
    norm = model_input(value)
    if isinstance(norm, str):
        return norm
    return json.dumps(norm, ensure_ascii=False, separators=(",", ":"))


def has_content(value: Any) -> bool:
    """Whether the input holds at least one letter or digit.  Objects: whether any value
    (not key) does, recursively; a number or boolean value counts as content."""
    if isinstance(value, str):
        return any(unicodedata.category(c)[0] in "LN" for c in value)
    if isinstance(value, dict):
        return any(has_content(v) for v in value.values())
    if isinstance(value, list):
        return any(has_content(v) for v in value)
    return isinstance(value, int | float)
