"""Wire protocol v1 (see PROTOCOL.md): messages, topics and the job parser.  Pure: no I/O.

The parser never raises on external data: every payload maps either to a
:class:`Job` or to a :class:`Rejection` with a stable ``code``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PROTOCOL_VERSION = 1

Status = Literal["ok", "rejected", "error", "expired", "unrecognized"]
Source = Literal["local", "cache", "cloud"]
EscalationReason = Literal[
    "low_confidence", "out_of_scope", "schema_invalid", "open_ended", "forced", "audit"
]

# Rejection codes: one per kind of bad input.  Stable: producers may switch on them.
NOT_JSON = "not_json"
TOO_LARGE = "too_large"
NOT_AN_OBJECT = "not_an_object"
INVALID_FIELD = "invalid_field"
UNSUPPORTED_VERSION = "unsupported_version"
INPUT_TOO_LARGE = "input_too_large"
UNKNOWN_TASK = "unknown_task"
REPLY_TOPIC_NOT_ALLOWED = "reply_topic_not_allowed"
ID_CONFLICT = "id_conflict"
UNPROCESSABLE = "unprocessable"
REJECTION_CODES = frozenset(
    {
        ID_CONFLICT,
        UNPROCESSABLE,
        NOT_JSON,
        TOO_LARGE,
        NOT_AN_OBJECT,
        INVALID_FIELD,
        UNSUPPORTED_VERSION,
        INPUT_TOO_LARGE,
        UNKNOWN_TASK,
        REPLY_TOPIC_NOT_ALLOWED,
    }
)

MAX_LOGGED_CHARS = 200

MAX_DEPTH = 32
"""Deepest nesting of arrays/objects accepted in a payload (the payload object is level 1)."""
MAX_INT_DIGITS = 4300
"""Longest JSON integer accepted (digits): CPython's own ``int`` parsing limit, on every version."""


def truncate(text: str, limit: int = MAX_LOGGED_CHARS) -> str:
    """For logs: never echo a payload in full."""
    return text if len(text) <= limit else text[:limit] + f"…(+{len(text) - limit})"


class ErrorInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")

    code: str
    message: str


class EscalationInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")

    reason: EscalationReason
    id: str


class JobMessage(BaseModel):
    """A job as producers send it (PROTOCOL.md, "Job")."""

    model_config = ConfigDict(extra="ignore", strict=True)

    v: int = Field(1, description="Protocol version.")
    id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=r"^[\x21-\x7e]+$",
        description="Idempotency key, 1-128 printable ASCII characters.",
    )
    input: str | dict[str, Any] = Field(description="The text, or an object for object inputs.")
    params: dict[str, Any] = Field(default_factory=dict, description="Task parameters.")
    deadline_ms: int | None = Field(None, ge=1, description="Producer's patience (ms).")
    escalate: Literal["auto", "never", "always"] = Field("auto", description="Escalation wish.")
    reply_to: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        description="Result topic for MQTT 3.1.1 producers (v5 producers use Response Topic).",
    )


class ResultMessage(BaseModel):
    """A result as the daemon sends it (PROTOCOL.md, "Result")."""

    model_config = ConfigDict(extra="ignore")

    v: int = PROTOCOL_VERSION
    id: str
    task: str
    status: Status
    output: Any = None
    confidence: float | None = None
    source: Source | None = None
    model: str | None = None
    provisional: bool = False
    supersedes: str | None = None
    escalation: EscalationInfo | None = None
    error: ErrorInfo | None = None
    latency_ms: float | None = None

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=False).encode()


