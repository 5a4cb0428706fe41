"""SNIPS joint intent + slot model vs the tagger alone: frame accuracy and escalation.

    .venv/bin/edgeagent train snips --examples ../shared/datasets/snips/train.jsonl  # joint
    .venv/bin/edgeagent train snips-tags --no-intent --examples ../shared/datasets/snips/train.jsonl
    .venv/bin/python benchmarks/bench_joint.py --bundle models/bundles/snips/latest \
        [--baseline models/bundles/snips-tags/latest] \
        [--data ../shared/datasets/snips/validation.jsonl] [--goal 0.97:0.15]

Both bundles are loaded through the daemon's backend (``OnnxTaggerBackend``, INT8, one
input at a time) and evaluated on the validation file.  A frame is right when every slot
span is right and, for the joint model, the intent too (the tagger alone has no intent,
so its frame is the slots only: the comparison flatters the baseline).  For each
confidence (intent probability combined with the slots' ``words``/``spans``/``frame``
confidence by ``product`` or ``min``, and the bundle's frame calibrator, ``calibrated``)
the escalation a perfect cloud needs for 95/97/99 % frame accuracy and the ECE, with the
tags decoded freely and restricted to the predicted intent's slots (same logits), and
what the threshold ``train`` stored in the bundle gives.  Exit 1 when ``--goal`` is
missed with what the runtime uses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import edgeagent.backends  # noqa: F401  (import order)
from edgeagent.backends.tagger import JointTaggerModel, OnnxTaggerBackend
from edgeagent.config import TaskConfig
from edgeagent.modeltools.joint import (
    calibrated_confidences,
    evaluate_joint,
    load_intents,
    predict_joint,
)
from edgeagent.modeltools.tagger import (
    CALIBRATED,
    evaluate,
    load_tagged_examples,
    tag_examples,
)

REPO = Path(__file__).resolve().parent.parent


def _load(bundle: Path, threads: int) -> OnnxTaggerBackend:
    task = TaskConfig.model_validate(
        {
            "kind": "extract",
            "backend": {"type": "onnx", "bundle": str(bundle), "intra_op_threads": threads},
        }
    )
    backend = OnnxTaggerBackend("bench", task)
    backend.load()
    return backend


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True, help="joint tagger bundle")
    ap.add_argument("--baseline", type=Path, default=None, help="tagger-only bundle")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--goal", default="0.97:0.15", help="frame accuracy:max escalation")
    args = ap.parse_args()
    data = (
        args.data
        or Path(os.environ.get("EDGEAGENT_DATASETS") or REPO.parent / "shared/datasets")
        / "snips/validation.jsonl"
    )
    examples = load_tagged_examples(data)
    intents_gold = load_intents(data)
    words = [w for w, _ in examples]
    gold = [t for _, t in examples]
    target, max_esc = (float(x) for x in args.goal.split(":"))

    rows: list[tuple[str, str, float, float, float]] = []
    if args.baseline is not None:
        b = _load(args.baseline, args.threads)
        model, decoder = b.loaded()
        t0 = time.monotonic()
        ev = evaluate(tag_examples(model, decoder, words), gold, decoder.tags)
        ms = (time.monotonic() - t0) / len(words) * 1000
        print(
            f"baseline (tagger alone, {args.baseline}): slot F1 {ev.slot_f1:.2%}, "
            f"frame (slots only) {ev.frame_accuracy:.2%}, {ms:.1f} ms/input"
        )
        for mode in ev.curves:
            rows.append(
                (
                    "baseline",
                    mode,
                    ev.escalation_for(0.95, mode),
                    ev.escalation_for(0.97, mode),
                    ev.ece[mode],
                )
            )
        b.close()

    j = _load(args.bundle, args.threads)
    model, decoder = j.loaded()
    if not isinstance(model, JointTaggerModel):
        print(f"{args.bundle} has no intent head (no intents.json)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    outs = [model.joint_logits(w) for w in words]
    ms = (time.monotonic() - t0) / len(words) * 1000
    restricted = model.intent_slots
    cal = j.calibrator
    jev = None
    # decoding free (every slot) vs restricted to the predicted intent's slots (the bundle's
    # intent_slots), on the same logits
    for name, slots in (("joint, free decoding", None), ("joint", restricted)):
        if name == "joint" or restricted is not None:
            model.intent_slots = slots
            tagged, probs = predict_joint(model, decoder, words, outs)
            conf = None if cal is None else calibrated_confidences(cal, tagged, probs)
            jev = evaluate_joint(
                tagged, probs, gold, intents_gold, model.intents, decoder.tags, conf
            )
            print(
                f"{name} ({args.bundle}): intent accuracy {jev.intent_accuracy:.2%}, slot F1 "
                f"{jev.slot_f1:.2%}, slot frames {jev.slot_frame_accuracy:.2%}, frames "
                f"(intent + slots) {jev.frame_accuracy:.2%}, {ms:.1f} ms/input; bundle "
                f"combines by {model.combine!r}"
                + ("" if name != "joint" or slots is None else "; slots of the intent only")
            )
            for mode in jev.curves:
                rows.append(
                    (
                        name,
                        mode,
                        jev.escalation_for(0.95, mode),
                        jev.escalation_for(0.97, mode),
                        jev.ece[mode],
                    )
                )
    assert jev is not None
    j.close()
    print("\n| model | confidence | esc. for 95 % | esc. for 97 % | ECE |")
    print("|---|---|---|---|---|")
    for name, mode, e95, e97, ece_v in rows:
        print(f"| {name} | {mode} | {e95:.1%} | {e97:.1%} | {ece_v:.4f} |")
    chosen = CALIBRATED if cal is not None else f"{model.combine}/{j.config.tagger_confidence}"
    esc = jev.escalation_for(target, chosen)
    ok = esc <= max_esc
    metrics = json.loads((args.bundle / "metrics.json").read_text("utf-8"))
    printed = metrics.get("printed_threshold_97")
    if printed is not None:
        at = [p for p in jev.curves[chosen] if p.threshold >= printed]
        point = min(at, key=lambda p: p.threshold) if at else None
        print(
            f"threshold train stored ({printed:.4f}, answered frames 97 % with 90 % "
            f"confidence on its held-out): "
            + (
                "everything escalated"
                if point is None
                else f"{point.accuracy:.2%} frames at {point.escalation:.1%} escalated "
                f"(local {point.local_accuracy:.2%})"
            )
        )
    print(
        f"\ngoal {target:.0%} frames at <= {max_esc:.0%} escalation with {chosen}: "
        f"{esc:.1%} -> {'met' if ok else 'MISSED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
