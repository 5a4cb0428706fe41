"""Calibration of a generative backend's confidence: the mappings and their file.

``edgeagent calibrate`` (:mod:`edgeagent.modeltools.calibrate_llm`) fits one on labelled
examples and writes the file; the ``llamacpp`` backend reads it at load.  Pure standard
library, so the backend does not need numpy to apply it.  Two kinds, told apart by the
file's ``format``:

* :class:`PlattCalibration` (``edgeagent.platt-calibration/1``, the files written before
  issue 14 and still read): ``p = sigmoid(a * logit(c) + b)`` on the raw confidence ``c``
  (clipped to ``[EPS, 1 - EPS]``).  ``a >= 0`` always, so the calibrated confidence is
  non-decreasing in the raw one and a threshold on either selects the same answers.
* :class:`FeatureCalibration` (``edgeagent.feature-calibration/1``): logistic regression
  ``p = sigmoid(bias + sum_i w_i * (x_i - mean_i) / scale_i)`` on named features of one
  answer that the backend computes (:data:`edgeagent.backends.llamacpp.FEATURES`: the
  least likely value token, the mean, the least likely token of each kind of field,
  how many numbers the input offers, ...).  The file names the features and the
  backend's ``features_version``; a file asking for features the backend does not
  compute (another version) is refused, not applied.

The file (JSON, :data:`FORMAT`) records what the raw confidence depended on — the model's
sha256 and the backend's *prompt fingerprint* (instruction, examples, schema, grammar,
decoding and aggregation settings) — so a stale calibration is refused, not applied.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "edgeagent.platt-calibration/1"
FEATURE_FORMAT = "edgeagent.feature-calibration/1"
FORMATS = (FORMAT, FEATURE_FORMAT)
EPS = 1e-6
"""Raw confidences are clipped to ``[EPS, 1 - EPS]`` before the logit."""


class CalibrationError(ValueError):
    """A calibration file that cannot be read or is not a calibration."""


def logit(c: float) -> float:
    """``log(c / (1 - c))`` of ``c`` clipped to ``[EPS, 1 - EPS]``."""
    c = min(1.0 - EPS, max(EPS, c))
    return math.log(c / (1.0 - c))


def sigmoid(z: float) -> float:
    """``1 / (1 + exp(-z))`` without overflow."""
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@dataclass(frozen=True, slots=True)
class PlattCalibration:
    """A fitted mapping, the threshold chosen on it, and what it was fitted for."""

    a: float
    b: float
    threshold: float | None
    """Answers whose calibrated confidence is below this are ``low_confidence`` (None: none)."""
    model_sha256: str
    prompt_fingerprint: str
    info: dict[str, Any] = field(default_factory=dict)
    """Everything else in the file (task, goal, metrics, provenance); not used to answer."""

    def apply(self, raw: float) -> float:
        """The calibrated confidence in [0, 1] of a raw confidence in [0, 1]."""
        return sigmoid(self.a * logit(raw) + self.b)

    def apply_features(self, features: Mapping[str, float]) -> float:
        """:meth:`apply` on ``features["raw"]`` (the backend's configured aggregation)."""
        return self.apply(features["raw"])

    def to_json(self) -> dict[str, Any]:
        return {
            **self.info,
            "format": FORMAT,
            "method": "platt",
            "a": self.a,
            "b": self.b,
            "threshold": self.threshold,
            "model_sha256": self.model_sha256,
            "prompt_fingerprint": self.prompt_fingerprint,
        }


@dataclass(frozen=True, slots=True)
class FeatureCalibration:
    """Logistic regression on named answer features (see the module docstring)."""

    features: tuple[str, ...]
    weights: tuple[float, ...]
    bias: float
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    """Standardisation: each feature enters as ``(x - mean) / scale`` (scale > 0)."""
    features_version: int
    """The backend's feature definitions these weights were fitted on."""
    threshold: float | None
    model_sha256: str
    prompt_fingerprint: str
    info: dict[str, Any] = field(default_factory=dict)

    def apply_features(self, features: Mapping[str, float]) -> float:
        """The calibrated confidence in [0, 1] of one answer's features."""
        z = self.bias
        for name, w, m, s in zip(self.features, self.weights, self.mean, self.scale, strict=True):
            z += w * (features[name] - m) / s
        return sigmoid(z)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.info,
            "format": FEATURE_FORMAT,
            "method": "logistic",
            "features": list(self.features),
            "weights": list(self.weights),
            "bias": self.bias,
            "mean": list(self.mean),
            "scale": list(self.scale),
            "features_version": self.features_version,
            "threshold": self.threshold,
            "model_sha256": self.model_sha256,
            "prompt_fingerprint": self.prompt_fingerprint,
        }


