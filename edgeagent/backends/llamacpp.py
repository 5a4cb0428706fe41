"""The ``llamacpp`` backend: a small quantized GGUF model run by llama-cpp-python.

Extraction *fails closed*: the model decodes under a GBNF grammar generated from
the task's JSON Schema (:mod:`edgeagent.grammar`: bounded strings without control
characters, bounded numbers and arrays), and every output is parsed and
re-validated with ``jsonschema`` against the schema with the grammar's caps
written in.  Anything else — truncation at ``max_tokens``, a prompt that does not
fit the context, invalid UTF-8/JSON, a schema violation, a decode error — is
``Prediction(None, 0.0, reason="schema_invalid", details={"failure": ...})`` and
goes to the cloud.  An invalid object is never returned.

``details["failure"]`` says why: ``input_too_long`` (prompt tokens > ``n_ctx -
max_tokens``; with ``prompt_tokens`` and ``limit``), ``length`` (hit ``max_tokens``),
``json``, ``schema`` (with ``message`` and ``path``), ``number_too_long`` (a number with
more digits than ``max_integer_digits``/``max_fraction_digits``: the input holds a value
the grammar cannot represent), ``control_chars``, ``label``, ``dead_end`` (the grammar
allowed no token) or ``decode_error``.  ``details["fields"]`` lists the JSON paths of the
values that failed, when known.  The same reason and failures apply to classify; a
generate task only fails with ``input_too_long`` or ``decode_error``.

Bounds: the grammar lets strings and numbers run one character/digit past their caps
(:data:`edgeagent.grammar.SLACK`); a value that uses it was about to be cut and fails
(``schema``: ``maxLength``, ``maximum``; ``number_too_long``).  A 40-digit number in the
input is therefore escalated, never answered as its first 15 digits.

Grounding (``grounded = true``, the default; :mod:`edgeagent.grounding`): a string or
number value that does not occur in the input makes the answer ``low_confidence`` with
confidence 0 (``details["failure"] = "ungrounded"``, ``fields``, ``raw_confidence``).
Inputs without a letter or digit (:func:`edgeagent.inputs.has_content`) are refused
``out_of_scope`` (``failure = "no_content"``) before the model runs.

Classification decodes under a grammar that admits exactly one label; its
confidence is the probability of the whole label, exp(sum of its token log-probs).
Generation is bounded by ``max_tokens`` and always ``reason="open_ended"``
(``details["truncated"]`` when it hit the cap).

Sampling: the grammar is checked against the ``grammar_candidates`` most likely
tokens first and the whole vocabulary only when none of them fits.  Greedy
decoding (temperature 0, the default) gives exactly the token a full-vocabulary
grammar sampler would; at temperature > 0 this is top-k sampling among the
grammar-valid candidates.

Confidence comes from the model's *unconstrained* next-token distribution (the
raw logits, before the grammar masks them): for each generated token we take
log softmax(logits)[token].  Tokens the grammar forced (braces, keys, quotes) are
left out; the value tokens are aggregated as configured (``min`` by default).  A
value the model only produced because the grammar left it no other choice thus
scores low, which is what the router needs.

Features: every extract/classify answer carries ``details["features"]``
(:func:`edgeagent.backends.calibration.answer_features`): the raw confidence, the least
and mean value-token log-probability (also per kind of value: copied from the input or
an enum label), the least margin between the chosen token and the unconstrained
runner-up, the share of enum labels the input writes, and the input's size and count
of numbers.

Calibration: with ``calibration = FILE`` (written by ``edgeagent calibrate``, see
:mod:`edgeagent.backends.calibration`), extract and classify answers report the
calibrated confidence — a logistic regression on named features, or
``sigmoid(a * logit(raw) + b)`` for the older Platt files — and the raw one in
``details["raw_confidence"]``; answers below the file's threshold get
``reason="low_confidence"`` (unless ``use_calibration_threshold = false``).  The file
records the model's sha256 and the :attr:`LlamaCppBackend.prompt_fingerprint` it was
fitted for; :meth:`LlamaCppBackend.load` refuses a file that does not match (the raw
confidences it was fitted on would no longer be the ones the model gives).  The
file's sha256 is part of :attr:`LlamaCppBackend.fingerprint`.

Threads: ``load``/``warmup``/``close`` and ``infer_batch`` run on worker threads;
the llama context is not thread-safe, so every use of it holds ``self._lock``
(one inference at a time per model).  ``llama_cpp`` and ``numpy`` are imported in
:meth:`LlamaCppBackend.load` only.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import json
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import jsonschema
import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgeagent.backends.base import (
    BackendConfig,
    BackendError,
    BackendType,
    JSONValue,
    Prediction,
)
from edgeagent.backends.calibration import (
    FEATURES,
    FEATURES_VERSION,
    Calibration,
    CalibrationError,
    FeatureCalibration,
    ValueTokens,
    answer_features,
    read_calibration,
)
from edgeagent.catalog import PULL_PREFIX, pulled_path
from edgeagent.grammar import (
    GrammarError,
    GrammarLimits,
    bounded_schema,
    choice_grammar,
    control_chars_in,
    overlong_numbers,
    schema_to_gbnf,
    value_spans,
)
from edgeagent.grounding import GROUNDED_KEY, Leaf, leaves, numbers_in
from edgeagent.inputs import NO_CONTENT, has_content

if TYPE_CHECKING:
    from edgeagent.config import TaskConfig

__all__ = ["LlamaCppBackend"]

log = structlog.get_logger(__name__)

_PROMPT_VERSION = "1"  # bump when prompt layout changes (part of the fingerprint)
_LOW_CONFIDENCE = "low_confidence"
# Settings that do not change the raw confidence: left out of the prompt fingerprint.
_NOT_PROMPT = {"n_threads", "model", "calibration", "use_calibration_threshold"}
_GGUF_MAGIC = b"GGUF"
_COMPLETION_STOP = "\n\nInput:"

Segment = tuple[str, bool]
"""Prompt text and whether it is template markup (tokenized with special tokens)."""


@dataclass(slots=True)
class _Run:
    """One decode: generated tokens with their unconstrained log-probabilities."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    alt_logprobs: list[float] = field(default_factory=list)  # the best *other* token's
    finish: str = "length"  # "stop" (end of generation), "length", "dead_end", "stop_string"
    text: bytes = b""
    prompt_tokens: int = 0
    reused_tokens: int = 0
    prompt_s: float = 0.0
    gen_s: float = 0.0


