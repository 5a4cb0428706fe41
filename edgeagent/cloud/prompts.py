"""What the cloud agent asks the LLM for one request, and how it checks the answer.

Pure: the JSON Schema an answer must satisfy, the chat messages (and the one corrective
retry), the ``response_format`` for each structured-output mode, and the parser that
turns a model's text into a reply's ``output`` or raises :class:`InvalidOutput`.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema

from edgeagent import regex
from edgeagent.cloud.config import StructuredOutput
from edgeagent.cloud.messages import CloudRequest
from edgeagent.protocol import truncate

__all__ = [
    "InvalidOutput",
    "answer_schema",
    "build_messages",
    "check_output",
    "corrective_messages",
    "parse_json_answer",
    "response_format",
]

_FORMAT_NAME = re.compile(r"[^A-Za-z0-9_-]")
# RE2: with Python's re this pattern is quadratic (``\s*`` and ``.*?`` compete for a run
# of whitespace: 2 s for 8,000 spaces after a fence), and the reply echoes job input.
_FENCE = regex.compile(r"(?s)^```[A-Za-z0-9_-]*\s*\n?(.*?)\n?```$")


def answer_schema(req: CloudRequest) -> dict[str, Any] | None:
    """The JSON Schema the answer must satisfy (None: free text)."""
    if req.kind == "classify":
        return {
            "type": "object",
            "properties": {"label": {"type": "string", "enum": list(req.labels)}},
            "required": ["label"],
            "additionalProperties": False,
        }
    if req.kind == "extract":
        return req.output_schema
    return None


def response_format(
    req: CloudRequest, mode: StructuredOutput, strict: bool
) -> dict[str, Any] | None:
    """The ``response_format`` of the completion request for this request and mode."""
    schema = answer_schema(req)
    if schema is None or mode == "prompt":
        return None
    if mode == "json_object":
        return {"type": "json_object"}
    if mode == "json_object_schema":
        return {"type": "json_object", "schema": schema}
    name = _FORMAT_NAME.sub("_", f"{req.kind}_{req.task}")[:64]
    return {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": schema, "strict": strict},
    }


def build_messages(req: CloudRequest) -> list[dict[str, str]]:
    """System and user messages for one request.  The schema is always in the prompt too,
    so modes without server-side enforcement still tell the model what to write."""
    system = [f'You answer requests of the task "{req.task}" for edge devices.']
    if req.instructions:
        system.append(req.instructions.strip())
    if req.kind == "classify":
        system.append(
            "Classify the input into exactly one of these labels: "
            + ", ".join(json.dumps(x, ensure_ascii=False) for x in req.labels)
            + '.\nRespond with only a JSON object of the form {"label": "<one of the labels>"}.'
        )
    elif req.kind == "extract":
        system.append(
            "Extract the requested information from the input.\n"
            "Respond with only a JSON object that is valid against this JSON Schema:\n"
            + json.dumps(req.output_schema, ensure_ascii=False)
        )
    else:
        system.append("Respond with the answer text only.")
    user = req.input if isinstance(req.input, str) else json.dumps(req.input, ensure_ascii=False)
    return [{"role": "system", "content": "\n\n".join(system)}, {"role": "user", "content": user}]


def corrective_messages(req: CloudRequest, bad: str, reason: str) -> list[dict[str, str]]:
    """What to append after an invalid answer, for the one retry."""
    if req.kind == "classify":
        shape = 'only a JSON object {"label": ...} whose label is one of: ' + ", ".join(req.labels)
    elif req.kind == "extract":
        shape = "only a JSON object valid against the JSON Schema given above"
    else:
        shape = "a non-empty answer text"
    return [
        {"role": "assistant", "content": truncate(bad, 2000)},
        {
            "role": "user",
            "content": f"That answer was invalid: {reason}.  Respond again with {shape}.",
        },
    ]


class InvalidOutput(Exception):
    """The model's answer does not satisfy the request; the message says why."""


def parse_json_answer(content: str) -> Any:
    """JSON from a model's answer; tolerates code fences and prose around one object."""
    text = content.strip()
    fenced = _FENCE.search(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        try:
            return json.loads(text[start : end + 1])
        except ValueError:
            pass
    raise InvalidOutput(f"not a JSON object: {truncate(content, 80)!r}")


def check_output(req: CloudRequest, content: str) -> dict[str, Any]:
    """The reply's ``output`` for a model answer; raise :class:`InvalidOutput`."""
    if req.kind == "generate":
        text = content.strip()
        if not text:
            raise InvalidOutput("empty answer")
        return {"text": text}
    value = parse_json_answer(content)
    if not isinstance(value, dict):
        raise InvalidOutput(f"expected a JSON object, got {type(value).__name__}")
    if req.kind == "classify":
        label = value.get("label")
        if not isinstance(label, str):
            raise InvalidOutput('no string "label" in the answer')
        if label in req.labels:
            return {"label": label}
        # Models vary case and spacing; map to the canonical label when that is unambiguous.
        folded = [x for x in req.labels if x.casefold() == label.strip().casefold()]
        if len(folded) == 1:
            return {"label": folded[0]}
        raise InvalidOutput(f"label {truncate(label, 60)!r} is not one of the labels")
    assert req.output_schema is not None  # checked by CloudRequest
    validator = jsonschema.Draft202012Validator(req.output_schema)
    errors = sorted(validator.iter_errors(value), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.path) or "(root)"
        raise InvalidOutput(f"not valid against the schema at {where}: {first.message}")
    return value