Calibration = PlattCalibration | FeatureCalibration
"""What a calibration file holds; both map an answer's features to a confidence."""


def parse_calibration(blob: bytes, source: str) -> Calibration:
    """Validate a calibration file's bytes.  Raises :class:`CalibrationError`."""
    try:
        doc = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CalibrationError(f"{source}: not JSON: {exc}") from None
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or fmt not in FORMATS:
        newer = isinstance(fmt, str) and fmt.startswith("edgeagent.")
        raise CalibrationError(
            f"{source}: format {fmt!r} is not one this edgeagent reads ({', '.join(FORMATS)}); "
            "written by a newer edgeagent? re-run `edgeagent calibrate`"
            if newer
            else f"{source}: not an edgeagent calibration file ({', '.join(FORMATS)})"
        )
    thr = None if doc.get("threshold") is None else _finite(doc, "threshold", source)
    if thr is not None and not 0.0 <= thr <= 1.0:
        raise CalibrationError(f"{source}: 'threshold' must be null or a number in [0, 1]")
    for name in ("model_sha256", "prompt_fingerprint"):
        if not isinstance(doc.get(name), str) or not doc[name]:
            raise CalibrationError(f"{source}: {name!r} is missing")
    if fmt == FEATURE_FORMAT:
        return _parse_features(doc, thr, source)
    a, b = _finite(doc, "a", source), _finite(doc, "b", source)
    if a < 0:
        raise CalibrationError(f"{source}: 'a' must be >= 0 (the mapping must be monotone)")
    known = {"format", "method", "a", "b", "threshold", "model_sha256", "prompt_fingerprint"}
    return PlattCalibration(
        a=a,
        b=b,
        threshold=thr,
        model_sha256=doc["model_sha256"],
        prompt_fingerprint=doc["prompt_fingerprint"],
        info={k: v for k, v in doc.items() if k not in known},
    )


