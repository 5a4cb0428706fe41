"""A deterministic stand-in for an OpenAI-compatible chat-completions server.

**Not a model.**  It exists so that ``./install.sh --demo`` and tests can show the whole
escalation path (daemon -> MQTT -> ``edgeagent cloud`` -> HTTP -> reply -> result) in
seconds, without an API key and without compiling llama.cpp.  Every answer it gives is
labelled ``model = "edgeagent-standin-rules"`` so it cannot be mistaken for a real one.

How it answers ``POST /v1/chat/completions`` (the request ``edgeagent cloud`` sends):

* classify (a ``response_format`` schema whose ``label`` has an ``enum``): the label whose
  words (split on ``_``/``-``/space) share the most 4-letter word prefixes with the input;
  no overlap at all -> the out-of-scope label when the set has one (``oos``,
  ``out_of_scope``, ``other``, ``unknown``, ``none``), else the first label;
* extract (any other object schema): per property, a number -> the number written right
  before a unit the schema lists (else the first that is not part of a date or time); an
  ``enum`` string -> the first enum value that occurs in the input as a word;
  another string -> the value of a ``key=value`` / ``key: value`` pair whose key contains the
  property name, else the first token that mixes letters and digits;
* otherwise (free text): ``"stand-in answer: " + input``.

Standard library only (``http.server``): it is a demo/test fixture, not a service.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL_NAME = "edgeagent-standin-rules"
OOS_LABELS = ("oos", "out_of_scope", "other", "unknown", "none")

_WORD = re.compile(r"[A-Za-z]+")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_TOKEN = re.compile(r"[A-Za-z0-9_.\-]+")


def _stems(text: str) -> set[str]:
    return {w.lower()[:4] for w in _WORD.findall(text) if len(w) >= 3}


def classify(text: str, labels: list[str]) -> str:
    """The label with the most word-prefix overlap with ``text`` (ties: first in order)."""
    words = _stems(text)
    best, best_score = "", 0
    for label in labels:
        if label.lower() in OOS_LABELS:
            continue
        score = len(_stems(label.replace("_", " ").replace("-", " ")) & words)
        if score > best_score:
            best, best_score = label, score
    if best:
        return best
    for label in labels:
        if label.lower() in OOS_LABELS:
            return label
    return labels[0]


def extract(text: str, schema: dict[str, Any]) -> dict[str, Any]:
    """A best-effort object for ``schema`` from ``text`` (see the module docstring)."""
    out: dict[str, Any] = {}
    props = schema.get("properties") or {}
    units = [
        str(u)
        for spec in props.values()
        if isinstance(spec, dict) and isinstance(spec.get("enum"), list)
        for u in spec["enum"]
    ]
    for name, spec in props.items():
        if not isinstance(spec, dict):
            continue
        kind = spec.get("type")
        if kind in ("number", "integer"):
            number = _measured_number(text, units)
            if number is not None:
                out[name] = int(number) if kind == "integer" else number
        elif kind == "string" and isinstance(spec.get("enum"), list):
            for value in spec["enum"]:
                if re.search(rf"(?<![A-Za-z]){re.escape(str(value))}(?![A-Za-z])", text):
                    out[name] = value
                    break
        elif kind == "string":
            key = name.split("_")[0].lower()
            pair = re.search(rf"\b\w*{re.escape(key)}\w*\s*[=:]\s*([^\s,;|]+)", text, re.I)
            if pair:
                out[name] = pair.group(1)
            else:
                mixed = [
                    t
                    for t in _TOKEN.findall(text)
                    if re.search(r"[A-Za-z]", t) and re.search(r"\d", t)
                ]
                if mixed:
                    out[name] = mixed[0]
    return out


def _measured_number(text: str, units: list[str]) -> float | None:
    """The number written right before one of ``units``, else the first number that is
    not part of a date or a time (``2026-11-26``, ``07:12:03``)."""
    for u in sorted(units, key=len, reverse=True):
        m = re.search(rf"(-?\d+(?:\.\d+)?)\s*{re.escape(u)}(?![A-Za-z])", text)
        if m:
            return float(m.group(1))
    for m in _NUMBER.finditer(text):
        before = text[m.start() - 1] if m.start() else " "
        after = text[m.end()] if m.end() < len(text) else " "
        joined = m.group().startswith("-") and before.isalnum()  # "2026-11": a date
        if before not in ":-" and after not in ":-" and not joined:
            return float(m.group())
    return None


def answer(body: dict[str, Any]) -> str:
    """The assistant message content for one chat-completions request body."""
    messages = body.get("messages") or []
    user = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
    # A corrective retry appends the bad answer and a complaint: answer the original input.
    users = [m.get("content", "") for m in messages if m.get("role") == "user"]
    text = str(users[0] if users else user)
    fmt = body.get("response_format") or {}
    schema = fmt.get("schema") or (fmt.get("json_schema") or {}).get("schema")
    if isinstance(schema, dict):
        label = (schema.get("properties") or {}).get("label") or {}
        if isinstance(label, dict) and isinstance(label.get("enum"), list):
            return json.dumps({"label": classify(text, [str(x) for x in label["enum"]])})
        return json.dumps(extract(text, schema))
    return "stand-in answer: " + text


class _Handler(BaseHTTPRequestHandler):
    server_version = "edgeagent-standin/1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def _send(self, code: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._send(200, {"object": "list", "data": [{"id": MODEL_NAME, "object": "model"}]})
        else:
            self._send(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send(404, {"error": {"message": "not found"}})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise ValueError("body is not an object")
            content = answer(body)
        except (ValueError, TypeError, AttributeError) as exc:
            self._send(400, {"error": {"message": f"bad request: {exc}"}})
            return
        self._send(
            200,
            {
                "id": f"standin-{time.monotonic_ns()}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": MODEL_NAME,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            },
        )


def serve(host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """Start the stand-in in a daemon thread; ``server.server_address`` has the port."""
    server = ThreadingHTTPServer((host, port), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="standin-http", daemon=True).start()
    return server
