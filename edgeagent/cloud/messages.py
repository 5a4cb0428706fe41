"""The cloud agent's wire messages (PROTOCOL.md, "Escalation"): requests in, replies out.

Pure: pydantic models, the request parser (which never raises anything but
:class:`BadRequest`), the stable ``error.code`` values and where a reply may go.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgeagent.protocol import PROTOCOL_VERSION, ErrorInfo, truncate

__all__ = [
    "DEADLINE_EXCEEDED",
    "INTERNAL",
    "INVALID_OUTPUT",
    "INVALID_REQUEST",
    "UNSUPPORTED_VERSION",
    "BadRequest",
    "CloudReply",
    "CloudRequest",
    "LocalAnswer",
    "ReplyStatus",
    "Usage",
    "parse_request",
    "reply_topic_for",
    "short_str",
]

ReplyStatus = Literal["ok", "error", "expired"]

# error.code values of replies.  Stable: daemons may switch on them.
INVALID_REQUEST = "invalid_request"
UNSUPPORTED_VERSION = "unsupported_version"
INVALID_OUTPUT = "invalid_output"
DEADLINE_EXCEEDED = "deadline_exceeded"
INTERNAL = "internal"


class LocalAnswer(BaseModel):
    """What the device's own model answered."""

    model_config = ConfigDict(extra="ignore")

    output: Any = None
    confidence: float | None = None


class CloudRequest(BaseModel):
    """An escalation as daemons send it (PROTOCOL.md, "Escalation")."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    v: int = Field(PROTOCOL_VERSION, description="Protocol version.")
    escalation_id: str = Field(min_length=1, max_length=128, description="Correlation key.")
    device: str = Field(min_length=1, max_length=128, description="The escalating device.")
    task: str = Field(min_length=1, max_length=128, description="The device's task name.")
    kind: Literal["classify", "extract", "generate"] = Field(description="What to answer.")
    input: str | dict[str, Any] = Field(description="The (redacted) input.")
    instructions: str | None = Field(None, description="How to answer this task.")
    labels: list[str] = Field(default_factory=list, description="Classify: the label set.")
    output_schema: dict[str, Any] | None = Field(
        None, alias="schema", description="Extract: JSON Schema (object) of the answer."
    )
    local: LocalAnswer | None = Field(None, description="The local model's answer.")
    deadline_ms: int | None = Field(None, ge=1, description="Patience left (ms).")

    @model_validator(mode="after")
    def _check(self) -> CloudRequest:
        if self.kind == "classify" and (not self.labels or not all(self.labels)):
            raise ValueError("classify needs a non-empty `labels` list of strings")
        if self.kind == "extract":
            if self.output_schema is None or self.output_schema.get("type") != "object":
                raise ValueError("extract needs a `schema` with type = 'object'")
            try:
                jsonschema.Draft202012Validator.check_schema(self.output_schema)
            except jsonschema.SchemaError as exc:
                raise ValueError(f"schema: not a valid JSON Schema: {exc.message}") from None
        return self


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class CloudReply(BaseModel):
    """The agent's answer (PROTOCOL.md, "Escalation")."""

    v: int = PROTOCOL_VERSION
    escalation_id: str | None
    status: ReplyStatus
    output: Any = None
    confidence: float | None = None
    model: str | None = None
    usage: Usage = Field(default_factory=Usage)
    error: ErrorInfo | None = None

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


class BadRequest(Exception):
    """A request that cannot be answered as sent; ``escalation_id``/``device`` if readable."""

    def __init__(
        self, code: str, message: str, escalation_id: str | None, device: str | None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.escalation_id = escalation_id
        self.device = device


def parse_request(payload: bytes, max_bytes: int) -> CloudRequest:
    """Validate a request payload; raise :class:`BadRequest` (never anything else)."""
    if len(payload) > max_bytes:
        raise BadRequest(
            INVALID_REQUEST, f"payload is {len(payload)} bytes; limit {max_bytes}", None, None
        )
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadRequest(
            INVALID_REQUEST, f"payload is not UTF-8 JSON: {truncate(str(exc), 120)}", None, None
        ) from None
    if not isinstance(data, dict):
        raise BadRequest(INVALID_REQUEST, "payload must be a JSON object", None, None)
    eid = short_str(data.get("escalation_id"))
    device = short_str(data.get("device"))
    version = data.get("v", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise BadRequest(
            UNSUPPORTED_VERSION,
            f"protocol version {truncate(repr(version), 40)} unsupported; "
            f"this agent speaks v{PROTOCOL_VERSION}",
            eid,
            device,
        )
    try:
        return CloudRequest.model_validate(data)
    except ValidationError as exc:
        parts = [
            f"{'.'.join(str(p) for p in e['loc']) or '(message)'}: {e['msg']}"
            for e in exc.errors()[:5]
        ]
        raise BadRequest(INVALID_REQUEST, truncate("; ".join(parts), 500), eid, device) from None
    except RecursionError:
        raise BadRequest(INVALID_REQUEST, "payload nested too deeply", eid, device) from None


def short_str(value: object) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= 128 else None


def reply_topic_for(prefix: str, response_topic: str | None, device: str | None) -> str | None:
    """Where to answer: the Response Topic if it is a reply topic of ``prefix``, else the
    device's reply topic.  Never an arbitrary topic (the agent is no relay)."""
    if response_topic is not None:
        levels = response_topic.split("/")
        ok = (
            len(levels) == 4
            and levels[0] == prefix
            and levels[2:] == ["cloud", "replies"]
            and _valid_level(levels[1])
        )
        return response_topic if ok else None
    if device is not None and _valid_level(device):
        return f"{prefix}/{device}/cloud/replies"
    return None


def _valid_level(level: str) -> bool:
    return bool(level) and not any(c in level for c in "+#/\x00") and not level.startswith("$")
