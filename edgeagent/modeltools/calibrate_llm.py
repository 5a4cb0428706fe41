"""``edgeagent calibrate`` for a ``llamacpp`` task: a calibrated confidence from the answer's
features, and the threshold that meets a target (numpy only).

1. Run the task's backend (without any calibration) over labelled examples
   ``{"text": ..., "output": {...}}`` (classify: also ``{"text": ..., "label": ...}``) and
   record per example the answer's features (``details["features"]``: the raw confidence,
   the least and mean value-token log-probability, the least margin to the runner-up
   token, the share of enum labels the input writes, ...), whether the answer equals the
   expected object exactly, and whether the backend failed (``schema_invalid``, or a value
   not in the input: always escalated).
2. ``method="features"`` (the default): fit an L2-regularised logistic regression on
   :data:`DEFAULT_FEATURES` of the answered examples (:func:`fit_logistic`; standardised
   features).  ``method="platt"``: ``p = sigmoid(a * logit(raw) + b)`` on the raw
   confidence alone (:func:`fit_platt`; Platt's smoothed targets, ``a >= 0``; the
   identity when every answer is right or every answer is wrong).
3. Choose the threshold for ``--target-precision`` or ``--target-escalation`` on the
   *cross-validated* confidences (each example scored by a fit on the other folds,
   :func:`out_of_fold`) once there are 20 answered examples: the in-sample ones are
   optimistic (a threshold chosen on them for 95 % gave 84 % on unseen lines).  Print
   the curve and the ECE before/after, and write the calibration file
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeagent.backends.calibration import (
    FEATURES_VERSION,
    Calibration,
    FeatureCalibration,
    PlattCalibration,
    logit,
    write_calibration,
)
from edgeagent.heads.curves import (
    choose_threshold,
    ece,
    escalation_curve,
    escalation_for,
    format_curve,
)
from edgeagent.inputs import model_input
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
    failed: bool  # no answer (schema_invalid, ungrounded): always escalated
    features: dict[str, float] = field(default_factory=dict)  # details["features"]


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
    """Each example's Platt-calibrated confidence from a fit on the *other* folds (index
    mod ``folds``): an honest ECE after calibration, unlike the in-sample one."""
    rows = [{"raw": c} for c in raw]
    return out_of_fold_features(rows, correct, ("raw",), "platt", folds)


def out_of_fold_features(
    rows: Sequence[dict[str, float]],
    correct: Sequence[bool],
    names: Sequence[str],
    method: str,
    folds: int = 5,
) -> list[float]:
    """:func:`out_of_fold` for either method, on feature rows."""
    out = [0.0] * len(rows)
    for k in range(folds):
        train = [i for i in range(len(rows)) if i % folds != k]
        cal = fit_calibration([rows[i] for i in train], [correct[i] for i in train], names, method)
        for i in range(k, len(rows), folds):
            out[i] = cal.apply_features(rows[i])
    return out


DEFAULT_FEATURES = ("min_lp", "mean_lp", "min_margin", "closed_in_input")
"""What ``method="features"`` fits on: the least likely value token (one doubtful digit),
the mean (a whole answer the model is unsure of), the least margin to the runner-up token
(two candidates nearly tied: the old value or the new), and whether the enum labels the
model chose are written in the input (a unit it guessed)."""
L2 = 1.0
"""Ridge penalty of :func:`fit_logistic` on the standardised weights (not the bias)."""


def fit_logistic(
    x: Sequence[Sequence[float]], correct: Sequence[bool], l2: float = L2
) -> tuple[list[float], float, list[float], list[float]]:
    """``(weights, bias, mean, scale)`` of ``P(correct) = sigmoid(bias + w . (x - mean) /
    scale)`` minimising the L2-penalised negative log-likelihood (Newton's method; the
    penalty keeps separable data finite).  A constant feature gets scale 1 and weight 0.
    With nothing to learn (all right, all wrong, none) the weights are 0 and the bias
    gives the smoothed base rate."""
    import numpy as np

    y = np.asarray(correct, dtype=np.float64)
    xs = np.asarray(x, dtype=np.float64).reshape(len(y), -1)
    d = xs.shape[1]
    mean = xs.mean(axis=0) if len(y) else np.zeros(d)
    scale = xs.std(axis=0) if len(y) else np.ones(d)
    scale = np.where(scale > 1e-9, scale, 1.0)
    n_pos = float(y.sum())
    bias0 = math.log((n_pos + 1.0) / (len(y) - n_pos + 1.0))
    if n_pos == 0 or n_pos == len(y):
        return [0.0] * d, bias0, mean.tolist(), scale.tolist()
    z = np.hstack([(xs - mean) / scale, np.ones((len(y), 1))])
    w = np.zeros(d + 1)
    w[-1] = bias0
    penalty = np.eye(d + 1) * l2
    penalty[-1, -1] = 0.0
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(z @ w)))
        g = z.T @ (p - y) + penalty @ w
        if float(np.abs(g).max()) < 1e-10:
            break
        h = (z * (p * (1.0 - p))[:, None]).T @ z + penalty + 1e-9 * np.eye(d + 1)
        w = w - np.linalg.solve(h, g)
    return [float(v) for v in w[:-1]], float(w[-1]), mean.tolist(), scale.tolist()


def fit_calibration(
    rows: Sequence[dict[str, float]],
    correct: Sequence[bool],
    names: Sequence[str],
    method: str,
    model_sha256: str = "",
    prompt_fingerprint: str = "",
) -> Calibration:
    """A calibration (no threshold yet) fitted on feature ``rows``."""
    if method == "platt":
        a, b = fit_platt([r["raw"] for r in rows], correct)
        return PlattCalibration(a, b, None, model_sha256, prompt_fingerprint)
    if method != "features":
        raise ValueError(f"unknown calibration method {method!r} (features or platt)")
    weights, bias, mean, scale = fit_logistic([[r[n] for n in names] for r in rows], correct)
    return FeatureCalibration(
        features=tuple(names),
        weights=tuple(weights),
        bias=bias,
        mean=tuple(mean),
        scale=tuple(scale),
        features_version=FEATURES_VERSION,
        threshold=None,
        model_sha256=model_sha256,
        prompt_fingerprint=prompt_fingerprint,
    )


def run_examples(
    backend: LlamaCppBackend, examples: Sequence[Example], log: Callable[[str], None] = print
) -> list[Record]:
    """Answer each example with the (uncalibrated) backend; one record per example."""
    records: list[Record] = []
    t0 = time.monotonic()
    for i, (text, expected) in enumerate(examples, 1):
        [pred] = backend.infer_batch([model_input(text)])  # what the daemon feeds the model
        failed = pred.output is None or pred.reason == "schema_invalid"
        raw_features = pred.details.get("features")
        features = (
            {k: float(v) for k, v in raw_features.items() if isinstance(v, int | float)}
            if isinstance(raw_features, dict)
            else {"raw": pred.confidence}
        )
        correct = not failed and pred.output == expected
        records.append(Record(pred.confidence, correct, failed, features))
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
    method: str = "features",
    features: Sequence[str] = DEFAULT_FEATURES,
    records: Sequence[Record] | None = None,
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
    names = ("raw",) if method == "platt" else tuple(features)
    backend = LlamaCppBackend(task_name, _uncalibrated(task))
    if records is None:  # (tests and benchmarks may pass the records of an earlier run)
        log(f"running task {task_name!r} on {len(examples)} labelled examples")
        backend.load()
        try:
            records = run_examples(backend, examples, log)
        finally:
            backend.close()
    answered = [r for r in records if not r.failed]
    missing = sorted({n for r in answered for n in names if n not in r.features})
    if missing:
        raise ValueError(f"the backend reported no feature {', '.join(missing)}")
    rows = [r.features for r in answered]
    ok_list = [r.correct for r in answered]
    cal = fit_calibration(
        rows, ok_list, names, method, backend.model_sha256, backend.prompt_fingerprint
    )
    fitted = [cal.apply_features(f) for f in rows]
    cross = len(answered) >= 20  # enough for 5 folds of 4: choose the threshold on them
    oof = out_of_fold_features(rows, ok_list, names, method) if len(answered) >= 10 else None
    chosen_on = oof if cross and oof is not None else fitted
    scores = iter(chosen_on)
    calibrated = [0.0 if r.failed else next(scores) for r in records]
    points = escalation_curve(calibrated, [r.correct for r in records], [r.failed for r in records])
    point, threshold, goal = choose_threshold(points, target_escalation, target_precision)
    ok = np.array(ok_list, dtype=bool)
    before = np.array([r.raw for r in answered], dtype=np.float32)
    after = np.array(fitted, dtype=np.float32)
    params = (
        {"a": cal.a, "b": cal.b}
        if isinstance(cal, PlattCalibration)
        else {"features": list(names), "weights": list(cal.weights), "bias": cal.bias}
    )
    result: dict[str, Any] = {
        "goal": goal,
        "threshold": threshold,
        "method": method,
        "threshold_chosen_on": "5-fold cross-validated confidences" if cross else "in-sample",
        **params,
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
    if oof is not None:
        result["ece_after_cv"] = ece(np.array(oof, dtype=np.float32), ok)
    log(format_curve(points))
    ece_text = "no answers"
    if answered:
        ece_text = f"ECE {result['ece_before']:.4f} -> {result['ece_after']:.4f}"
    if result["ece_after_cv"] is not None:
        ece_text += f" (5-fold cross-validated {result['ece_after_cv']:.4f})"
    fit_text = (
        f"Platt a={cal.a:.4f} b={cal.b:.4f}"
        if isinstance(cal, PlattCalibration)
        else "logistic on "
        + ", ".join(f"{n} {w:+.3f}" for n, w in zip(names, cal.weights, strict=True))
        + f" (standardised), bias {cal.bias:+.3f}"
    )
    log(
        f"{fit_text}; {ece_text} on {len(answered)} answered "
        f"({result['failed']} failed, local-only accuracy {result['local_only_accuracy']:.2%})"
    )
    log(
        f"{goal}: threshold {threshold:.4f} -> escalate {point.escalation:.1%}, overall "
        f"{point.accuracy:.2%}, local {point.local_accuracy:.2%} on {len(records)} examples"
        + (" (cross-validated)" if cross else "")
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
