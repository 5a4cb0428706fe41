"""Confidence calibration and escalation thresholds (numpy only).

* :func:`fit_temperature` – temperature scaling (one scalar, minimises held-out NLL).
* :func:`ece` – expected calibration error (equal-width bins).
* :func:`escalation_curve` – with a perfect cloud, the overall accuracy reached when the
  least-confident fraction of jobs is escalated (inputs flagged ``out_of_scope`` are always
  escalated first).
* :func:`calibrate_bundle` – ``edgeagent calibrate``: run a classifier bundle over held-out
  examples and store the threshold that meets a target escalation rate or local precision.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeagent.backends.onnx import Head, OnnxEncoder, predict
from edgeagent.bundle import read_manifest, write_manifest
from edgeagent.heads.curves import (
    OOS_REASON,
    choose_threshold,
    curve_from_predictions,
    ece,
    escalation_for,
    format_curve,
    is_correct,
)
from edgeagent.router import confidently_out_of_scope

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    FloatArray = npt.NDArray[np.float32]
    IntArray = npt.NDArray[np.int64]


def calibrate_bundle(
    bundle: Path,
    examples: list[tuple[str, str]],
    *,
    target_escalation: float | None = None,
    target_precision: float | None = None,
    max_length: int = 128,
    threads: int = 1,
    write: bool = True,
    log: Any = print,
    target_accuracy: tuple[float, ...] = (0.98, 0.99),
    oos_distance: bool | None = None,
    out_of_scope: str = "escalate",
) -> dict[str, Any]:
    """Pick the confidence threshold on held-out ``examples`` and store it in the bundle's
    ``calibration.json`` (re-hashing the manifest, so the fingerprint changes).  Also
    reports, with a perfect cloud, the escalation needed for each overall accuracy in
    ``target_accuracy`` (``result["escalation_for"]``, keyed by the accuracy as text).
    ``oos_distance`` is the task's setting (see :func:`predict`); ``out_of_scope`` its
    policy: with ``decline``, confidently out-of-scope examples stay local (right when
    labelled with the bundle's out-of-scope label)."""
    import numpy as np

    if (target_escalation is None) == (target_precision is None):
        raise ValueError("give exactly one of target_escalation or target_precision")
    manifest = read_manifest(bundle, kind="classifier")
    head = Head.from_bundle(bundle)
    encoder = OnnxEncoder(
        bundle / "model.onnx",
        bundle / "tokenizer.json",
        max_length=max_length,
        intra_op_threads=threads,
    )
    emb = encoder.embed_many([t for t, _ in examples])
    preds = predict(head, emb, oos_distance=oos_distance, use_threshold=False)
    truths = [lb for _, lb in examples]
    decline_label = head.oos_label if out_of_scope == "decline" else None
    points = curve_from_predictions(preds, truths, decline_label=decline_label)
    point, threshold, goal = choose_threshold(points, target_escalation, target_precision)
    confs = np.array([p.confidence for p in preds], dtype=np.float32)
    ok = np.array([is_correct(p, t) for p, t in zip(preds, truths, strict=True)])
    result: dict[str, Any] = {
        "goal": goal,
        "threshold": threshold,
        "examples": len(examples),
        "escalation": point.escalation,
        "overall_accuracy": point.accuracy,
        "local_accuracy": point.local_accuracy,
        "local_only_accuracy": float(ok.mean()),
        "ece": ece(confs, ok),
        "escalation_for_98": escalation_for(points, 0.98).escalation,
        "escalation_for_99": escalation_for(points, 0.99).escalation,
        "flagged_out_of_scope": sum(p.reason == OOS_REASON for p in preds) / len(preds),
        "out_of_scope": out_of_scope,
        "declined_out_of_scope": (
            sum(confidently_out_of_scope(p) for p in preds) / len(preds)
            if decline_label is not None
            else 0.0
        ),
        "escalation_for": {},
    }
    log(format_curve(points))
    log(
        f"{goal}: threshold {threshold:.4f} -> escalate {point.escalation:.1%}, overall "
        f"{point.accuracy:.2%}, local {point.local_accuracy:.2%} on {len(examples)} examples"
    )
    for target in target_accuracy:
        p = escalation_for(points, target)
        result["escalation_for"][f"{target:g}"] = {
            "escalation": p.escalation,
            "threshold": 1.0 if math.isinf(p.threshold) else float(p.threshold),
            "reached": p.accuracy >= target - 1e-12,
        }
        log(
            f"for {target:.1%} overall accuracy (perfect cloud): escalate {p.escalation:.1%} "
            f"(threshold {result['escalation_for'][f'{target:g}']['threshold']:.4f}; local-only "
            f"accuracy {result['local_only_accuracy']:.2%}, flagged out of scope "
            f"{result['flagged_out_of_scope']:.1%}"
            + (
                f", declined {result['declined_out_of_scope']:.1%}"
                if decline_label is not None
                else ""
            )
            + ")"
        )
    if write:
        result["fingerprint"] = store_threshold(bundle, manifest, threshold, result, log)
    return result


def store_threshold(
    bundle: Path, manifest: dict[str, Any], threshold: float, result: dict[str, Any], log: Any
) -> str:
    """Write the threshold (and how it was chosen) into the bundle's ``calibration.json``
    and re-hash the manifest; returns the new bundle fingerprint."""
    cal_path = bundle / "calibration.json"
    cal = json.loads(cal_path.read_text("utf-8"))
    cal["threshold"] = threshold
    cal["threshold_calibration"] = result
    cal_path.write_text(json.dumps(cal, indent=2, sort_keys=True) + "\n", "utf-8")
    files = list(manifest["files"])
    base = {k: v for k, v in manifest.items() if k not in ("files", "fingerprint", "format")}
    written = write_manifest(bundle, base, files)
    log(f"wrote threshold to {cal_path}; new bundle fingerprint {written['fingerprint'][:12]}")
    return str(written["fingerprint"])
