"""The README's configuration reference, generated from the settings model.

``edgeagent config-reference`` prints it; ``--update README.md`` rewrites the section
between :data:`REF_START` and :data:`REF_END` (a test checks the README is current).
The walk is generic: a nested model is inlined (``mqtt.tls.ca_file``), a table of
models gets its own section (``tasks.NAME.``, ``tasks.NAME.backend.rules[].``), and the
backend union one section per registered backend type, so a new setting or backend
appears here without touching this module.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from edgeagent.backends import BackendConfig
from edgeagent.config import Settings

__all__ = ["REF_END", "REF_START", "reference_markdown", "update_reference"]

REF_START = "<!-- config-reference:start -->"
REF_END = "<!-- config-reference:end -->"


def reference_markdown() -> str:
    """The configuration reference as a Markdown table: one row per key, a bold row
    opening each table section."""
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    _section(Settings, "", lines)
    return "\n".join(lines)


def update_reference(readme: Path) -> None:
    """Replace the section between the reference markers of ``readme``."""
    text = readme.read_text(encoding="utf-8")
    head, _, rest = text.partition(REF_START)
    _, _, tail = rest.partition(REF_END)
    readme.write_text(
        f"{head}{REF_START}\n{reference_markdown()}\n{REF_END}{tail}", encoding="utf-8"
    )


def _section(model: type[BaseModel], prefix: str, lines: list[str]) -> None:
    """Rows of ``model``'s keys under ``prefix``, then the sections of its sub-tables."""
    subsections: list[tuple[type[BaseModel], str, str]] = []  # (model, prefix, title)
    _rows(model, prefix, lines, subsections)
    for sub, sub_prefix, title in subsections:
        lines.append(f"| **{title}** | | | |")
        _section(sub, sub_prefix, lines)


def _rows(
    model: type[BaseModel],
    prefix: str,
    lines: list[str],
    subsections: list[tuple[type[BaseModel], str, str]],
) -> None:
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        ann = _unwrap(field.annotation)
        if _is_model(ann):
            _rows(ann, key + ".", lines, subsections)  # a nested section: inline
            continue
        origin, args = typing.get_origin(ann), typing.get_args(ann)
        if origin is list and args and _is_model(args[0]):
            subsections.append((args[0], f"{key}[].", f"{key}[]."))
        elif origin is dict and len(args) == 2 and _is_model(args[1]):
            subsections.append((args[1], f"{key}.NAME.", f"{key}.NAME."))
        elif _union_members(ann) and all(_is_model(m) for m in _union_members(ann)):
            for member in _union_members(ann):
                tag = _tag(member)
                title = f"{key}. (type = {tag})" if tag else f"{key}."
                subsections.append((member, f"{key}.", title))
        default = "" if field.is_required() else _fmt_default(_default(field))
        desc = _cell(field.description or "")
        lines.append(f"| `{key}` | {_cell(_type_name(ann))} | {default} | {desc} |")


def _default(field: FieldInfo) -> object:
    """The documented default: a computed scalar (``device_id``: this host's name) is left
    out, its description says where it comes from; containers are shown."""
    value = field.get_default(call_default_factory=True)
    if field.default_factory is not None and isinstance(value, str | int | float):
        return None
    return value


def _unwrap(ann: Any) -> Any:
    while typing.get_origin(ann) is Annotated:
        ann = typing.get_args(ann)[0]
    return ann


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _union_members(ann: Any) -> tuple[Any, ...]:
    if typing.get_origin(ann) in (Union, types.UnionType):
        return tuple(_unwrap(a) for a in typing.get_args(ann))
    return ()


def _tag(model: type[BaseModel]) -> str | None:
    """The ``type`` value of a backend config (a union member); None for other models."""
    if issubclass(model, BackendConfig):
        default = model.model_fields["type"].default
        return default if isinstance(default, str) else None
    return None


def _type_name(ann: Any) -> str:
    """A short, readable name for a field's type (``int``, ``Path | None``, ``"a" | "b"``,
    ``list[str]``, ``table``)."""
    ann = _unwrap(ann)
    members = _union_members(ann)
    if members:
        if all(_is_model(m) for m in members):
            tags = [_tag(m) for m in members]
            return "table (`type`: " + ", ".join(t or "?" for t in tags) + ")"
        return " | ".join(_type_name(m) for m in members)
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]" if inner else str(origin)
    if ann is type(None):
        return "None"
    if ann is Any:
        return "any"
    if _is_model(ann):
        return "table"
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


def _cell(text: str) -> str:
    """Escape a table cell's pipes."""
    return text.replace("|", "\\|")


def _fmt_default(value: object) -> str:
    if value is None or isinstance(value, SecretStr):
        return ""
    text = json.dumps(value, default=str)
    return f"`{text}`".replace("|", "\\|")
