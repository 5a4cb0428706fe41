"""The ``onnx`` backend for ``extract`` tasks: an INT8 ONNX token tagger (BIO) plus span decoding.

A tagger bundle (``edgeagent train TASK --examples tagged.jsonl``, kind ``tagger``) holds
``model.onnx`` (a fine-tuned encoder with a token-classification layer; output ``logits``
of shape ``(batch, tokens, tags)``), ``tokenizer.json``, ``labels.json`` (the BIO tags) and
``calibration.json`` (``temperature``, ``threshold``).  Runtime dependencies are
onnxruntime, tokenizers, numpy and jsonschema; never torch.

One job, end to end:

1. :func:`split_words` cuts the text into words (whitespace, with quotes, brackets and
   sentence punctuation peeled off), keeping character offsets;
2. the words are encoded pre-tokenized; each word is scored by the logits of its first
   sub-word token, temperature-scaled into tag probabilities.  Inputs longer than
   ``max_length`` tokens are escalated (``schema_invalid``, ``failure=input_too_long``),
   never cut;
3. :func:`viterbi` picks the most likely *valid* BIO sequence (``I-x`` only after ``B-x``
   or ``I-x``);
4. :func:`spans` groups the tags into spans; a span's value is the original text from its
   first to its last word, its confidence the least probable of its words' tags;
5. :func:`build_object` turns the spans into the task's object: slot name -> value, typed
   by the task's JSON Schema (``string``, ``integer``, ``number``, or an ``array`` of those
   for slots that may repeat).  Slots the schema does not name are ignored (and listed in
   ``details``); a single-valued slot found twice with different values, a number that does
   not parse, or an object the schema rejects is ``schema_invalid``: the job escalates
   instead of returning a guessed value.

Job confidence (config ``tagger_confidence``): ``words`` (default) = the least probable tag
of *every* word, ``O`` included, so a slot the model nearly found also lowers it; ``spans``
= the weakest span (1.0 when there is none); ``frame`` = the product over all words, the
probability of the whole tag sequence.  ``benchmarks/bench_tagger.py`` compares them.
A bundle trained now also carries a :class:`FrameCalibrator` (``calibration.json``'s
``frame_calibrator``): with ``words`` it replaces the job confidence by the probability,
learnt on the calibration split, that the whole frame is right.  A joint bundle decodes
only the slots its predicted intent filled in training (``intent_slots``).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeagent.backends.base import BackendError, JSONValue, Prediction
from edgeagent.backends.onnx import (
    OnnxBackendConfig,
    bundle_fingerprint,
    bundle_manifest,
    loading_model,
)
from edgeagent.inputs import NO_CONTENT, has_content

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from edgeagent.config import TaskConfig

    FloatArray = npt.NDArray[np.float32]

SCHEMA_INVALID = "schema_invalid"
LOW_CONFIDENCE = "low_confidence"
WARMUP_TEXT = "play the song yesterday by the beatles on spotify at 7 pm in paris"

_WORD = re.compile(r"\S+")
_LEAD = "\"'([{«“‘¿¡"
_TRAIL = "\"')]}»”’?!,;"


def split_words(text: str) -> list[tuple[int, int]]:
    """Character ``(start, end)`` of each word: whitespace-separated, with leading quotes and
    brackets and trailing quotes, brackets and ``?!,;`` peeled off as words of their own
    (a final ``.`` or ``:`` too, at the end of the text).  Inner punctuation stays
    (``6:30``, ``o'clock``, ``st.`` mid-sentence), as in the training data."""
    matches = list(_WORD.finditer(text))
    out: list[tuple[int, int]] = []
    for k, m in enumerate(matches):
        start, end = m.span()
        head: list[tuple[int, int]] = []
        while end - start > 1 and text[start] in _LEAD:
            head.append((start, start + 1))
            start += 1
        tail: list[tuple[int, int]] = []
        last = k == len(matches) - 1
        while end - start > 1 and (text[end - 1] in _TRAIL or (last and text[end - 1] in ".:")):
            tail.append((end - 1, end))
            end -= 1
        out.extend(head)
        out.append((start, end))
        out.extend(reversed(tail))
    return out


def slot_of(tag: str) -> str | None:
    """``B-city`` / ``I-city`` -> ``city``; ``O`` -> ``None``."""
    return tag[2:] if tag[:2] in ("B-", "I-") else None


def transition_mask(tags: list[str]) -> npt.NDArray[np.bool_]:
    """``allowed[prev, cur]``: ``I-x`` may only follow ``B-x`` or ``I-x``."""
    import numpy as np

    n = len(tags)
    allowed = np.ones((n, n), dtype=bool)
    for j, cur in enumerate(tags):
        if cur.startswith("I-"):
            for i, prev in enumerate(tags):
                allowed[i, j] = slot_of(prev) == cur[2:]
    return allowed


def start_mask(tags: list[str]) -> npt.NDArray[np.bool_]:
    """Tags a sequence may start with (no ``I-x``)."""
    import numpy as np

    return np.array([not t.startswith("I-") for t in tags], dtype=bool)


def viterbi(
    logp: FloatArray, allowed: npt.NDArray[np.bool_], start: npt.NDArray[np.bool_]
) -> list[int]:
    """The highest-scoring tag sequence (sum of per-word log-probabilities) among those
    that respect the BIO transitions; ``logp`` is ``(words, tags)``."""
    import numpy as np

    n_words = logp.shape[0]
    if n_words == 0:
        return []
    neg = np.float32(-1e9)
    trans = np.where(allowed, np.float32(0.0), neg)
    score = np.where(start, logp[0], neg)
    n_tags = logp.shape[1]
    cols = np.arange(n_tags)
    back = np.zeros((n_words, n_tags), dtype=np.int64)
    for t in range(1, n_words):
        total = score[:, None] + trans  # (prev, cur)
        best = total.argmax(axis=0)
        back[t] = best
        score = total[best, cols] + logp[t]
    path = [int(score.argmax())]
    for t in range(n_words - 1, 0, -1):
        path.append(int(back[t, path[-1]]))
    path.reverse()
    return path


@dataclass(frozen=True, slots=True)
class Span:
    """One extracted value: words ``[first, last]`` tagged as ``slot``."""

    slot: str
    first: int
    last: int
    confidence: float


def spans(tags: list[str], path: list[int], word_p: list[float]) -> list[Span]:
    """Group a decoded tag path into spans (``B-x I-x …``; a stray ``I-x`` opens a span)."""
    out: list[Span] = []
    cur: tuple[str, int, float] | None = None
    for w, t in enumerate(path):
        tag = tags[t]
        slot = slot_of(tag)
        if cur is not None and (slot != cur[0] or tag.startswith("B-")):
            out.append(Span(cur[0], cur[1], w - 1, cur[2]))
            cur = None
        if slot is None:
            continue
        start, low = (w, word_p[w]) if cur is None else (cur[1], min(cur[2], word_p[w]))
        cur = (slot, start, low)
    if cur is not None:
        out.append(Span(cur[0], cur[1], len(path) - 1, cur[2]))
    return out


class TaggerModel:
    """Tokenizer + ONNX token-classification model: one input's words in, per-word tag
    logits out."""

    def __init__(
        self,
        model_path: Path,
        tokenizer_path: Path,
        n_tags: int,
        *,
        max_length: int = 128,
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
    ) -> None:
        from tokenizers import Tokenizer

        from edgeagent.backends.onnx import cpu_session

        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        tokenizer.no_padding()
        tokenizer.no_truncation()  # overlong inputs are detected and escalated, never cut
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.session = cpu_session(model_path, intra_op_threads, inter_op_threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        missing = {"input_ids", "attention_mask"} - set(self.input_names)
        if missing:
            raise ValueError(f"{model_path}: model lacks inputs {sorted(missing)}")
        out = self.session.get_outputs()[0]
        width = out.shape[-1]
        if isinstance(width, int) and width != n_tags:
            raise ValueError(f"{model_path}: model scores {width} tags, labels.json has {n_tags}")
        self.n_tags = n_tags

    def word_logits(self, words: list[str]) -> FloatArray | None:
        """``(len(words), tags)`` logits of each word's first sub-word token, or ``None``
        when the input needs more than ``max_length`` tokens.  A word the tokenizer reduces
        to nothing (control or zero-width characters only) gets all-zero logits (the
        decoder then forces it to ``O``).

        One input per ``run``, never a padded batch: the INT8 model quantizes activations
        per tensor at run time, so a batch's longest member and its padding would shift
        every other member's scale and its answer (measured: 2.3 % of SNIPS frames changed
        in batches of 16).  An answer must not depend on which jobs arrived with it."""
        import numpy as np

        if not words:
            return np.zeros((0, self.n_tags), dtype=np.float32)
        enc = self.tokenizer.encode(words, is_pretokenized=True)
        if len(enc.ids) > self.max_length:
            return None
        ids = np.array([enc.ids], dtype=np.int64)
        feeds: dict[str, Any] = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.array([enc.type_ids], dtype=np.int64)
        (logits,) = self.session.run(None, feeds)
        out = np.zeros((len(words), self.n_tags), dtype=np.float32)
        seen: set[int] = set()
        for pos, wid in enumerate(enc.word_ids):
            if wid is not None and wid not in seen:
                seen.add(wid)
                out[wid] = logits[0, pos]
        return out


@dataclass(frozen=True, slots=True)
class TaggedText:
    """The decoded tags of one input (before they become the task's object)."""

    words: list[tuple[int, int]]
    path: list[int]
    word_p: list[float]
    spans: list[Span]


class Decoder:
    """Temperature, BIO-constrained Viterbi and span grouping for one tag set (pure numpy;
    shared by the backend, ``edgeagent train``/``calibrate`` and the benchmark)."""

    def __init__(self, tags: list[str], temperature: float = 1.0) -> None:
        if "O" not in tags:
            raise ValueError("labels.json: the tag set has no 'O'")
        for t in tags:
            if t != "O" and (t[:2] not in ("B-", "I-") or not t[2:]):
                raise ValueError(f"labels.json: {t!r} is not a BIO tag (O, B-x, I-x)")
        if temperature <= 0:
            raise ValueError("calibration.json: temperature must be > 0")
        self.tags = list(tags)
        self.temperature = temperature
        self.o_index = self.tags.index("O")
        self.allowed = transition_mask(self.tags)
        self.start = start_mask(self.tags)
        self.slots = sorted({s for t in self.tags if (s := slot_of(t)) is not None})

    def decode(
        self, logits: FloatArray, allowed_tags: npt.NDArray[np.bool_] | None = None
    ) -> tuple[list[int], list[float]]:
        """Tag path and the calibrated probability of each chosen tag.  A word with all-zero
        logits (no sub-word tokens: see :meth:`TaggerModel.word_logits`) is forced to ``O``
        with probability 1.  ``allowed_tags`` (:meth:`tags_of`) restricts the path to some
        tags; the probabilities stay those of the full distribution, so mass the model put
        on a forbidden tag still lowers the confidence."""
        import numpy as np

        z = logits / self.temperature
        z = z - z.max(axis=1, keepdims=True)
        logp = (z - np.log(np.exp(z).sum(axis=1, keepdims=True))).astype(np.float32)
        blank = ~logits.any(axis=1)
        if blank.any():
            logp[blank] = -1e9
            logp[blank, self.o_index] = 0.0
        score = logp if allowed_tags is None else np.where(allowed_tags, logp, np.float32(-1e9))
        path = viterbi(score.astype(np.float32), self.allowed, self.start)
        word_p = [float(np.exp(logp[w, t])) for w, t in enumerate(path)]
        return path, word_p

    def tag(
        self,
        logits: FloatArray,
        words: list[tuple[int, int]],
        allowed_tags: npt.NDArray[np.bool_] | None = None,
    ) -> TaggedText:
        path, word_p = self.decode(logits, allowed_tags)
        return TaggedText(words, path, word_p, spans(self.tags, path, word_p))

    def tags_of(self, slots: frozenset[str]) -> npt.NDArray[np.bool_]:
        """Mask of the tags a path may use when only ``slots`` may be filled (``O`` always)."""
        import numpy as np

        return np.array([t == "O" or slot_of(t) in slots for t in self.tags], dtype=bool)


def job_confidence(tagged: TaggedText, how: str) -> float:
    """One confidence for the whole answer (see the module docstring)."""
    if how == "spans":
        return min((s.confidence for s in tagged.spans), default=1.0)
    if how == "frame":
        p = 1.0
        for x in tagged.word_p:
            p *= x
        return p
    return min(tagged.word_p, default=1.0)


# -- frame calibration (issues 12 and 14) -----------------------------------------------

FRAME_FEATURES = ("log_words", "log_spans", "log_frame", "log_intent")
"""Features of one answer for :class:`FrameCalibrator`: the log of each job confidence
mode (:func:`job_confidence`) and of the intent probability (joint bundles; 0 otherwise)."""

_LOG_FLOOR = 1e-6


@dataclass(frozen=True)
class FrameCalibrator:
    """P(the whole frame is right) by a logistic regression on :data:`FRAME_FEATURES`,
    fitted (cross-validated) on the calibration split when the bundle was trained.

    The per-word tag probabilities are calibrated word by word, not frame by frame: the
    least probable word (``words``), the whole sequence (``frame``) and the weakest span
    (``spans``) each miss part of what makes a frame wrong, and a joint bundle must also
    weigh the intent.  The regression learns that combination from the held-out frames.
    It replaces the job confidence when the task's ``tagger_confidence`` is the mode it
    was fitted for (``base``); with an intent, it is never above the intent probability.
    (Features for unseen slot values, out-of-vocabulary words and rare slot types were
    measured on ATIS and made the ranking worse; tag margins, entropies, span counts and
    a gazetteer of training values did not rank SNIPS frames clearly better: see
    ``benchmarks/README.md``.)"""

    base: str
    names: tuple[str, ...]
    weights: tuple[float, ...]
    bias: float

    @staticmethod
    def features(tagged: TaggedText, p_intent: float | None = None) -> dict[str, float]:
        import math

        def log(x: float) -> float:
            return math.log(max(x, _LOG_FLOOR))

        return {
            "log_words": log(job_confidence(tagged, "words")),
            "log_spans": log(job_confidence(tagged, "spans")),
            "log_frame": log(job_confidence(tagged, "frame")),
            "log_intent": 0.0 if p_intent is None else log(p_intent),
        }

    def confidence(self, tagged: TaggedText, p_intent: float | None = None) -> float:
        import math

        f = self.features(tagged, p_intent)
        z = self.bias + sum(w * f[n] for n, w in zip(self.names, self.weights, strict=True))
        p = 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z))))
        # a frame is right only if its intent is: never surer than the intent itself
        return p if p_intent is None else min(p, p_intent)

    def to_json(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "features": list(self.names),
            "weights": list(self.weights),
            "bias": self.bias,
        }

    @classmethod
    def from_json(cls, raw: object) -> FrameCalibrator:
        """From ``calibration.json``'s ``frame_calibrator``; ValueError when malformed."""
        if not isinstance(raw, dict):
            raise ValueError("calibration.json: frame_calibrator must be an object")
        try:
            names = tuple(str(n) for n in raw["features"])
            weights = tuple(float(w) for w in raw["weights"])
            bias = float(raw["bias"])
            base = str(raw["base"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"calibration.json: malformed frame_calibrator ({exc})") from None
        unknown = set(names) - set(FRAME_FEATURES)
        if unknown or len(names) != len(weights):
            raise ValueError(
                f"calibration.json: frame_calibrator has unknown features {sorted(unknown)} "
                "or weights of the wrong length"
            )
        return cls(base, names, weights, bias)


_UNITS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_NUMBER_WORDS = {w: i for i, w in enumerate(_UNITS)} | {w: 20 + 10 * i for i, w in enumerate(_TENS)}


def words_to_int(text: str) -> int:
    """``"4"``, ``"1,200"``, ``"four"``, ``"twenty-one"``, ``"one hundred and five"`` -> int
    (English words up to 999 999); raises ValueError for anything else."""
    plain = text.strip().replace(",", "")
    if plain.lstrip("+-").isdigit():
        return int(plain)
    words = [w for w in plain.lower().replace("-", " ").split() if w != "and"]
    if not words:
        raise ValueError(text)
    total = current = 0
    for w in words:
        if w in _NUMBER_WORDS:
            current += _NUMBER_WORDS[w]
        elif w == "hundred" and current:
            current *= 100
        elif w == "thousand" and (current or total) and total < 1000:
            total, current = (total + current) * 1000, 0
        else:
            raise ValueError(text)
    return total + current


def _convert(raw: str, typ: object) -> JSONValue:
    """Span text -> the schema's type; raises ValueError when it does not parse."""
    if typ == "integer":
        return words_to_int(raw)
    if typ == "number":
        try:
            value = float(raw.replace(",", ""))
        except ValueError:
            return float(words_to_int(raw))
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(raw)
        return value
    return raw


def build_object(
    text: str, tagged: TaggedText, props: dict[str, Any]
) -> tuple[dict[str, JSONValue], dict[str, JSONValue]]:
    """The task's object from the spans, and problems found on the way.

    ``props`` maps slot -> JSON Schema property.  Problems (any one makes the job
    ``schema_invalid``): ``repeated`` (a single-valued slot found with different values),
    ``unparsed`` (a number slot whose text is not a number)."""
    values: dict[str, list[str]] = {}
    ignored: list[str] = []
    for s in tagged.spans:
        if s.slot not in props:
            ignored.append(s.slot)
            continue
        start, end = tagged.words[s.first][0], tagged.words[s.last][1]
        values.setdefault(s.slot, []).append(text[start:end])
    out: dict[str, JSONValue] = {}
    problems: dict[str, JSONValue] = {}
    repeated: list[str] = []
    unparsed: list[str] = []
    for slot, found in values.items():
        prop = props[slot] if isinstance(props[slot], dict) else {}
        typ = prop.get("type", "string")
        try:
            if typ == "array":
                items = prop.get("items", {})
                item_type = items.get("type", "string") if isinstance(items, dict) else "string"
                out[slot] = [_convert(v, item_type) for v in found]
                continue
            distinct = list(dict.fromkeys(v.casefold() for v in found))
            if len(distinct) > 1:
                repeated.append(slot)
                continue
            out[slot] = _convert(found[0], typ)
        except ValueError:
            unparsed.append(slot)
    if repeated:
        problems["repeated"] = sorted(repeated)
    if unparsed:
        problems["unparsed"] = sorted(unparsed)
    if ignored:
        problems["ignored"] = sorted(set(ignored))
    return out, problems


class OnnxTaggerBackend:
    """Extraction backend over a tagger bundle (see the module docstring).

    Thread model: like the classifier, ``infer_batch`` may run on several worker threads;
    the session, tokenizer and decoder are thread-safe or read-only."""

    def __init__(self, task_name: str, task: TaskConfig) -> None:
        import jsonschema

        if not isinstance(task.backend, OnnxBackendConfig):
            raise BackendError(f"task {task_name!r}: backend is not of type 'onnx'")
        if task.kind != "extract":
            raise BackendError(f"task {task_name!r}: a tagger bundle only does kind='extract'")
        self.task_name = task_name
        self.task = task
        self.config: OnnxBackendConfig = task.backend
        self._validator = (
            jsonschema.Draft202012Validator(task.output_schema) if task.output_schema else None
        )
        self._lock = threading.Lock()
        self._model: TaggerModel | None = None
        self._decoder: Decoder | None = None
        self._props: dict[str, Any] = {}
        self._threshold: float | None = None
        self._calibrator: FrameCalibrator | None = None
        self._manifest: dict[str, Any] | None = None

    @property
    def model_id(self) -> str:
        name = self._manifest.get("name", "tagger") if self._manifest else "tagger"
        return f"{name}@{self.fingerprint[:6]}"

    @property
    def fingerprint(self) -> str:
        manifest = self._manifest or bundle_manifest(  # before load(): unverified claim
            self.task_name, self.config.bundle, "tagger", verify=False
        )
        return bundle_fingerprint(
            manifest,
            f"max_length={self.config.max_length}",
            f"confidence={self.config.tagger_confidence}",
            f"use_bundle_threshold={self.config.use_bundle_threshold}",
        )

    @property
    def slots(self) -> list[str]:
        if self._decoder is None:
            raise BackendError(f"task {self.task_name!r}: slots asked before load()")
        return list(self._decoder.slots)

    def load(self) -> None:
        bundle = self.config.bundle
        where = f"task {self.task_name!r}, bundle {bundle}"
        with self._lock:
            manifest = bundle_manifest(
                self.task_name, bundle, "tagger", verify=self.config.verify_sha256
            )
            with loading_model(where):
                tags = json.loads((bundle / "labels.json").read_text("utf-8"))
                cal = json.loads((bundle / "calibration.json").read_text("utf-8"))
                if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                    raise ValueError("labels.json: expected a list of strings")
                if not isinstance(cal, dict):
                    raise ValueError("calibration.json: expected an object")
                decoder = Decoder(tags, float(cal.get("temperature", 1.0)))
                raw_cal = cal.get("frame_calibrator")
                calibrator = None if raw_cal is None else FrameCalibrator.from_json(raw_cal)
                tok = manifest.get("tokenizer", {})
                model = model_class(bundle)(
                    bundle / "model.onnx",
                    bundle / tok.get("file", "tokenizer.json"),
                    len(tags),
                    max_length=self.config.max_length,
                    intra_op_threads=self.config.intra_op_threads,
                    inter_op_threads=self.config.inter_op_threads,
                )
            props = self._schema_props(decoder.slots, where)
            threshold = cal.get("threshold")
            mode = (cal.get("threshold_calibration") or {}).get("confidence", "words")
            if (
                threshold is not None
                and self.config.use_bundle_threshold
                and mode != self.config.tagger_confidence
            ):
                raise BackendError(
                    f"{where}: the bundle's threshold was calibrated for tagger_confidence = "
                    f"{mode!r}, the task uses {self.config.tagger_confidence!r} (calibrate "
                    "again, or set use_bundle_threshold = false)"
                )
            self._threshold = float(threshold) if threshold is not None else None
            self._calibrator = (
                calibrator
                if calibrator is not None and calibrator.base == self.config.tagger_confidence
                else None
            )
            self._manifest, self._model, self._decoder, self._props = (
                manifest,
                model,
                decoder,
                props,
            )
        self.warmup()

    def _schema_props(self, slots: list[str], where: str) -> dict[str, Any]:
        """slot -> schema property.  Without a schema every slot is a single string; with
        one, every property must be a slot the model knows (else it could never be filled)."""
        schema = self.task.output_schema
        if schema is None:
            return {s: {"type": "string"} for s in slots}
        props = schema.get("properties", {})
        unknown = sorted(set(props) - set(slots) - self._extra_keys())
        if unknown:
            raise BackendError(
                f"{where}: schema properties {unknown} are not slots of the model "
                f"(it knows {len(slots)}: {', '.join(slots)})"
            )
        return dict(props)

    @property
    def calibrator(self) -> FrameCalibrator | None:
        """The bundle's frame calibrator when the task uses it (its ``base`` is the task's
        ``tagger_confidence``), else ``None``."""
        return self._calibrator

    def warmup(self) -> None:
        self.infer_batch([WARMUP_TEXT])

    def loaded(self) -> tuple[TaggerModel, Decoder]:
        """The loaded model and decoder (also for ``edgeagent calibrate`` and benchmarks)."""
        model, decoder = self._model, self._decoder
        if model is None or decoder is None:
            raise BackendError(f"task {self.task_name!r}: infer_batch before load()")
        return model, decoder

    def infer_batch(self, inputs: list[JSONValue]) -> list[Prediction]:
        model, decoder = self.loaded()
        out: list[Prediction] = []
        for item in inputs:
            text = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
            if not has_content(text):  # nothing to tag: any slot would be invented
                out.append(
                    Prediction(None, 0.0, reason="out_of_scope", details={"failure": NO_CONTENT})
                )
                continue
            if isinstance(model, JointTaggerModel):
                out.append(self._joint_answer(model, decoder, text))
                continue
            offs = split_words(text)
            lg = model.word_logits([text[a:b] for a, b in offs])
            if lg is None:
                out.append(
                    Prediction(
                        None,
                        0.0,
                        reason=SCHEMA_INVALID,
                        details={"failure": "input_too_long", "limit_tokens": model.max_length},
                    )
                )
                continue
            out.append(self._answer(text, decoder.tag(lg, offs)))
        return out

    def _answer(
        self,
        text: str,
        tagged: TaggedText,
        intent: tuple[str, float] | None = None,
        combine: str = "product",
    ) -> Prediction:
        """The object, its validation and its confidence.  ``intent`` (label, probability)
        comes from a joint bundle: it joins the object (when the task has no schema or its
        schema names ``intent``) and the frame confidence (:func:`frame_confidence`)."""
        obj, problems = build_object(text, tagged, self._props)
        conf = job_confidence(tagged, self.config.tagger_confidence)
        details: dict[str, JSONValue] = {}
        if intent is not None:
            label, p_intent = intent
            schema = self.task.output_schema
            if schema is None or INTENT_KEY in schema.get("properties", {}):
                obj[INTENT_KEY] = label
            conf = frame_confidence(p_intent, conf, combine)
            details["intent"] = {"label": label, "confidence": round(p_intent, 4)}
        if self._calibrator is not None:
            conf = self._calibrator.confidence(tagged, None if intent is None else intent[1])
        details |= {
            "spans": [
                {
                    "slot": s.slot,
                    "start": tagged.words[s.first][0],
                    "end": tagged.words[s.last][1],
                    "confidence": round(s.confidence, 4),
                }
                for s in tagged.spans
            ],
            **problems,
        }
        if "repeated" in problems or "unparsed" in problems:
            repeated = [str(x) for x in problems.get("repeated", [])]
            unparsed = [str(x) for x in problems.get("unparsed", [])]
            why = []
            if repeated:
                why.append("found more than once with different values (make it an array)")
            if unparsed:
                why.append("not a number")
            details.update(
                failure="schema",
                fields=[f"$.{f}" for f in repeated + unparsed],
                message=" / ".join(why),
            )
            return Prediction(None, 0.0, reason=SCHEMA_INVALID, details={**details, "partial": obj})
        if self._validator is not None:
            errors = sorted(self._validator.iter_errors(obj), key=lambda e: list(e.path))
            if errors:
                details["errors"] = [e.message[:200] for e in errors[:5]]
                details.update(
                    failure="schema",
                    fields=[e.json_path for e in errors[:5]],
                    message=errors[0].message[:200],
                )
                return Prediction(
                    None, 0.0, reason=SCHEMA_INVALID, details={**details, "partial": obj}
                )
        reason: str | None = None
        if (
            self.config.use_bundle_threshold
            and self._threshold is not None
            and conf < self._threshold
        ):
            reason = LOW_CONFIDENCE
        return Prediction(obj, max(0.0, min(1.0, conf)), reason=reason, details=details)

    def close(self) -> None:
        with self._lock:
            self._model = None
            self._decoder = None

    # -- joint intent + slot bundles (``intents.json`` present) ----------------------------

    def _extra_keys(self) -> set[str]:
        """Object keys besides the slots: ``intent`` for a joint bundle."""
        return {INTENT_KEY} if (self.config.bundle / INTENTS_FILE).is_file() else set()

    def _joint_answer(self, model: JointTaggerModel, decoder: Decoder, text: str) -> Prediction:
        """One job through a joint bundle: the slots and the intent from one encoder pass,
        answered by :meth:`_answer` with one frame confidence."""
        offs = split_words(text)
        joint = model.joint_logits([text[a:b] for a, b in offs])
        if joint is None:
            return Prediction(
                None,
                0.0,
                reason=SCHEMA_INVALID,
                details={"failure": "input_too_long", "limit_tokens": model.max_length},
            )
        tagged, probs = joint_tag(model, decoder, joint, offs)
        k = int(probs.argmax())
        return self._answer(
            text, tagged, intent=(model.intents[k], float(probs[k])), combine=model.combine
        )


INTENTS_FILE = "intents.json"
INTENT_KEY = "intent"
COMBINE_MODES = ("product", "min")


def frame_confidence(p_intent: float, slots: float, combine: str = "product") -> float:
    """The confidence of a whole frame (intent and every slot right) from the intent's
    calibrated probability and the slots' job confidence: ``product`` treats them as
    independent, ``min`` as the weakest link.  The bundle records the one that needed the
    least escalation on its held-out split."""
    return min(p_intent, slots) if combine == "min" else p_intent * slots


def joint_tag(
    model: JointTaggerModel,
    decoder: Decoder,
    joint: tuple[FloatArray, FloatArray],
    words: list[tuple[int, int]],
) -> tuple[TaggedText, FloatArray]:
    """The tags and the intent probabilities of one input from its joint logits.  When the
    bundle records which slots each intent uses (``intent_slots``), the tag path may only
    fill the predicted intent's slots (a frame with the wrong intent is wrong anyway)."""
    word_lg, intent_lg = joint
    probs = model.intent_probs(intent_lg)
    allowed = None
    if model.intent_slots is not None:
        slots = model.intent_slots.get(model.intents[int(probs.argmax())])
        allowed = None if slots is None else decoder.tags_of(slots)
    return decoder.tag(word_lg, words, allowed), probs


def model_class(bundle: Path) -> type[TaggerModel]:
    """:class:`JointTaggerModel` for a bundle with an intent head, else :class:`TaggerModel`."""
    return JointTaggerModel if (bundle / INTENTS_FILE).is_file() else TaggerModel


class JointTaggerModel(TaggerModel):
    """A tagger whose encoder also predicts the sentence's intent, in the same pass.

    The ONNX model is a token-classification model with ``tags + intents`` output columns:
    the first ``tags`` are the BIO tag logits (read on each word's first sub-word token, as
    for :class:`TaggerModel`); the intent logits are the mean of the other columns over all
    tokens, which equals a linear intent head on the mean-pooled encoder output (a linear
    map commutes with the mean), so the stock token-classification export carries both
    heads.  ``intents.json`` (next to the model) names the intents; ``calibration.json``
    holds ``intent_temperature`` and ``confidence_combine``."""

    def __init__(
        self,
        model_path: Path,
        tokenizer_path: Path,
        n_tags: int,
        *,
        max_length: int = 128,
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
    ) -> None:
        import math

        folder = model_path.parent
        intents = json.loads((folder / INTENTS_FILE).read_text("utf-8"))
        if (
            not isinstance(intents, list)
            or not intents
            or not all(isinstance(x, str) and x for x in intents)
        ):
            raise ValueError(f"{INTENTS_FILE}: expected a non-empty list of intent names")
        cal = json.loads((folder / "calibration.json").read_text("utf-8"))
        temperature = float(cal.get("intent_temperature", 1.0)) if isinstance(cal, dict) else 1.0
        combine = cal.get("confidence_combine", "product") if isinstance(cal, dict) else "product"
        raw_slots = cal.get("intent_slots") if isinstance(cal, dict) else None
        if raw_slots is not None and not (
            isinstance(raw_slots, dict) and all(isinstance(v, list) for v in raw_slots.values())
        ):
            raise ValueError("calibration.json: intent_slots must map intents to slot lists")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError("calibration.json: intent_temperature must be > 0")
        if combine not in COMBINE_MODES:
            raise ValueError(f"calibration.json: confidence_combine must be one of {COMBINE_MODES}")
        super().__init__(
            model_path,
            tokenizer_path,
            n_tags + len(intents),
            max_length=max_length,
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads,
        )
        self.n_tags = n_tags
        self.intents: list[str] = intents
        self.intent_temperature = temperature
        self.combine: str = combine
        self.intent_slots: dict[str, frozenset[str]] | None = (
            None
            if raw_slots is None
            else {str(k): frozenset(str(x) for x in v) for k, v in raw_slots.items()}
        )

    def joint_logits(self, words: list[str]) -> tuple[FloatArray, FloatArray] | None:
        """``(word tag logits (words, tags), intent logits (intents,))``, or ``None`` when
        the input needs more than ``max_length`` tokens.  One input per run (see
        :meth:`TaggerModel.word_logits` for why)."""
        import numpy as np

        enc = self.tokenizer.encode(words, is_pretokenized=True)
        if len(enc.ids) > self.max_length:
            return None
        ids = np.array([enc.ids], dtype=np.int64)
        feeds: dict[str, Any] = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.array([enc.type_ids], dtype=np.int64)
        (logits,) = self.session.run(None, feeds)
        full = logits[0]
        out = np.zeros((len(words), self.n_tags), dtype=np.float32)
        seen: set[int] = set()
        for pos, wid in enumerate(enc.word_ids):
            if wid is not None and wid not in seen:
                seen.add(wid)
                out[wid] = full[pos, : self.n_tags]
        intent: FloatArray = full[:, self.n_tags :].mean(axis=0).astype(np.float32)
        return out, intent

    def word_logits(self, words: list[str]) -> FloatArray | None:
        """The tag logits alone (so every tagger tool works on a joint bundle)."""
        joint = self.joint_logits(words)
        return None if joint is None else joint[0]

    def intent_probs(self, intent_logits: FloatArray) -> FloatArray:
        """Temperature-scaled intent probabilities."""
        import numpy as np

        z = intent_logits / self.intent_temperature
        e = np.exp(z - z.max())
        out: FloatArray = (e / e.sum()).astype(np.float32)
        return out

    def intent_of(self, intent_logits: FloatArray) -> tuple[str, float]:
        """The most likely intent and its calibrated probability."""
        p = self.intent_probs(intent_logits)
        k = int(p.argmax())
        return self.intents[k], float(p[k])
