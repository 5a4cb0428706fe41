"""The ``rules`` backend: keyword/regex classification and regex extraction from the config.

Its config (:class:`RulesBackendConfig`, ``type = "rules"``) and runtime
(:class:`RulesBackend`) live here; :data:`BACKEND` registers both.

Deterministic and model-free: a match answers with confidence 1.0, no match
answers nothing (confidence 0.0), so the router escalates or answers
``unrecognized``.  Thread-safe (compiled patterns are immutable).

Patterns run on RE2 (:mod:`edgeagent.regex`): time linear in the input for every
pattern, so no input can make a rule take seconds (with Python's backtracking ``re``
one 16 KiB string of digits held the GIL for ~12 s).  Its answers take microseconds,
so it is ``inline``: a batch of small inputs (:data:`~edgeagent.backends.base.INLINE_MAX_CHARS`
characters in all) is answered on the event loop, a larger one on the task's inference
thread.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgeagent import regex
from edgeagent.backends.base import BackendConfig, BackendType, JSONValue, Prediction

if TYPE_CHECKING:
    from edgeagent.config import TaskConfig


class RuleConfig(BaseModel):
    """One classification rule: the first rule that matches wins."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str = Field(description="Label answered when this rule matches.")
    keywords: list[str] = Field(
        default_factory=list, description="Case-insensitive whole-word keywords."
    )
    patterns: list[str] = Field(
        default_factory=list,
        description="Regular expressions (RE2 syntax: linear time; no backreferences or "
        "lookaround); any match answers `label`.",
    )

    @field_validator("patterns")
    @classmethod
    def _v_patterns(cls, value: list[str]) -> list[str]:
        for i, p in enumerate(value):
            regex.check_pattern(f"patterns[{i}]", p)
        return value


