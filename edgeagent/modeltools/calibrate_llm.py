"""``edgeagent calibrate`` for a ``llamacpp`` task: Platt scaling of the token-probability
confidence, and the threshold that meets a target (numpy only).

1. Run the task's backend (without any calibration) over labelled examples
   ``{"text": ..., "output": {...}}`` (classify: also ``{"text": ..., "label": ...}``) and
   record per example the raw confidence, whether the answer equals the expected object
   exactly, and whether the backend failed (``schema_invalid``: always escalated).
2. Fit ``p = sigmoid(a * logit(raw) + b)`` on the answered examples by minimising the
   negative log-likelihood (:func:`fit_platt`; Platt's smoothed targets, so a perfectly
   separable set still gives finite parameters; ``a >= 0``, so the mapping is monotone).
   The identity when every answer is right or every answer is wrong (nothing to learn).
3. Choose the threshold on the calibrated confidence for ``--target-precision`` or
   ``--target-escalation`` (the same curve as the classifier's, failures escalated first),
   print the curve and the ECE before/after, and write the calibration file
   (:mod:`edgeagent.backends.calibration`) that ``calibration = FILE`` loads.

Correctness is exact equality of the JSON values (``21.5 == 21.50``, ``"th-12" != "TH-12"``).
The ECE is computed over the answered examples (failures carry no confidence); besides
the in-sample ECE after the fit, a 5-fold cross-validated one (:func:`out_of_fold`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeagent.backends.calibration import PlattCalibration, logit, write_calibration
from edgeagent.inputs import model_input
from edgeagent.modeltools.calibrate import (
    choose_threshold,
    ece,
    escalation_curve,
    escalation_for,
    format_curve,
)
from edgeagent.modeltools.train import ExamplesError, json_lines

if TYPE_CHECKING:
    from edgeagent.backends.llamacpp import LlamaCppBackend
    from edgeagent.config import TaskConfig

Example = tuple[str, dict[str, Any]]
"""An input text and the exact answer object expected for it."""


@dataclass(frozen=True, slots=True)
class Record:
    """What the uncalibrated backend did with one labelled example."""

    raw: float  # raw confidence (0.0 when failed)
    correct: bool  # answer == expected object
    failed: bool  # no answer (schema_invalid): always escalated


def load_labelled(path: Path, kind: str) -> list[Example]:
    """Labelled JSON lines -> ``[(text, expected object)]``; blank lines skipped.

    ``{"text": str, "output": object}`` for every kind; classify also takes
    ``{"text": str, "label": str}`` or ``"output": "label"`` (-> ``{"label": ...}``).
    """
    shape = '{"text": str, "output": {...}}' + (
        ' or {"text": str, "label": str}' if kind == "classify" else ""
    )
    out: list[Example] = []
    for no, row in json_lines(path):
        expected = row.get("output", row.get("label")) if isinstance(row, dict) else None
        if kind == "classify" and isinstance(expected, str) and expected:
            expected = {"label": expected}
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            expected = None
        if not isinstance(expected, dict):
            raise ExamplesError(f"{path}:{no}: expected {shape}")
        out.append((row["text"], expected))
    if not out:
        raise ExamplesError(f"{path}: no examples")
    return out


def fit_platt(raw: Sequence[float], correct: Sequence[bool]) -> tuple[float, float]:
    """``(a, b)`` of ``P(correct) = sigmoid(a * logit(raw) + b)`` minimising the NLL.

    Newton's method with backtracking on Platt's smoothed targets ((N+ + 1)/(N+ + 2) and
    1/(N- + 2)), as in Lin, Lin & Weng (2007).  ``a`` is kept >= 0: a set on which the
    raw confidence is anti-correlated with correctness gets the constant base rate.
    ``(1, 0)`` — the identity — when all are correct, all wrong, or there are none.
    """
    import numpy as np

    y = np.asarray(correct, dtype=bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return 1.0, 0.0
    x = np.array([logit(c) for c in raw], dtype=np.float64)
    t = np.where(y, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))

    def loss(a: float, b: float) -> float:
        z = a * x + b
        # -[t log s(z) + (1 - t) log(1 - s(z))] = log(1 + e^z) - t z, computed stably
        return float((np.logaddexp(0.0, z) - t * z).sum())

    a, b = 0.0, math.log((n_pos + 1.0) / (n_neg + 1.0))
    f = loss(a, b)
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(a * x + b)))
        d = p - t
        g = np.array([float((d * x).sum()), float(d.sum())])
        if float(np.abs(g).max()) < 1e-10:
            break
        w = p * (1.0 - p)
        h = np.array(
            [[float((w * x * x).sum()) + 1e-12, float((w * x).sum())],
             [float((w * x).sum()), float(w.sum()) + 1e-12]]
        )  # fmt: skip
        da, db = np.linalg.solve(h, -g)
        step = 1.0
        while step >= 1e-10:
            na, nb = a + step * float(da), b + step * float(db)
            nf = loss(na, nb)
            if nf < f + 1e-4 * step * float(g @ np.array([da, db])):
                break
            step /= 2
        else:
            break  # no decrease along the Newton direction: at the optimum (numerically)
        a, b, f = na, nb, nf
    if a < 0.0:
        a = 0.0
        mean = float(t.mean())
        b = math.log(mean / (1.0 - mean))
    return a, b


def out_of_fold(raw: Sequence[float], correct: Sequence[bool], folds: int = 5) -> list[float]:
    """Each example's calibrated confidence from a fit on the *other* folds (index mod
    ``folds``): an honest ECE after calibration, unlike the in-sample one."""
    out = [0.0] * len(raw)
    for k in range(folds):
        train = [i for i in range(len(raw)) if i % folds != k]
        a, b = fit_platt([raw[i] for i in train], [correct[i] for i in train])
        cal = PlattCalibration(a, b, None, "", "")
        for i in range(k, len(raw), folds):
            out[i] = cal.apply(raw[i])
    return out


def run_examples(
    backend: LlamaCppBackend, examples: Sequence[Example], log: Callable[[str], None] = print
) -> list[Record]:
    """Answer each example with the (uncalibrated) backend; one record per example."""
    records: list[Record] = []
    t0 = time.monotonic()
    for i, (text, expected) in enumerate(examples, 1):
        [pred] = backend.infer_batch([model_input(text)])  # what the daemon feeds the model
        failed = pred.output is None or pred.reason == "schema_invalid"
        records.append(Record(pred.confidence, not failed and pred.output == expected, failed))
        if i % 20 == 0 or i == len(examples):
            log(f"  {i}/{len(examples)} examples ({time.monotonic() - t0:.0f} s)")
    return records


def _uncalibrated(task: TaskConfig) -> TaskConfig:
    """The same task without a calibration (the fit needs raw confidences)."""
    backend = task.backend.model_copy(update={"calibration": None})
    return task.model_copy(update={"backend": backend})


def calibrate_llamacpp(
    task_name: str,
    task: TaskConfig,
    examples: Sequence[Example],
    *,
    target_escalation: float | None = None,
    target_precision: float | None = None,
    out: Path | None = None,
    info: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fit the calibration of ``task`` on ``examples`` and write it to ``out`` (unless
    None).  Returns the figures (threshold, ECE before/after, escalation, accuracies).
    Raises BackendError when the model cannot be loaded."""
    import numpy as np

    from edgeagent.backends.llamacpp import LlamaCppBackend, LlamaCppBackendConfig

    if (target_escalation is None) == (target_precision is None):
        raise ValueError("give exactly one of target_escalation or target_precision")
    if not isinstance(task.backend, LlamaCppBackendConfig):
        raise ValueError(f"task {task_name!r} does not use the llamacpp backend")
    if task.kind == "generate":
        raise ValueError(f"task {task_name!r}: generate tasks are not calibrated")
    backend = LlamaCppBackend(task_name, _uncalibrated(task))
    log(f"running task {task_name!r} on {len(examples)} labelled examples")
    backend.load()
    try:
        records = run_examples(backend, examples, log)
    finally:
        backend.close()
    answered = [r for r in records if not r.failed]
    a, b = fit_platt([r.raw for r in answered], [r.correct for r in answered])
    cal = PlattCalibration(a, b, None, backend.model_sha256, backend.prompt_fingerprint)
    # The threshold is chosen on exactly the values the backend will report (same function).
    calibrated = [0.0 if r.failed else cal.apply(r.raw) for r in records]
    points = escalation_curve(calibrated, [r.correct for r in records], [r.failed for r in records])
    point, threshold, goal = choose_threshold(points, target_escalation, target_precision)
    ok = np.array([r.correct for r in answered], dtype=bool)
    before = np.array([r.raw for r in answered], dtype=np.float32)
    after = np.array([cal.apply(r.raw) for r in answered], dtype=np.float32)
    result: dict[str, Any] = {
        "goal": goal,
        "threshold": threshold,
        "a": a,
        "b": b,
        "examples": len(records),
        "failed": len(records) - len(answered),
        "escalation": point.escalation,
        "overall_accuracy": point.accuracy,
        "local_accuracy": point.local_accuracy,
        "local_only_accuracy": sum(r.correct for r in records) / len(records),
        "ece_before": ece(before, ok) if len(answered) else None,
        "ece_after": ece(after, ok) if len(answered) else None,
        "ece_after_cv": None,
        "escalation_for_95": escalation_for(points, 0.95).escalation,
        "escalation_for_99": escalation_for(points, 0.99).escalation,
    }
    if len(answered) >= 10:
        oof = out_of_fold([r.raw for r in answered], [r.correct for r in answered])
        result["ece_after_cv"] = ece(np.array(oof, dtype=np.float32), ok)
    log(format_curve(points))
    ece_text = "no answers"
    if answered:
        ece_text = f"ECE {result['ece_before']:.4f} -> {result['ece_after']:.4f}"
    if result["ece_after_cv"] is not None:
        ece_text += f" (5-fold cross-validated {result['ece_after_cv']:.4f})"
    log(
        f"Platt a={a:.4f} b={b:.4f}; {ece_text} on {len(answered)} answered "
        f"({result['failed']} failed, local-only accuracy {result['local_only_accuracy']:.2%})"
    )
    log(
        f"{goal}: threshold {threshold:.4f} -> escalate {point.escalation:.1%}, overall "
        f"{point.accuracy:.2%}, local {point.local_accuracy:.2%} on {len(records)} examples"
    )
    if math.isinf(point.threshold):
        log(
            "warning: only escalating every answer meets the target on these examples; "
            "improve the prompt (few-shot examples) or the model, or relax the target"
        )
    if out is not None:
        blob = json.dumps(list(examples), sort_keys=True).encode()
        cal = replace(
            cal,
            threshold=threshold,
            info={
                "task": task_name,
                "kind": task.kind,
                "model": str(task.backend.model),
                "confidence": task.backend.confidence,
                "examples_sha256": hashlib.sha256(blob).hexdigest(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "metrics": result,
                **(info or {}),
            },
        )
        write_calibration(out, cal)
        result["path"] = str(out)
        log(f"wrote calibration to {out}")
    return result
