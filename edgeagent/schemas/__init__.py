"""JSON Schemas of the wire messages, generated from the pydantic models.

``python -m edgeagent.schemas`` rewrites the ``*.schema.json`` files beside this
module; a test fails when they are out of date.  Producers can validate their
jobs against ``job.schema.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgeagent.protocol import JobMessage, ResultMessage

HERE = Path(__file__).resolve().parent


def generate() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, model in (("job", JobMessage), ("result", ResultMessage)):
        schema = model.model_json_schema()
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://edgeagent.dev/schemas/v1/{name}.schema.json"
        out[f"{name}.schema.json"] = schema
    return out


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write(directory: Path = HERE) -> list[Path]:
    paths = []
    for filename, schema in generate().items():
        path = directory / filename
        path.write_text(render(schema), encoding="utf-8")
        paths.append(path)
    return paths