class RulesBackendConfig(BackendConfig):
    """Deterministic, model-free backend: keyword/regex classification, regex extraction."""

    type: Literal["rules"] = "rules"
    rules: list[RuleConfig] = Field(
        default_factory=list, description="Classification rules, tried in order."
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Extraction: field name -> regex (RE2 syntax); the first group (or the whole "
        "match) is the value, converted to the schema's type.",
    )
    ignore_case: bool = Field(True, description="Match case-insensitively.")

    @field_validator("fields")
    @classmethod
    def _v_fields(cls, value: dict[str, str]) -> dict[str, str]:
        for name, p in value.items():
            regex.check_pattern(f"fields.{name}", p)
        return value

    def check_task(self, task: TaskConfig) -> None:
        if task.kind == "classify" and not self.rules:
            raise ValueError("a classify task on the rules backend needs backend.rules")
        if task.kind == "extract" and not self.fields:
            raise ValueError("an extract task on the rules backend needs backend.fields")
        if task.kind == "generate":
            raise ValueError("the rules backend cannot generate text")
        if task.labels:
            unknown = {r.label for r in self.rules} - set(task.labels)
            if unknown:
                raise ValueError(f"rules answer labels not in `labels`: {sorted(unknown)}")


# A keyword is a whole word: not glued to a letter, digit, mark or underscore (Unicode-
# aware, unlike RE2's ASCII-only \b; no lookaround needed for a yes/no search).
_WORD_CLASS = r"[\p{L}\p{N}\p{M}_]"
_WORD_CHAR = regex.compile(_WORD_CLASS)
_NOT_WORD_BEFORE = r"(?:^|[^\p{L}\p{N}\p{M}_])"
_NOT_WORD_AFTER = r"(?:$|[^\p{L}\p{N}\p{M}_])"


def keyword_pattern(keyword: str) -> str:
    """RE2 pattern for ``keyword`` as a whole word: a boundary is required only where the
    keyword itself starts or ends with a word character (as Python's ``\\b`` would)."""
    head = _NOT_WORD_BEFORE if _WORD_CHAR.fullmatch(keyword[:1]) else ""
    tail = _NOT_WORD_AFTER if _WORD_CHAR.fullmatch(keyword[-1:]) else ""
    return head + regex.escape(keyword) + tail


class RulesBackend:
    inline: ClassVar[bool] = True
    """Small batches are answered on the event loop (see the module docstring)."""

    def __init__(self, task_name: str, task: TaskConfig) -> None:
        if not isinstance(task.backend, RulesBackendConfig):
            raise TypeError("RulesBackend needs a rules backend config")
        self._task_name = task_name
        self._task = task
        self._cfg = task.backend
        icase = self._cfg.ignore_case
        self._rules: list[tuple[str, regex.Pattern | None, list[regex.Pattern]]] = []
        for rule in self._cfg.rules:
            sources = list(rule.patterns) + [keyword_pattern(k) for k in rule.keywords]
            pats = [regex.compile(p, ignore_case=icase) for p in sources]
            self._rules.append((rule.label, _any_of(sources, icase), pats))
        self._fields = {
            name: regex.compile(p, ignore_case=icase) for name, p in self._cfg.fields.items()
        }
        self._validator = (
            jsonschema.Draft202012Validator(task.output_schema) if task.output_schema else None
        )
        digest = hashlib.sha256(
            json.dumps(self._cfg.model_dump(mode="json"), sort_keys=True).encode()
        ).hexdigest()
        self._fingerprint = digest[:16]

    @property
    def model_id(self) -> str:
        return f"rules@{self._fingerprint[:8]}"

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def load(self) -> None:
        return None

    def warmup(self) -> None:
        self.infer_batch(["warm-up"])

    def close(self) -> None:
        return None

    def infer_batch(self, inputs: list[JSONValue]) -> list[Prediction]:
        return [self._infer(_as_text(x)) for x in inputs]

    def _infer(self, text: str) -> Prediction:
        if self._task.kind == "classify":
            for label, any_of, pats in self._rules:
                if any_of is not None and not any_of.search(text):
                    continue  # one search instead of one per pattern
                for p in pats:
                    if p.search(text):
                        return Prediction({"label": label}, 1.0, details={"rule": p.pattern})
            return Prediction(None, 0.0, reason="out_of_scope")
        return self._extract(text)

    def _extract(self, text: str) -> Prediction:
        props: dict[str, Any] = {}
        if self._task.output_schema:
            props = self._task.output_schema.get("properties", {})
        out: dict[str, JSONValue] = {}
        for name, pat in self._fields.items():
            m = pat.search(text)
            if m is None:
                continue
            raw = m.group(1) if pat.groups else m.group(0)
            value = _convert(raw, props.get(name, {}).get("type"))
            if value is not None:
                out[name] = value
        if self._validator is not None and not self._validator.is_valid(out):
            error = jsonschema.exceptions.best_match(self._validator.iter_errors(out))
            details: dict[str, JSONValue] = {"partial": out, "failure": "schema"}
            if error is not None:  # name the field that failed (issue 14)
                details.update(fields=[error.json_path], message=error.message[:200])
            return Prediction(None, 0.0, reason="schema_invalid", details=details)
        if not out:
            return Prediction(None, 0.0, reason="out_of_scope")
        return Prediction(out, 1.0)


def _any_of(sources: list[str], ignore_case: bool) -> regex.Pattern | None:
    """One pattern that matches where any of ``sources`` does (RE2 scopes inline flags to
    their group), to rule a rule out in one search; None if RE2 cannot compile it (the
    rule's patterns are then tried one by one)."""
    if len(sources) < 2:
        return None
    try:
        return regex.compile("|".join(f"(?:{p})" for p in sources), ignore_case=ignore_case)
    except regex.PatternError:
        return None


def _as_text(value: JSONValue) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        return str(value["text"])
    return json.dumps(value, ensure_ascii=False)


def _convert(raw: str | None, typ: object) -> JSONValue:
    if raw is None:
        return None
    try:
        if typ == "integer":
            return int(raw)
        if typ == "number":
            return float(raw)
    except ValueError:
        return None
    if typ == "boolean":
        low = raw.strip().lower()
        return True if low in {"true", "yes", "on", "1"} else False if low else None
    return raw


BACKEND = BackendType(RulesBackendConfig, RulesBackend)
