"""Confidence calibration and escalation curves (numpy only).

* :func:`fit_temperature` – temperature scaling (one scalar, minimises held-out NLL).
* :func:`ece` – expected calibration error (equal-width bins).
* :func:`escalation_curve` – with a perfect cloud, the overall accuracy reached when the
  least-confident fraction of jobs is escalated (inputs flagged ``out_of_scope`` are always
  escalated first).

``edgeagent calibrate`` (:mod:`edgeagent.modeltools.calibrate`) and the refit's promotion
gate both read these curves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeagent.router import confidently_out_of_scope

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from edgeagent.backends.base import Prediction

    FloatArray = npt.NDArray[np.float32]
    IntArray = npt.NDArray[np.int64]

OOS_REASON = "out_of_scope"


def nll(logits: FloatArray, y: IntArray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true classes under ``softmax(logits / T)``."""
    import numpy as np

    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def fit_temperature(logits: FloatArray, y: IntArray) -> float:
    """The temperature T > 0 minimising held-out NLL (golden-section search on log T)."""
    lo, hi = math.log(0.02), math.log(50.0)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(logits, y, math.exp(a)), nll(logits, y, math.exp(b))
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(logits, y, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(logits, y, math.exp(b))
    return math.exp((lo + hi) / 2)


def ece(confidence: FloatArray, correct: npt.NDArray[np.bool_], bins: int = 15) -> float:
    """Expected calibration error: sum over equal-width confidence bins of
    ``|accuracy - mean confidence| * fraction of samples``."""
    import numpy as np

    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    n = len(confidence)
    for i in range(bins):
        upper = confidence <= edges[i + 1] if i == bins - 1 else confidence < edges[i + 1]
        sel = (confidence >= edges[i]) & upper
        if sel.any():
            gap = abs(float(correct[sel].mean()) - float(confidence[sel].mean()))
            total += gap * float(sel.sum()) / n
    return total


@dataclass(frozen=True)
class CurvePoint:
    """Escalate every prediction with confidence below ``threshold`` (and every flagged one)."""

    threshold: float
    escalation: float  # fraction of jobs sent to the cloud
    accuracy: float  # overall, escalated ones counted correct (perfect cloud)
    local_accuracy: float  # accuracy of the jobs answered locally
    local: int  # how many answered locally


def escalation_curve(
    confidence: list[float],
    correct: list[bool],
    forced: list[bool],
    declined: list[bool] | None = None,
) -> list[CurvePoint]:
    """All operating points, from "escalate only the flagged ones" to "escalate everything".

    Jobs are escalated in order: ``forced`` (out_of_scope) first, then by ascending
    confidence.  Ties in confidence move together, so each point is reachable with a
    threshold ``confidence >= threshold`` answered locally.  ``declined`` jobs (confidently
    out of scope, a task with ``out_of_scope = "decline"``) are never escalated: they are
    answered locally at every point, right or wrong as ``correct`` says.
    """
    n = len(confidence)
    if n == 0:
        return []
    declined = declined or [False] * n
    rows = list(zip(confidence, correct, forced, declined, strict=True))
    cand = sorted((c, ok) for c, ok, f, d in rows if not f and not d)
    n_declined = sum(1 for *_, d in rows if d)
    n_forced = n - len(cand) - n_declined
    declined_correct = sum(ok for _, ok, _, d in rows if d)
    local_correct = sum(ok for _, ok in cand) + declined_correct
    points: list[CurvePoint] = []
    i = 0
    while True:
        local = len(cand) - i + n_declined
        threshold = cand[i][0] if i < len(cand) else math.inf
        points.append(
            CurvePoint(
                threshold=threshold,
                escalation=(n_forced + i) / n,
                accuracy=(local_correct + n_forced + i) / n,
                local_accuracy=local_correct / local if local else 1.0,
                local=local,
            )
        )
        if i >= len(cand):
            break
        j = i
        while j < len(cand) and cand[j][0] == cand[i][0]:
            local_correct -= cand[j][1]
            j += 1
        i = j
    return points


def weighted_escalation(
    conf: Any, right: Any, forced: Any, declined: Any, w: Any, target: float
) -> float:
    """:func:`escalation_curve` with row weights ``w`` (numpy arrays), read at ``target``:
    the least share of weight escalated for ``target`` overall accuracy with a perfect
    cloud.  ``forced`` rows always escalate, ``declined`` rows (None: none) stay local
    (right as ``right`` says), the rest escalate by ascending ``conf`` (ties move
    together)."""
    import numpy as np

    if declined is None:
        declined = np.zeros_like(forced)

    total = float(w.sum())
    base = float(w[forced].sum()) + float((w * right)[declined].sum())
    cand = ~forced & ~declined
    order = np.argsort(conf[cand], kind="stable")
    c, r, ww = conf[cand][order], right[cand][order], w[cand][order]
    cw = np.concatenate([[0.0], np.cumsum(ww)])
    cr = np.concatenate([[0.0], np.cumsum(ww * r)])
    acc = (base + cw + (cr[-1] - cr)) / total
    valid = np.ones(len(c) + 1, dtype=bool)
    valid[1:-1] = c[1:] != c[:-1]
    ok = valid & (acc >= target - 1e-12)
    i = int(np.argmax(ok)) if ok.any() else len(c)
    return (float(w[forced].sum()) + float(cw[i])) / total


def escalation_for(points: list[CurvePoint], target_accuracy: float) -> CurvePoint:
    """The cheapest point whose overall accuracy reaches ``target_accuracy``."""
    for p in points:
        if p.accuracy >= target_accuracy - 1e-12:
            return p
    return points[-1]


def threshold_for_escalation(points: list[CurvePoint], rate: float) -> CurvePoint:
    """The most local answers whose escalation rate stays at or below ``rate`` (the forced
    out_of_scope ones always count)."""
    best = points[0]
    for p in points:
        if p.escalation <= rate + 1e-12:
            best = p
    return best


def threshold_for_precision(points: list[CurvePoint], precision: float) -> CurvePoint:
    """The lowest threshold whose local answers are at least ``precision`` accurate."""
    for p in points:
        if p.local_accuracy >= precision - 1e-12:
            return p
    return points[-1]


def choose_threshold(
    points: list[CurvePoint],
    target_escalation: float | None,
    target_precision: float | None,
    accuracy: str = "local precision",
) -> tuple[CurvePoint, float, str]:
    """The operating point for the one target given, its threshold (1.0 when only
    escalating everything meets it) and the goal in words (``accuracy`` names what the
    precision target measures)."""
    if (target_escalation is None) == (target_precision is None):
        raise ValueError("give exactly one of target_escalation or target_precision")
    if target_escalation is not None:
        point = threshold_for_escalation(points, target_escalation)
        goal = f"escalation <= {target_escalation:.1%}"
    else:
        assert target_precision is not None
        point = threshold_for_precision(points, target_precision)
        goal = f"{accuracy} >= {target_precision:.1%}"
    threshold = 1.0 if math.isinf(point.threshold) else float(point.threshold)
    return point, threshold, goal


def is_correct(pred: Prediction, truth: str) -> bool:
    return pred.output is not None and pred.output.get("label") == truth


def curve_from_predictions(
    preds: list[Prediction], truths: list[str], decline_label: str | None = None
) -> list[CurvePoint]:
    """The escalation curve of ``preds`` against ``truths``.  ``decline_label``: the task
    declines confidently out-of-scope inputs (``out_of_scope = "decline"``, see
    :func:`edgeagent.router.confidently_out_of_scope`): those stay local, right exactly
    when the truth is ``decline_label`` (the out-of-scope label)."""
    declined = [decline_label is not None and confidently_out_of_scope(p) for p in preds]
    return escalation_curve(
        [p.confidence for p in preds],
        [
            (t == decline_label) if d else is_correct(p, t)
            for p, t, d in zip(preds, truths, declined, strict=True)
        ],
        [p.reason == OOS_REASON and not d for p, d in zip(preds, declined, strict=True)],
        declined,
    )


def format_curve(points: list[CurvePoint], steps: int = 20) -> str:
    """A readable table of the curve, at most ``steps`` + 1 rows at even escalation steps."""
    lines = [f"{'escalate':>9} {'threshold':>9} {'overall':>8} {'local acc':>9}"]
    shown: set[int] = set()
    for k in range(steps + 1):
        target = k / steps
        idx = min(range(len(points)), key=lambda i: abs(points[i].escalation - target))
        if idx in shown:
            continue
        shown.add(idx)
        p = points[idx]
        thr = "all" if math.isinf(p.threshold) else f"{p.threshold:.4f}"
        lines.append(f"{p.escalation:>9.1%} {thr:>9} {p.accuracy:>8.2%} {p.local_accuracy:>9.2%}")
    return "\n".join(lines)