def _prompt_settings(cfg: LlamaCppBackendConfig) -> dict[str, Any]:
    """The backend settings a raw confidence depends on.  ``kv_cache_type = "f16"`` is left
    out, so calibration files fitted before that setting existed still match it."""
    exclude = _NOT_PROMPT | ({"kv_cache_type"} if cfg.kv_cache_type == "f16" else set())
    return cfg.model_dump(mode="json", exclude=exclude)


def kv_cache_params(lc: Any, kind: str) -> dict[str, Any]:
    """``Llama(...)`` keyword arguments for the KV cache's precision: llama.cpp quantizes
    the V cache only with flash attention, so ``q8_0`` turns it on; ``f16`` is llama.cpp's
    own default (no flash attention), exactly as before the setting existed."""
    if kind == "f16":
        return {}
    ggml_type = getattr(lc, f"GGML_TYPE_{kind.upper()}")
    return {"flash_attn": True, "type_k": ggml_type, "type_v": ggml_type}


def _fail(failure: str, **details: JSONValue) -> Prediction:
    return Prediction(None, 0.0, reason="schema_invalid", details={"failure": failure, **details})


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-finite number {name}")


def _as_text(value: JSONValue) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


class LlamaCppBackend:
    """A GGUF model answering one task (see the module docstring)."""

    def __init__(self, task_name: str, task: TaskConfig) -> None:
        if not isinstance(task.backend, LlamaCppBackendConfig):
            raise BackendError(f"task {task_name!r}: LlamaCppBackend needs a llamacpp config")
        self._name = task_name
        self._task = task
        self._cfg: LlamaCppBackendConfig = task.backend
        self._lock = threading.Lock()
        self._grammar: str | None = None
        self._limits = GrammarLimits()
        self._validator: jsonschema.protocols.Validator | None = None
        cfg = self._cfg
        if task.kind == "extract":
            if not task.output_schema:
                raise BackendError(f"task {task_name!r}: an extract task needs a `schema`")
            limits = GrammarLimits(
                max_string_length=cfg.max_string_length,
                max_array_items=cfg.max_array_items,
                max_integer_digits=cfg.max_integer_digits,
                max_fraction_digits=cfg.max_fraction_digits,
            )
            self._limits = limits
            try:
                jsonschema.Draft202012Validator.check_schema(task.output_schema)
                self._grammar = schema_to_gbnf(task.output_schema, limits)
            except (GrammarError, jsonschema.SchemaError) as exc:
                raise BackendError(f"task {task_name!r}: schema: {exc}") from exc
            self._validator = jsonschema.Draft202012Validator(
                bounded_schema(task.output_schema, limits),
                format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
            )
        elif task.kind == "classify":
            if not task.labels:
                raise BackendError(f"task {task_name!r}: a classify task needs `labels`")
            self._grammar = choice_grammar(task.labels)
        self._llm: Any = None
        self._np: Any = None
        self._lc: Any = None
        self._sampler: Any = None
        self._small: Any = None
        self._full: Any = None
        self._eog: list[int] = []
        self._rng: Any = None
        self._format = cfg.prompt_format
        self._prefix: list[int] = []
        self._sha: str | None = None
        self._prompt_fingerprint: str | None = None
        self._fingerprint: str | None = None
        self._calibration: Calibration | None = None
        self._calibration_sha: str | None = None
        # Set by the learner (learn.few_shot): an object whose ``select(text)`` returns the
        # learned (input, output) pairs to show before this job, e.g.
        # :class:`edgeagent.learning.fewshot.NearestAnswers`.
        self.few_shot: Any = None

    # -- identity -------------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        return f"{self._cfg.model.stem}@{self._model_sha()[:6]}"

    @property
    def model_sha256(self) -> str:
        """sha256 of the GGUF file (hashed once; raises BackendError if unreadable)."""
        return self._model_sha()

    @property
    def prompt_fingerprint(self) -> str:
        """Digest of everything the raw confidence depends on: model weights, prompt,
        schema/grammar, decoding and aggregation settings, the KV cache's precision (not
        the calibration)."""
        if self._prompt_fingerprint is None:
            self._prompt_fingerprint = self._prompt_digest(self._cfg)
        return self._prompt_fingerprint

    def _prompt_digest(self, cfg: LlamaCppBackendConfig) -> str:
        payload = {
            "model_sha256": self._model_sha(),
            "prompt_version": _PROMPT_VERSION,
            "task": self._task.model_dump(
                mode="json", include={"kind", "description", "labels", "output_schema"}
            ),
            "backend": _prompt_settings(cfg),
            "grammar": self._grammar,
        }
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    @property
    def fingerprint(self) -> str:
        """:attr:`prompt_fingerprint`, combined with the calibration file's sha256 when
        one is configured (so re-calibrating changes every cache key)."""
        if self._fingerprint is None:
            path = self._cfg.calibration
            if path is None:
                self._fingerprint = self.prompt_fingerprint
            else:
                payload = {
                    "prompt": self.prompt_fingerprint,
                    "calibration_sha256": self._calibration_file_sha(path),
                    "use_threshold": self._cfg.use_calibration_threshold,
                }
                blob = json.dumps(payload, sort_keys=True).encode()
                self._fingerprint = hashlib.sha256(blob).hexdigest()
        return self._fingerprint

    @property
    def calibration(self) -> Calibration | None:
        """The calibration applied to confidences (None before load or when unset)."""
        return self._calibration

    def _calibration_file_sha(self, path: Path) -> str:
        if self._calibration_sha is None:  # not loaded yet: hash the file as it is now
            try:
                self._calibration_sha = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError as exc:
                raise BackendError(
                    f"task {self._name!r}: cannot read calibration file {path}: {exc.strerror}"
                ) from exc
        return self._calibration_sha

    def _model_sha(self) -> str:
        if self._sha is None:
            self._sha = _sha256_file(self._cfg.model, self._name)
        return self._sha

    def _read_calibration(self) -> None:
        """Read and check the configured calibration file.  Raises BackendError."""
        path = self._cfg.calibration
        if path is None:
            return
        where = f"task {self._name!r}: calibration"
        if self._task.kind == "generate":
            raise BackendError(f"{where}: generate tasks are not calibrated")
        try:
            cal, sha = read_calibration(path)
        except CalibrationError as exc:
            raise BackendError(f"{where}: {exc}") from exc
        redo = f"re-run `edgeagent calibrate {self._name}` (or remove `calibration`)"
        if cal.model_sha256 != self._model_sha():
            raise BackendError(
                f"{where} {path} was fitted for another model file (sha256 "
                f"{cal.model_sha256[:12]}, this one is {self._model_sha()[:12]}): stale; {redo}"
            )
        if cal.prompt_fingerprint != self.prompt_fingerprint and not self._older_kv_cache(
            cal.prompt_fingerprint, where, path, redo
        ):
            raise BackendError(
                f"{where} {path} was fitted for another prompt, schema or decoding setting "
                f"(prompt fingerprint {cal.prompt_fingerprint[:12]}, now "
                f"{self.prompt_fingerprint[:12]}): stale; {redo}"
            )
        if isinstance(cal, FeatureCalibration):
            unknown = sorted(set(cal.features) - set(FEATURES))
            if cal.features_version != FEATURES_VERSION or unknown:
                raise BackendError(
                    f"{where} {path} was fitted on answer features this edgeagent computes "
                    f"differently (features_version {cal.features_version}, now "
                    f"{FEATURES_VERSION}; unknown: {', '.join(unknown) or 'none'}): {redo}"
                )
        if self._calibration_sha != sha:
            self._fingerprint = None  # the file changed since the fingerprint was taken
        self._calibration, self._calibration_sha = cal, sha

    def _older_kv_cache(self, fitted: str, where: str, path: Path, redo: str) -> bool:
        """Whether a calibration file whose fingerprint ``fitted`` does not match was fitted
        with the 16-bit KV cache (every file written before `kv_cache_type` existed) and
        the task now uses that cache.  Left at its default, the setting follows the file:
        the task keeps the 16-bit cache, with a warning, so an upgrade does not stop a
        working task.  Set explicitly to another type, the file is refused with the way out."""
        cfg = self._cfg
        if cfg.kv_cache_type == "f16":
            return False
        f16 = cfg.model_copy(update={"kv_cache_type": "f16"})
        if fitted != self._prompt_digest(f16):
            return False
        if "kv_cache_type" in cfg.model_fields_set:
            raise BackendError(
                f'{where} {path} was fitted with the 16-bit KV cache (`kv_cache_type = "f16"`, '
                f"the only one before that setting existed; now {cfg.kv_cache_type!r}): set "
                f'`kv_cache_type = "f16"` in the task\'s backend, or {redo}'
            )
        log.warning(
            "llamacpp.kv_cache_from_calibration",
            task=self._name,
            calibration=str(path),
            kv_cache_type="f16",
            hint=f"the file was fitted with the 16-bit KV cache, so the task keeps it; {redo} "
            'for the 8-bit one (half the memory), or set kv_cache_type = "f16" to silence this',
        )
        self._cfg = f16
        self._prompt_fingerprint = self._fingerprint = None
        return True

    # -- lifecycle ------------------------------------------------------------------------

    def load(self) -> None:
        """Open the GGUF, build the context and the grammar sampler.  Raises BackendError."""
        cfg = self._cfg
        path = cfg.model
        _check_gguf(path, self._name)
        self._model_sha()  # hash now (~0.3 s per 100 MB) so identity errors surface at load
        self._read_calibration()  # before the model: a stale file fails fast
        cfg = self._cfg  # the calibration may have chosen the KV cache
        try:
            lc = importlib.import_module("llama_cpp")
            np = importlib.import_module("numpy")
        except ImportError as exc:
            raise BackendError(
                f"task {self._name!r}: llama-cpp-python is not installed "
                f"(pip install 'edgeagent[llamacpp]'): {exc}"
            ) from exc
        t0 = time.perf_counter()
        try:
            llm = lc.Llama(
                model_path=str(path),
                n_ctx=cfg.n_ctx,
                n_batch=cfg.n_batch,
                n_ubatch=cfg.n_batch,
                n_threads=cfg.n_threads,
                n_threads_batch=cfg.n_threads,
                **kv_cache_params(lc, cfg.kv_cache_type),
                seed=cfg.seed,
                logits_all=False,
                verbose=False,
            )
        except Exception as exc:  # llama_cpp raises ValueError/RuntimeError for bad files
            raise BackendError(
                f"task {self._name!r}: cannot load model {path}: {exc} "
                "(corrupt or truncated GGUF, or an architecture this llama.cpp does not know; "
                "re-run `edgeagent models pull`)"
            ) from exc
        with self._lock:
            self._close_locked()
            self._llm, self._np, self._lc = llm, np, lc
            try:
                self._setup_locked()
            except BaseException:
                self._close_locked()
                raise
        log.info(
            "llamacpp.loaded",
            task=self._name,
            model=str(path),
            n_ctx=cfg.n_ctx,
            kv_cache_type=cfg.kv_cache_type,
            prompt_format=self._format,
            prefix_tokens=len(self._prefix),
            load_s=round(time.perf_counter() - t0, 3),
        )

    def _setup_locked(self) -> None:
        lc, np, llm, cfg = self._lc, self._np, self._llm, self._cfg
        vocab = llm._model.vocab  # no public accessor in llama-cpp-python
        if self._format == "auto":
            template = str(llm.metadata.get("tokenizer.chat_template", ""))
            self._format = "chatml" if "<|im_start|>" in template else "completion"
        if self._grammar is not None:
            sampler = lc.llama_sampler_init_grammar(vocab, self._grammar.encode(), b"root")
            if not sampler:
                raise BackendError(f"task {self._name!r}: llama.cpp rejected the generated grammar")
            self._sampler = sampler
        self._eog = sorted(
            {t for t in (lc.llama_vocab_eos(vocab), lc.llama_vocab_eot(vocab)) if t >= 0}
        )
        n_vocab = llm.n_vocab()
        k = min(cfg.grammar_candidates, n_vocab)
        self._small = _TokenArray(lc, np, k + len(self._eog)) if k else None
        self._full = _TokenArray(lc, np, n_vocab)
        self._full.view["id"] = np.arange(n_vocab, dtype=np.int32)
        self._rng = np.random.default_rng(cfg.seed)
        self._prefix = self._tokenize(self._prefix_segments(), bos=True)

    def warmup(self) -> None:
        """One throwaway inference; also leaves the shared prompt prefix in the KV cache."""
        t0 = time.perf_counter()
        pred = self.infer_batch(["warm-up"])[0]
        log.info(
            "llamacpp.warmup",
            task=self._name,
            s=round(time.perf_counter() - t0, 3),
            reason=pred.reason,
        )

    def close(self) -> None:
        """Release the model, the context and the grammar sampler.  Idempotent."""
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._sampler is not None and self._lc is not None:
            self._lc.llama_sampler_free(self._sampler)
        self._sampler = None
        if self._llm is not None:
            self._llm.close()
        self._llm = None
        self._small = self._full = None

    # -- inference ------------------------------------------------------------------------

    def infer_batch(self, inputs: list[JSONValue]) -> list[Prediction]:
        """Answer each input in turn (the model decodes one sequence at a time)."""
        if self._llm is None:
            raise BackendError(f"task {self._name!r}: infer_batch before load")
        return [self.infer(_as_text(x)) for x in inputs]

    def infer(self, text: str) -> Prediction:
        """Answer one input text."""
        cfg = self._cfg
        if self._task.kind != "generate" and not has_content(text):
            return Prediction(None, 0.0, reason="out_of_scope", details={"failure": NO_CONTENT})
        shots = self._shots(text)  # embedding runs outside the model lock
        with self._lock:
            if self._llm is None:
                raise BackendError(f"task {self._name!r}: backend is closed")
            prompt = self._prompt_locked(text, shots)
            budget = cfg.n_ctx - cfg.max_tokens
            if len(prompt) > budget and shots:
                prompt = self._prompt_locked(text, [])  # the job fits without the shots
            if len(prompt) > budget:
                return _fail("input_too_long", prompt_tokens=len(prompt), limit=budget)
            try:
                run = self._decode_locked(prompt, cfg.max_tokens)
            except RuntimeError as exc:  # llama_decode failure
                self._llm.reset()  # the KV cache no longer matches input_ids: start afresh
                log.error("llamacpp.decode_error", task=self._name, error=str(exc))
                return _fail("decode_error", message=str(exc)[:200])
            # Still under the lock: confidence scoring detokenizes with the model.
            if self._task.kind == "extract":
                return self._finish_extract(run, text)
            if self._task.kind == "classify":
                return self._finish_classify(run)
            return self._finish_generate(run)

    def _finish_extract(self, run: _Run, text: str) -> Prediction:
        stats = _stats(run)
        if run.finish != "stop":
            return _fail(run.finish, **stats)
        try:
            obj = json.loads(run.text.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as exc:
            return _fail("json", message=str(exc)[:200], **stats)
        if not isinstance(obj, dict):
            return _fail("json", message="not an object", **stats)
        long_numbers = overlong_numbers(run.text, self._limits)
        if long_numbers:
            return _fail(
                "number_too_long",
                message=f"more digits than the grammar can represent: {long_numbers[0][:40]}",
                fields=_paths_of_numbers(obj, long_numbers),
                **stats,
            )
        assert self._validator is not None  # set for every extract task in __init__
        error = jsonschema.exceptions.best_match(self._validator.iter_errors(obj))
        if error is not None:
            return _fail(
                "schema",
                message=error.message[:200],
                path=error.json_path,
                fields=[error.json_path],
                **stats,
            )
        bad = control_chars_in(obj)
        if bad:
            return _fail("control_chars", paths=bad[:8], fields=bad[:8], **stats)
        ends = _token_ends(run, self._llm)
        raw = self._confidence(run, ends)
        assert self._task.output_schema is not None  # checked in __init__
        found = leaves(obj, self._task.output_schema, text, default=self._cfg.grounded)
        missing = [leaf.path for leaf in found if not leaf.grounded]
        if missing:
            details = {"failure": "ungrounded", "fields": missing[:8], "raw_confidence": raw}
            return Prediction(None, 0.0, reason=_LOW_CONFIDENCE, details={**stats, **details})
        values = _value_tokens(run, ends, found, text)
        features = answer_features(raw, values, text, len(numbers_in(text)))
        return self._answer(obj, features, stats)

    def _finish_classify(self, run: _Run) -> Prediction:
        stats = _stats(run)
        if run.finish != "stop":
            return _fail(run.finish, **stats)
        label = run.text.decode("utf-8", errors="replace").strip()
        if label not in self._task.labels:
            return _fail("label", message=f"not a label: {label[:64]!r}", **stats)
        # The probability the model gives this label string: product over its tokens.
        conf = _clamp(math.exp(sum(run.logprobs))) if run.logprobs else 0.0
        margins = tuple(a - b for a, b in zip(run.logprobs, run.alt_logprobs, strict=True))
        values = [ValueTokens(False, tuple(run.logprobs), margins, in_input=True)]
        return self._answer({"label": label}, answer_features(conf, values, "", 0), stats)

    def _answer(
        self, output: dict[str, JSONValue], features: dict[str, float], stats: dict[str, JSONValue]
    ) -> Prediction:
        """A valid answer with its (calibrated, when configured) confidence;
        ``details["features"]`` holds what ``edgeagent calibrate`` fits on."""
        raw = features["raw"]
        shown: dict[str, JSONValue] = dict(features)  # not rounded: calibrate fits on these
        cal = self._calibration
        if cal is None:
            return Prediction(output, raw, details={**stats, "features": shown})
        conf = cal.apply_features(features)
        reason = None
        if self._cfg.use_calibration_threshold and cal.threshold is not None:
            reason = _LOW_CONFIDENCE if conf < cal.threshold else None
        details = {**stats, "raw_confidence": raw, "features": shown}
        return Prediction(output, conf, reason=reason, details=details)

    def _finish_generate(self, run: _Run) -> Prediction:
        stats = _stats(run)
        text = run.text.decode("utf-8", errors="replace").strip()
        conf = math.exp(sum(run.logprobs) / len(run.logprobs)) if run.logprobs else 0.0
        details = {**stats, "truncated": run.finish == "length"}
        return Prediction({"text": text}, _clamp(conf), reason="open_ended", details=details)

    def _confidence(self, run: _Run, ends: list[int]) -> float:
        """Aggregate the log-probs of the tokens that overlap a JSON value (see module doc)."""
        lps = _value_logprobs(run, ends)
        if not lps:
            return 0.0
        how = self._cfg.confidence
        if how == "min":
            return _clamp(math.exp(min(lps)))
        if how == "mean":
            return _clamp(math.exp(sum(lps) / len(lps)))
        return _clamp(math.exp(sum(lps)))

    # -- decoding (caller holds self._lock) -----------------------------------------------

    def _decode_locked(self, prompt: list[int], max_tokens: int) -> _Run:
        llm, lc, np = self._llm, self._lc, self._np
        run = _Run(prompt_tokens=len(prompt))
        t0 = time.perf_counter()
        # Re-use the KV cache for the prefix this prompt shares with the previous one
        # (instruction + few-shot examples): only the input is decoded again.
        keep = _common_prefix(llm.input_ids[: llm.n_tokens], prompt)
        keep = min(keep, len(prompt) - 1)
        if keep > 0 and not llm._ctx.kv_cache_seq_rm(-1, keep, -1):
            keep = 0
        if keep == 0:
            llm.reset()
        llm.n_tokens = keep
        llm.eval(prompt[keep:])
        run.reused_tokens = keep
        t1 = time.perf_counter()
        run.prompt_s = t1 - t0
        if self._sampler is not None:
            lc.llama_sampler_reset(self._sampler)
        n_vocab = llm.n_vocab()
        ctx = llm._ctx.ctx
        stops = [s.encode() for s in self._stop_strings()]
        for step in range(max_tokens + 1):
            logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
            token = self._choose(logits)
            if token is None:
                run.finish = "dead_end"
                break
            if token in self._eog:
                run.finish = "stop"
                break
            if step == max_tokens:
                run.finish = "length"
                break
            peak = float(logits.max())
            lse = peak + math.log(float(np.exp(logits - peak).sum()))
            run.tokens.append(token)
            run.logprobs.append(float(logits[token]) - lse)
            top2 = np.partition(logits, -2)[-2:]  # O(vocab), ~0.1 ms: the runner-up
            other = float(top2[1]) if float(logits[token]) < float(top2[1]) else float(top2[0])
            run.alt_logprobs.append(other - lse)
            if self._sampler is not None:
                lc.llama_sampler_accept(self._sampler, token)
            if stops and self._hit_stop(run, stops):
                run.finish = "stop_string"
                break
            llm.eval([token])
        if not run.text:
            run.text = llm.detokenize(run.tokens)
        run.gen_s = time.perf_counter() - t1
        return run

    def _hit_stop(self, run: _Run, stops: list[bytes]) -> bool:
        text = self._llm.detokenize(run.tokens)
        for stop in stops:
            cut = text.find(stop)
            if cut >= 0:
                run.text = text[:cut]
                return True
        return False

    def _choose(self, logits: Any) -> int | None:
        """Next token: greedy or sampled at the configured temperature, among the tokens
        the grammar allows.  The grammar is first checked on the top candidates only
        (plus end-of-generation); the whole vocabulary only when none of them fits."""
        np = self._np
        if self._sampler is None:
            return self._pick(np.arange(logits.shape[0]), logits)
        small = self._small
        if small is not None:
            k = small.size - len(self._eog)
            top = np.argpartition(logits, -k)[-k:] if k < logits.shape[0] else np.arange(k)
            ids = np.concatenate([top.astype(np.int32), np.asarray(self._eog, dtype=np.int32)])
            allowed = small.apply(self._lc, self._sampler, ids, logits[ids])
            if allowed.size:
                return self._pick(allowed, logits[allowed])
        full = self._full
        allowed = full.apply(self._lc, self._sampler, None, logits)
        if allowed.size:
            return self._pick(allowed, logits[allowed])
        return None

    def _pick(self, ids: Any, logits: Any) -> int:
        np = self._np
        temp = self._cfg.temperature
        if temp <= 0.0 or ids.size == 1:
            return int(ids[int(np.argmax(logits))])
        z = (logits - logits.max()) / temp
        p = np.exp(z)
        p /= p.sum()
        return int(ids[int(self._rng.choice(ids.size, p=p))])

    # -- prompts --------------------------------------------------------------------------

    def _tokenize(self, segments: Sequence[Segment], bos: bool) -> list[int]:
        out: list[int] = []
        for i, (text, markup) in enumerate(segments):
            if text:
                # User text never becomes special tokens: "<|im_end|>" in an input stays text.
                # errors="replace": a JSON input may carry lone surrogates ("\ud800").
                raw = text.encode("utf-8", errors="replace")
                out += self._llm.tokenize(raw, add_bos=bos and i == 0, special=markup)
        return out

    def _instruction(self) -> str:
        task = self._task
        if self._cfg.instruction:
            return self._cfg.instruction
        lead = f"{task.description.strip()}\n" if task.description.strip() else ""
        if task.kind == "extract":
            shown = _without_key(task.output_schema, GROUNDED_KEY)
            schema = json.dumps(shown, ensure_ascii=False, separators=(",", ":"))
            return (
                f"{lead}Extract the information from the text as one JSON object matching this "
                f"JSON Schema: {schema}\nUse only what the text states. Reply with the JSON only."
            )
        if task.kind == "classify":
            return (
                f"{lead}Classify the text into exactly one of these labels: "
                f"{', '.join(task.labels)}.\nReply with the label only."
            )
        return lead.strip() or "Answer the request briefly."

    def _render(self, output: dict[str, Any] | str) -> str:
        kind = self._task.kind
        if isinstance(output, str):
            return output
        if kind == "classify" and "label" in output:
            return str(output["label"])
        if kind == "generate" and "text" in output:
            return str(output["text"])
        return json.dumps(output, ensure_ascii=False)

    def _prefix_segments(self) -> list[Segment]:
        """Instruction and few-shot examples: identical for every input (KV-cache reuse)."""
        ins = self._instruction()
        fmt = self._format
        segs: list[Segment] = []
        if fmt == "chatml":
            segs.append(("<|im_start|>system\n", True))
            segs.append((ins, False))
            segs.append(("<|im_end|>\n", True))
        elif fmt == "gemma":
            segs += [("<start_of_turn>user\n", True), (ins, False)]
            segs += [("<end_of_turn>\n<start_of_turn>model\nOK.<end_of_turn>\n", True)]
        else:
            segs.append((ins + "\n\n", False))
        for ex in self._cfg.examples:
            segs += self._example_segments(ex.input, ex.output)
        return segs

    def _example_segments(self, text: str, output: dict[str, Any] | str) -> list[Segment]:
        """One worked example (an input and its answer) in the prompt format."""
        fmt, answer = self._format, self._render(output)
        if fmt == "chatml":
            return [*self._input_segments(text), (answer, False), ("<|im_end|>\n", True)]
        if fmt == "gemma":
            return [*self._input_segments(text), (answer, False), ("<end_of_turn>\n", True)]
        # One segment, as the fixed examples were always tokenized (same prefix tokens).
        return [(f"Input: {text}\nOutput: {answer}\n\n", False)]

    def _shots(self, text: str) -> list[tuple[str, Any]]:
        """Learned examples chosen for this job (``few_shot``); none on any failure."""
        selector = self.few_shot
        if selector is None or self._task.kind == "generate":
            return []
        try:
            return [(t, o) for t, o in selector.select(text) if isinstance(o, (dict, str))]
        except Exception as exc:  # a broken selector must not cost the job its answer
            log.warning("llamacpp.few_shot_failed", task=self._name, error=str(exc)[:200])
            return []

    def _prompt_locked(self, text: str, shots: list[tuple[str, Any]]) -> list[int]:
        """Prefix (cached tokens) + the job's few-shot examples + the job."""
        segs: list[Segment] = []
        for t, o in shots:
            segs += self._example_segments(t, o)
        segs += self._input_segments(text)
        return self._prefix + self._tokenize(segs, bos=not self._prefix)

    def _input_segments(self, text: str) -> list[Segment]:
        fmt = self._format
        if fmt == "chatml":
            return [
                ("<|im_start|>user\n", True),
                (text, False),
                ("<|im_end|>\n<|im_start|>assistant\n", True),
            ]
        if fmt == "gemma":
            return [
                ("<start_of_turn>user\n", True),
                (text, False),
                ("<end_of_turn>\n<start_of_turn>model\n", True),
            ]
        return [("Input: ", False), (text, False), ("\nOutput:", False)]

    def _stop_strings(self) -> list[str]:
        if self._task.kind != "generate":
            return []  # the grammar ends extract/classify outputs
        stops = list(self._cfg.stop)
        if self._format == "completion":
            stops.append(_COMPLETION_STOP)
        return stops

    # -- benchmark hooks ------------------------------------------------------------------

    @property
    def llama(self) -> Any:
        """The underlying ``llama_cpp.Llama`` (benchmarks only; hold no reference)."""
        return self._llm

    @property
    def grammar(self) -> str | None:
        """The GBNF grammar outputs are decoded under (None for generate tasks)."""
        return self._grammar

    def prompt_tokens(self, text: str) -> list[int]:
        """The exact prompt tokens :meth:`infer` decodes for ``text``."""
        shots = self._shots(text)
        with self._lock:
            return self._prompt_locked(text, shots)


class _TokenArray:
    """A preallocated ``llama_token_data_array`` with a numpy view of its entries, so
    the grammar sampler can mask a candidate set without per-token Python work."""

    def __init__(self, lc: Any, np: Any, size: int) -> None:
        self.size = size
        self.buf = (lc.llama_token_data * size)()
        self.view = np.ctypeslib.as_array(self.buf)
        self.arr = lc.llama_token_data_array(
            data=ctypes.cast(self.buf, lc.llama_token_data_p), size=size, selected=-1, sorted=False
        )
        self._np = np

    def apply(self, lc: Any, sampler: Any, ids: Any, logits: Any) -> Any:
        """Run the grammar over (ids, logits); return the ids it allows."""
        n = self.size if ids is None else ids.shape[0]
        view = self.view[:n]
        if ids is not None:
            view["id"] = ids
        view["logit"] = logits
        self.arr.data = ctypes.cast(self.buf, lc.llama_token_data_p)
        self.arr.size = n
        self.arr.selected = -1
        self.arr.sorted = False
        lc.llama_sampler_apply(sampler, ctypes.byref(self.arr))
        np = self._np
        ok = np.isfinite(view["logit"])
        return view["id"][ok].astype(np.int64)


def _token_ends(run: _Run, llm: Any) -> list[int]:
    """Byte offset in ``run.text`` where each generated token ends."""
    return [len(llm.detokenize(run.tokens[: i + 1])) for i in range(len(run.tokens))]


def _value_tokens(run: _Run, ends: list[int], found: list[Leaf], text: str) -> list[ValueTokens]:
    """Per answer value (document order: the n-th leaf is the n-th value span), the
    log-probabilities and margins of the tokens overlapping it."""
    spans = value_spans(run.text)
    out: list[ValueTokens] = []
    for n, (a, b) in enumerate(spans):
        lps: list[float] = []
        margins: list[float] = []
        start = 0
        for end, lp, alt in zip(ends, run.logprobs, run.alt_logprobs, strict=True):
            if a < end and start < b:
                lps.append(lp)
                margins.append(lp - alt)
            start = end
        leaf = found[n] if n < len(found) else None
        copied = leaf is not None and leaf.copied
        in_input = True
        if leaf is not None and not copied and isinstance(leaf.value, str):
            in_input = leaf.value in text
        out.append(ValueTokens(copied, tuple(lps), tuple(margins), in_input))
    return out


def _value_logprobs(run: _Run, ends: list[int]) -> list[float]:
    """Log-probs of the tokens whose bytes overlap a JSON value (not keys or syntax)."""
    spans = value_spans(run.text)
    out: list[float] = []
    start = 0
    for end, lp in zip(ends, run.logprobs, strict=True):
        if any(a < end and start < b for a, b in spans):
            out.append(lp)
        start = end
    return out


def _paths_of_numbers(obj: JSONValue, literals: list[str]) -> list[str]:
    """JSON paths of the numbers in ``obj`` equal to one of the number ``literals``."""
    wanted = {float(x) for x in literals}
    found: list[str] = []

    def walk(v: JSONValue, path: str) -> None:
        if isinstance(v, dict):
            for k, sub in v.items():
                walk(sub, f"{path}.{k}")
        elif isinstance(v, list):
            for i, sub in enumerate(v):
                walk(sub, f"{path}[{i}]")
        elif isinstance(v, int | float) and not isinstance(v, bool) and float(v) in wanted:
            found.append(path)

    walk(obj, "$")
    return found[:8]


def _without_key(schema: JSONValue, key: str) -> JSONValue:
    """``schema`` with every ``key`` removed (the prompt shows no edgeagent-only keywords)."""
    if isinstance(schema, dict):
        return {k: _without_key(v, key) for k, v in schema.items() if k != key}
    if isinstance(schema, list):
        return [_without_key(v, key) for v in schema]
    return schema


def _stats(run: _Run) -> dict[str, JSONValue]:
    return {
        "prompt_tokens": run.prompt_tokens,
        "reused_tokens": run.reused_tokens,
        "generated_tokens": len(run.tokens),
        "prompt_ms": round(run.prompt_s * 1000, 1),
        "generate_ms": round(run.gen_s * 1000, 1),
    }


def _clamp(x: float) -> float:
    return min(1.0, max(0.0, x))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _check_gguf(path: Path, task: str) -> None:
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise BackendError(
            f"task {task!r}: model file {path} does not exist "
            '(fetch one with `edgeagent models pull smollm2`; `model = "pull:smollm2"` names '
            "the file it writes)"
        ) from None
    except OSError as exc:
        raise BackendError(f"task {task!r}: cannot read model file {path}: {exc}") from exc
    if magic != _GGUF_MAGIC:
        raise BackendError(
            f"task {task!r}: model file {path} is not a GGUF file (starts with {magic!r})"
        )


def _sha256_file(path: Path, task: str) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    except OSError as exc:
        raise BackendError(f"task {task!r}: cannot read model file {path}: {exc}") from exc
    return digest.hexdigest()


# -- config and registration (edgeagent.backends) -------------------------------------------


class FewShotExample(BaseModel):
    """One worked example shown to the model before the real input."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str = Field(description="Example input text.")
    output: dict[str, Any] | str = Field(
        description="Expected answer: the extracted object (extract), the label or "
        '`{"label": ...}` (classify), the text or `{"text": ...}` (generate).'
    )


class LlamaCppBackendConfig(BackendConfig):
    """A GGUF model run by llama-cpp-python (`edgeagent models pull smollm2` fetches one)."""

    type: Literal["llamacpp"] = "llamacpp"
    model: Path = Field(
        description='GGUF file, or `"pull:NAME"` for the file `edgeagent models pull NAME` '
        "writes by default (in `$EDGEAGENT_MODEL_DIR`, else `/var/lib/edgeagent/models`)."
    )
    n_ctx: int = Field(
        2048,
        ge=128,
        le=131072,
        description="Context window (tokens).  Prompts longer than `n_ctx - max_tokens` are "
        "escalated, never cut.",
    )
    n_batch: int = Field(512, ge=8, le=8192, description="Prompt tokens decoded per batch.")
    kv_cache_type: Literal["f16", "q8_0"] = Field(
        "q8_0",
        description="Precision of llama.cpp's KV cache (the attention keys and values of the "
        "context, allocated for all `n_ctx` tokens at load).  `q8_0`: 8-bit, about half the "
        "memory of `f16` (SmolLM2-135M at `n_ctx = 1024`: 12 instead of 24 MiB), with flash "
        "attention, which llama.cpp needs for it.  `f16`: 16-bit, no flash attention (the "
        "only cache before this setting existed).  Left unset, a task whose `calibration` was "
        "fitted with the 16-bit cache keeps it, with a warning; `edgeagent calibrate` again "
        "moves it to the default.",
    )
    n_threads: int = Field(2, ge=1, le=64, description="CPU threads.")
    max_tokens: int = Field(256, ge=1, le=8192, description="Generation cap (tokens).")
    temperature: float = Field(
        0.0, ge=0.0, le=2.0, description="Sampling temperature (0 = greedy, deterministic)."
    )
    seed: int = Field(0, ge=0, description="Sampling seed (used when temperature > 0).")
    prompt_format: Literal["auto", "chatml", "gemma", "completion"] = Field(
        "auto",
        description="How the prompt is laid out: `chatml` (SmolLM2 and other ChatML instruct "
        "models), `gemma` (Gemma instruct turns), `completion` (few-shot text for base models "
        "without a chat template, e.g. Gemma 3 270M).  `auto`: `chatml` when the GGUF chat "
        "template uses `<|im_start|>`, else `completion`.",
    )
    instruction: str | None = Field(
        None,
        description="Instruction placed before the examples.  Default: one written from the task "
        "kind, labels and schema.",
    )
    examples: list[FewShotExample] = Field(
        default_factory=list, description="Few-shot examples, shown in order before the input."
    )
    confidence: Literal["min", "mean", "joint"] = Field(
        "min",
        description="How token probabilities of the generated *value* tokens (not the syntax the "
        "grammar forces) become one confidence: `min` = the least likely token (default: one "
        "doubtful digit or name token sinks the answer), `mean` = exp(mean log-prob), `joint` = "
        "exp(sum log-prob), the probability of the whole answer.  Classify always uses `joint` "
        "over the label tokens.",
    )
    calibration: Path | None = Field(
        None,
        description="Extract/classify: calibration file written by `edgeagent calibrate TASK` "
        "(a logistic regression on features of each answer, or Platt scaling of the raw "
        "confidence in older files; fitted on labelled examples).  Refused at load "
        "when it was fitted for another model file or prompt.  Unset: raw confidence.",
    )
    use_calibration_threshold: bool = Field(
        True,
        description="Mark answers below the threshold stored in `calibration` with reason "
        "`low_confidence` (on top of the task's own `threshold`).",
    )
    max_string_length: int = Field(
        64,
        ge=1,
        le=1024,
        description="Extract: length cap (characters) of schema strings without `maxLength`.",
    )
    max_array_items: int = Field(
        8, ge=0, le=64, description="Extract: item cap of schema arrays without `maxItems`."
    )
    max_integer_digits: int = Field(
        15, ge=1, le=30, description="Extract: digits allowed before the decimal point."
    )
    max_fraction_digits: int = Field(
        6, ge=1, le=30, description="Extract: digits allowed after the decimal point."
    )
    grounded: bool = Field(
        True,
        description="Extract: every string (without `enum`, `const` or `format`) and number "
        "value must occur in the input (strings as written, case included; numbers as "
        "numbers the input writes); an answer with a value that does not is "
        '`low_confidence` (confidence 0, `details.failure = "ungrounded"`), never returned.  '
        'Per schema node: `"x-grounded" = false` (or true) for it and everything below it.',
    )
    grammar_candidates: int = Field(
        64,
        ge=0,
        le=4096,
        description="Check the grammar against only the this-many most likely tokens (plus "
        "end-of-generation), falling back to the whole vocabulary when none fits.  Cuts the "
        "grammar cost on large vocabularies (Gemma: 262k).  0 = always the whole vocabulary.",
    )
    stop: list[str] = Field(
        default_factory=list,
        description="Generate: stop strings (the stop string is not returned).  The `completion` "
        "format always stops at a blank line followed by `Input:`.",
    )

    @field_validator("model", mode="before")
    @classmethod
    def _pulled(cls, value: Any) -> Any:
        """``pull:NAME`` -> the path ``models pull NAME`` writes to (one rule for both)."""
        if isinstance(value, str) and value.startswith(PULL_PREFIX):
            return pulled_path(value[len(PULL_PREFIX) :])
        return value

    @model_validator(mode="after")
    def _check(self) -> LlamaCppBackendConfig:
        if self.max_tokens >= self.n_ctx:
            raise ValueError("max_tokens must be smaller than n_ctx")
        return self

    def check_task(self, task: TaskConfig) -> None:
        if self.calibration and task.kind == "generate":
            raise ValueError("backend.calibration: generate tasks are not calibrated")
        self._check_examples(task)

    def _check_examples(self, task: TaskConfig) -> None:
        """Few-shot examples teach the model the answer's form: one that the task itself
        would refuse (a label not in `labels`, an object the schema rejects) is a typo."""
        for i, ex in enumerate(self.examples):
            where = f"backend.examples[{i}].output"
            out = ex.output
            if task.kind == "classify":
                label = out if isinstance(out, str) else out.get("label")
                if task.labels and label not in task.labels:
                    raise ValueError(f"{where}: {label!r} is not one of `labels`")
            elif task.kind == "extract":
                if not isinstance(out, dict):
                    raise ValueError(f"{where}: an extract example's output must be an object")
                if task.output_schema is not None:
                    errors = list(
                        jsonschema.Draft202012Validator(task.output_schema).iter_errors(out)
                    )
                    if errors:
                        message = errors[0].message
                        raise ValueError(f"{where}: not valid against `schema`: {message}")

    def missing_model_hint(self, task_name: str) -> str | None:
        if self.model.is_file():
            return None
        return (
            f"the GGUF model {self.model} does not exist yet.  Fetch it: edgeagent models pull "
            f"smollm2 --dest {self.model.parent} (and the llamacpp extra: install.sh "
            "--extras llamacpp, with --system for the service)"
        )


BACKEND = BackendType(LlamaCppBackendConfig, LlamaCppBackend)