@dataclass(frozen=True, slots=True)
class Job:
    """A validated job, ready for the journal."""

    id: str
    task: str
    input: str | dict[str, Any]
    params: dict[str, Any]
    deadline_ms: int
    escalate: Literal["auto", "never", "always"]

    def to_json(self) -> str:
        return json.dumps(
            {
                "id": self.id,
                "task": self.task,
                "input": self.input,
                "params": self.params,
                "deadline_ms": self.deadline_ms,
                "escalate": self.escalate,
            },
            ensure_ascii=False,
            allow_nan=False,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> Job:
        d = json.loads(text)
        return cls(
            id=d["id"],
            task=d["task"],
            input=d["input"],
            params=d["params"],
            deadline_ms=d["deadline_ms"],
            escalate=d["escalate"],
        )


@dataclass(frozen=True, slots=True)
class Rejection:
    """Bad input: ``id`` is the job's own id when it could be read, else the derived one."""

    id: str
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Limits:
    max_payload_bytes: int
    max_input_bytes: int
    default_deadline_ms: int
    max_deadline_ms: int


def derive_job_id(topic: str, payload: bytes, correlation: bytes | None) -> str:
    """An id for a job that carries none: stable across broker redeliveries of the same packet."""
    h = hashlib.sha256()
    for part in (topic.encode(), correlation or b"", payload):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return "d-" + h.hexdigest()[:32]


def parse_job(
    payload: bytes,
    *,
    task: str,
    derived_id: str,
    limits: Limits,
    known_tasks: frozenset[str] | set[str],
) -> Job | Rejection:
    """Validate a job payload.  Never raises."""
    if len(payload) > limits.max_payload_bytes:
        return Rejection(
            derived_id,
            TOO_LARGE,
            f"payload is {len(payload)} bytes; limit {limits.max_payload_bytes}",
        )
    try:
        data = load_payload(payload)
    except NotJson as exc:
        # JSON that parsed but is refused (a lone surrogate, too deep) keeps the producer's id.
        rej_id = _readable_id(exc.decoded.get("id"), derived_id) if exc.decoded else derived_id
        return Rejection(rej_id, NOT_JSON, str(exc))
    if not isinstance(data, dict):
        return Rejection(derived_id, NOT_AN_OBJECT, "payload must be a JSON object")
    job_id = _readable_id(data.get("id"), derived_id)
    version = data.get("v", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        return Rejection(
            job_id,
            UNSUPPORTED_VERSION,
            f"protocol version {truncate(repr(version), 40)} unsupported; "
            f"this daemon speaks v{PROTOCOL_VERSION}",
        )
    try:
        msg = JobMessage.model_validate(data)
    except ValidationError as exc:
        return Rejection(job_id, INVALID_FIELD, _describe(exc))
    except RecursionError:
        return Rejection(job_id, INVALID_FIELD, "payload nested too deeply")
    if task not in known_tasks:
        return Rejection(
            job_id, UNKNOWN_TASK, f"no task named {truncate(task, 64)!r} on this device"
        )
    size = _input_size(msg.input)
    if size > limits.max_input_bytes:
        return Rejection(
            job_id, INPUT_TOO_LARGE, f"input is {size} bytes; limit {limits.max_input_bytes}"
        )
    deadline = msg.deadline_ms if msg.deadline_ms is not None else limits.default_deadline_ms
    deadline = min(deadline, limits.max_deadline_ms)
    return Job(
        id=msg.id or derived_id,
        task=task,
        input=msg.input,
        params=msg.params,
        deadline_ms=deadline,
        escalate=msg.escalate,
    )


def reply_to_of(payload: bytes) -> str | None:
    """The ``reply_to`` of a payload, if one can be read (for v3.1.1 producers)."""
    try:
        data = load_payload(payload)
    except NotJson:
        return None
    value = data.get("reply_to") if isinstance(data, dict) else None
    return value if isinstance(value, str) and value else None


class NotJson(ValueError):
    """The payload is not a JSON text this daemon accepts; the message says why (no payload)."""

    decoded: dict[str, Any] | None = None
    """The decoded object, when the payload parsed but its content is refused."""


def load_payload(payload: bytes) -> Any:
    """Decode a payload as I-JSON (RFC 7493), the JSON every consumer of ours can read back.

    Refused, with a message that says why: bytes that are not UTF-8; JSON syntax errors;
    ``NaN``/``Infinity`` and numbers outside the double range; integers over
    :data:`MAX_INT_DIGITS` digits; lone surrogates (``"\\ud800"``: no UTF-8 encoding exists,
    so neither the journal nor a result could carry them); duplicate object keys (two
    readers could see two different jobs); nesting deeper than :data:`MAX_DEPTH`.  A UTF-8
    byte order mark is ignored (RFC 8259 allows it).  Never raises anything but NotJson.
    """
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotJson(f"payload is not UTF-8: invalid byte at offset {exc.start}") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        data = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
            object_pairs_hook=_unique_keys,
        )
    except NotJson:
        raise
    except RecursionError:
        raise NotJson(f"payload is not JSON: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError included
        raise NotJson(f"payload is not JSON: {truncate(str(exc), 120)}") from None
    try:
        _check_tree(data, text)
    except NotJson as exc:
        exc.decoded = data if isinstance(data, dict) else None
        raise
    return data


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _check_tree(data: Any, text: str) -> None:
    """Depth and Unicode checks of a decoded payload, at C speed on its (valid) JSON text.

    Depth: the running sum of brackets outside strings.  Unicode: decoded UTF-8 never holds a
    surrogate, so only a ``\\uD800``-``\\uDFFF`` escape can bring one; the path of a bad
    string is only worked out when there is one.
    """
    if text.count("[") + text.count("{") > MAX_DEPTH:
        skeleton = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
        steps = map(_BRACKET_STEP.__getitem__, skeleton)
        if max(itertools.accumulate(steps), default=0) > MAX_DEPTH:
            raise NotJson(f"payload is nested deeper than {MAX_DEPTH} levels")
    if not _SURROGATE_ESCAPE.search(text):
        return
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        _locate_bad_text(data)
        raise NotJson("payload is not valid Unicode: lone surrogate") from None


def _locate_bad_text(data: Any) -> None:
    """Raise NotJson naming where the first string without a UTF-8 encoding is."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            _check_text(value, where or "(payload)")
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, f"a key in {where or '(payload)'}")
                stack.append((item, truncate(f"{where}.{key}" if where else key, 60)))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                stack.append((item, truncate(f"{where}[{i}]", 60)))


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise NotJson(
            f"payload is not valid Unicode: lone surrogate U+{ord(bad):04X} in "
            f"{where.encode('utf-8', 'backslashreplace').decode()}"
        ) from None


def job_id_of(payload: bytes, fallback: str) -> str:
    """The payload's own ``id`` if it can be read and is valid, else ``fallback``."""
    try:
        data = load_payload(payload)
    except NotJson:
        return fallback
    return _readable_id(data.get("id") if isinstance(data, dict) else None, fallback)


def _reject_constant(name: str) -> float:
    raise NotJson(f"payload is not JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise NotJson(f"payload is not JSON: number {truncate(text, 40)} is out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS + 1:
        raise NotJson(
            f"payload is not JSON: integer of {len(text)} digits (limit {MAX_INT_DIGITS})"
        )
    return int(text)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                shown = truncate(key, 40).encode("utf-8", "backslashreplace").decode()
                raise NotJson(f"payload is not JSON this daemon accepts: duplicate key {shown!r}")
            seen.add(key)
    return out


def _readable_id(value: object, fallback: str) -> str:
    if (
        isinstance(value, str)
        and 1 <= len(value) <= 128
        and value.isascii()
        and value.isprintable()
        and " " not in value
    ):
        return value
    return fallback


def _input_size(value: str | dict[str, Any]) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    return len(json.dumps(value, ensure_ascii=False).encode("utf-8"))


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "(message)"
        parts.append(f"{loc}: {err['msg']}")
    return truncate("; ".join(parts), 500)


# -- topics -----------------------------------------------------------------------


def publishable(topic: str) -> bool:
    """Can ``topic`` be a PUBLISH topic name (MQTT 5.0 §4.7)?  1-65535 UTF-8 bytes, no
    wildcard, no U+0000.  (A job's topic can be 65535 bytes; its results topic is longer.)"""
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        return False
    try:
        return len(topic.encode("utf-8")) <= 65535
    except UnicodeEncodeError:
        return False


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic templates of one device (PROTOCOL.md, "Topics")."""

    prefix: str
    device: str
    fleet_group: str | None = None

    @property
    def jobs_filter(self) -> str:
        return f"{self.prefix}/{self.device}/jobs/+"

    @property
    def fleet_filter(self) -> str | None:
        if not self.fleet_group:
            return None
        return f"$share/{self.fleet_group}/{self.prefix}/fleet/jobs/+"

    def results(self, task: str) -> str:
        return f"{self.prefix}/{self.device}/results/{task}"

    @property
    def status(self) -> str:
        return f"{self.prefix}/{self.device}/status"

    @property
    def stats(self) -> str:
        return f"{self.prefix}/{self.device}/stats"

    def cloud_requests(self, task: str) -> str:
        return f"{self.prefix}/cloud/requests/{task}"

    @property
    def cloud_status(self) -> str:
        return f"{self.prefix}/cloud/status"

    @property
    def cloud_replies(self) -> str:
        return f"{self.prefix}/{self.device}/cloud/replies"

    def task_of(self, topic: str) -> str | None:
        """The task of a job topic (device or fleet), else None."""
        for head in (f"{self.prefix}/{self.device}/jobs/", f"{self.prefix}/fleet/jobs/"):
            if topic.startswith(head):
                rest = topic[len(head) :]
                return rest if rest and "/" not in rest else None
        return None

    @property
    def namespace(self) -> str:
        """This device's own topic namespace, ``{prefix}/{device}/`` (with the slash)."""
        return f"{self.prefix}/{self.device}/"

    def reply_allowed(self, topic: str, allowed_prefixes: list[str]) -> bool:
        """May a job make us publish on ``topic``?  See :meth:`reply_refusal`."""
        return self.reply_refusal(topic, allowed_prefixes) is None

    def reply_refusal(self, topic: str, allowed_prefixes: list[str]) -> str | None:
        """Why a job may not name ``topic`` as its reply topic; None if it may.

        Allowed: a topic under this device's namespace ``{prefix}/{device}/``, or under one
        of ``allowed_prefixes`` (the operator's ``topics.allowed_reply_prefixes``; each is
        matched on whole topic levels, so ``app/replies`` covers ``app/replies/x``, never
        ``app/replies-x``).  Always refused, whatever the prefixes: wildcards, ``$`` topics,
        empty levels (``a//b``, a trailing ``/``), text mosquitto refuses as malformed
        (NUL, control characters, lone surrogates, non-characters) or over
        :data:`MAX_REPLY_TOPIC_BYTES`, and the protocol's own topics (any device's jobs,
        status, stats and cloud topics, the fleet and cloud namespaces): a reply there
        would loop or speak for another device.
        """
        if not topic:
            return "empty topic"
        if "+" in topic or "#" in topic:
            return "wildcards are not topic names"
        if topic.startswith("$"):
            return "'$' topics are reserved for the broker"
        bad = _malformed(topic)
        if bad is not None:
            return bad
        levels = topic.split("/")
        if "" in levels:
            return "empty topic level"
        if self._reserved(levels):
            return "a job, status, stats or cloud topic of the protocol"
        if topic.startswith(self.namespace):
            return None
        if any(topic.startswith(_level_prefix(p)) for p in allowed_prefixes):
            return None
        if levels[0] == self.prefix:
            return "another device's namespace (only this device's and the allowed prefixes)"
        return "outside this device's namespace and the allowed prefixes"

    def _reserved(self, levels: list[str]) -> bool:
        """The protocol's own topics, on any device and under any prefix (conservative: a
        ``jobs`` or ``cloud`` level anywhere, a last level ``status`` or ``stats``)."""
        if "jobs" in levels or "cloud" in levels or levels[-1] in ("status", "stats"):
            return True
        return levels[0] == self.prefix and len(levels) > 1 and levels[1] in ("fleet", "cloud")


MAX_REPLY_TOPIC_BYTES = 1024
"""Longest reply topic a job may name (UTF-8 bytes); MQTT allows 65535, no producer needs it."""


def _level_prefix(prefix: str) -> str:
    return prefix if prefix.endswith("/") else prefix + "/"


def _malformed(topic: str) -> str | None:
    """Why a broker would refuse ``topic`` as malformed UTF-8 (mosquitto disconnects a client
    that publishes one, which would stall the outbox); None if it is well formed."""
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        return "not valid UTF-8 (lone surrogate)"
    if size > MAX_REPLY_TOPIC_BYTES:
        return f"longer than {MAX_REPLY_TOPIC_BYTES} bytes"
    bad = _REFUSED_CHAR.search(topic)  # the first one decides, as a scan would
    if bad is None:
        return None
    c = ord(bad.group())
    return "control character" if c < 0x20 or 0x7F <= c <= 0x9F else "Unicode non-character"


_REFUSED_CHAR = re.compile(
    "[\x00-\x1f\x7f-\x9f\ufdd0-\ufdef"
    + "".join(chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(17))
    + "]"
)
"""Control characters (C0, DEL, C1) and Unicode non-characters (U+FDD0-U+FDEF, the last two
code points of every plane): one character class, so a linear scan in C."""