def _parse_features(doc: dict[str, Any], thr: float | None, source: str) -> FeatureCalibration:
    names = doc.get("features")
    if (
        not isinstance(names, list)
        or not names
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
    ):
        raise CalibrationError(f"{source}: 'features' must be a list of distinct feature names")
    columns: dict[str, tuple[float, ...]] = {}
    for key in ("weights", "mean", "scale"):
        values = doc.get(key)
        if not isinstance(values, list) or len(values) != len(names):
            raise CalibrationError(f"{source}: {key!r} must hold one number per feature")
        columns[key] = tuple(_finite({key: v}, key, source) for v in values)
    if any(s <= 0 for s in columns["scale"]):
        raise CalibrationError(f"{source}: 'scale' must be > 0")
    version = doc.get("features_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise CalibrationError(f"{source}: 'features_version' must be an integer")
    known = {
        "format", "method", "features", "weights", "bias", "mean", "scale",
        "features_version", "threshold", "model_sha256", "prompt_fingerprint",
    }  # fmt: skip
    return FeatureCalibration(
        features=tuple(names),
        weights=columns["weights"],
        bias=_finite(doc, "bias", source),
        mean=columns["mean"],
        scale=columns["scale"],
        features_version=version,
        threshold=thr,
        model_sha256=doc["model_sha256"],
        prompt_fingerprint=doc["prompt_fingerprint"],
        info={k: v for k, v in doc.items() if k not in known},
    )


def read_calibration(path: Path) -> tuple[Calibration, str]:
    """The calibration in ``path`` and the sha256 of the file's bytes (for fingerprints)."""
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise CalibrationError(f"cannot read calibration file {path}: {exc.strerror}") from None
    return parse_calibration(blob, str(path)), hashlib.sha256(blob).hexdigest()


def write_calibration(path: Path, cal: Calibration) -> None:
    """Write ``cal`` to ``path`` atomically (a reader sees the old or the new file)."""
    text = json.dumps(cal.to_json(), indent=2, sort_keys=True) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finite(doc: dict[str, Any], name: str, source: str) -> float:
    value = doc.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CalibrationError(f"{source}: {name!r} must be a finite number")
    return float(value)


# -- answer features (what a FeatureCalibration maps) -----------------------------------------

FEATURES_VERSION = 1
"""Bump when a feature's definition changes: files fitted on the old ones are refused."""
FEATURES = (
    "raw",
    "min_lp",
    "mean_lp",
    "copied_min_lp",
    "closed_min_lp",
    "min_margin",
    "closed_in_input",
    "numbers_in_input",
    "input_chars",
    "fields",
)
"""Every feature the backend computes for an answer (see :func:`answer_features`)."""
LP_FLOOR = -20.0
"""Log-probabilities (and margins) are clipped below at this, so one ~0 probability does
not dominate a linear model."""


@dataclass(frozen=True, slots=True)
class ValueTokens:
    """The generated tokens overlapping one answer value (a leaf of the JSON object)."""

    copied: bool
    """The schema asks for the value to be copied from the input (grounding-checked)."""
    logprobs: tuple[float, ...]
    """Unconstrained log-probability of each token the model chose."""
    margins: tuple[float, ...]
    """Chosen token's log-probability minus the best other token's (negative when the
    grammar forced a token the model did not prefer)."""
    in_input: bool
    """The value (as written) occurs in the input; for a closed value (an enum label)
    a plain substring test, for a copied one the grounding test."""


def answer_features(
    raw: float, values: list[ValueTokens], input_text: str, numbers: int
) -> dict[str, float]:
    """The features of one answer, by name (:data:`FEATURES`):

    * ``raw``: the backend's configured aggregation (``confidence = "min"``: the least
      likely value token) — what a :class:`PlattCalibration` maps;
    * ``min_lp``/``mean_lp``: least and mean log-probability over all value tokens;
    * ``copied_min_lp``/``closed_min_lp``: the least over the values copied from the input
      (ids, numbers) and over the closed ones (enum labels, booleans); 0 when none;
    * ``min_margin``: the least margin between the chosen token and the runner-up;
    * ``closed_in_input``: share of the closed string values that occur in the input
      (an enum label like a unit the input never writes is a guess); 1 when none;
    * ``numbers_in_input``: ``log(1 + distinct numbers in the input)`` (more candidates,
      more confusions: the old value instead of the new);
    * ``input_chars``: ``log(1 + input length)``; ``fields``: how many values.
    """
    lps = [lp for v in values for lp in v.logprobs]
    copied = [lp for v in values if v.copied for lp in v.logprobs]
    closed = [lp for v in values if not v.copied for lp in v.logprobs]
    margins = [m for v in values for m in v.margins]
    closed_vals = [v for v in values if not v.copied]

    def low(xs: list[float]) -> float:
        return max(LP_FLOOR, min(xs)) if xs else 0.0

    return {
        "raw": raw,
        "min_lp": low(lps) if lps else LP_FLOOR,
        "mean_lp": max(LP_FLOOR, sum(lps) / len(lps)) if lps else LP_FLOOR,
        "copied_min_lp": low(copied),
        "closed_min_lp": low(closed),
        "min_margin": low(margins),
        "closed_in_input": (
            sum(v.in_input for v in closed_vals) / len(closed_vals) if closed_vals else 1.0
        ),
        "numbers_in_input": math.log1p(numbers),
        "input_chars": math.log1p(len(input_text)),
        "fields": float(len(values)),
    }
