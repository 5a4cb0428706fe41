"""Platt calibration of a generative backend's raw confidence: the mapping and its file.

``edgeagent calibrate`` (:mod:`edgeagent.modeltools.calibrate_llm`) fits it on labelled
examples and writes the file; the ``llamacpp`` backend reads it at load.  Pure standard
library, so the backend does not need numpy to apply it.

The mapping is ``p = sigmoid(a * logit(c) + b)`` on the raw confidence ``c`` (clipped to
``[EPS, 1 - EPS]``).  ``a >= 0`` always, so the calibrated confidence is non-decreasing
in the raw one and a threshold on either selects the same answers.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "edgeagent.platt-calibration/1"
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


def parse_calibration(blob: bytes, source: str) -> PlattCalibration:
    """Validate a calibration file's bytes.  Raises :class:`CalibrationError`."""
    try:
        doc = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CalibrationError(f"{source}: not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CalibrationError(f"{source}: not an edgeagent calibration file ({FORMAT})")
    a, b = _finite(doc, "a", source), _finite(doc, "b", source)
    if a < 0:
        raise CalibrationError(f"{source}: 'a' must be >= 0 (the mapping must be monotone)")
    thr = None if doc.get("threshold") is None else _finite(doc, "threshold", source)
    if thr is not None and not 0.0 <= thr <= 1.0:
        raise CalibrationError(f"{source}: 'threshold' must be null or a number in [0, 1]")
    for name in ("model_sha256", "prompt_fingerprint"):
        if not isinstance(doc.get(name), str) or not doc[name]:
            raise CalibrationError(f"{source}: {name!r} is missing")
    known = {"format", "method", "a", "b", "threshold", "model_sha256", "prompt_fingerprint"}
    return PlattCalibration(
        a=a,
        b=b,
        threshold=thr,
        model_sha256=doc["model_sha256"],
        prompt_fingerprint=doc["prompt_fingerprint"],
        info={k: v for k, v in doc.items() if k not in known},
    )


def read_calibration(path: Path) -> tuple[PlattCalibration, str]:
    """The calibration in ``path`` and the sha256 of the file's bytes (for fingerprints)."""
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise CalibrationError(f"cannot read calibration file {path}: {exc.strerror}") from None
    return parse_calibration(blob, str(path)), hashlib.sha256(blob).hexdigest()


def write_calibration(path: Path, cal: PlattCalibration) -> None:
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
