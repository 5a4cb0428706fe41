"""Which calibration split and threshold rule transfer to unseen slot values (issue 14).

    python benchmarks/tagger_value_split.py --train …/atis/train.jsonl \\
        --valid …/atis/validation.jsonl --out /tmp/atis-split
    edgeagent train atis_mixed --examples /tmp/atis-split/train.jsonl --no-intent \\
        --epochs 3 --held-out-by mixed --threads 1
    python benchmarks/tagger_calibration_splits.py --bundle models/bundles/atis_mixed/latest \\
        --split /tmp/atis-split

A tagger trained with ``--held-out-by mixed`` holds out sentences with unseen values
*and* random sentences.  This rebuilds that split (same seed), and for the whole split,
its random half and its value half fits what ``train`` fits (the frame calibrator,
cross-fitted) and chooses the threshold for ``--target`` frames on ``words`` and on the
calibrated confidence, by the cheapest point and by the 90 % bound
(:func:`bounded_threshold`); then measures each on the split's test files: overall frame
accuracy with a perfect cloud and escalation at that threshold, the escalation the
target needs, and the ECE.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import edgeagent.backends  # noqa: F401  (import order)
from edgeagent.backends.tagger import OnnxTaggerBackend
from edgeagent.config import TaskConfig
from edgeagent.heads.curves import escalation_for
from edgeagent.modeltools.tagger import (
    CALIBRATED,
    bounded_threshold,
    calibration_split,
    evaluate,
    fit_frame_calibrator,
    frame_correct,
    load_tagged_examples,
    tag_examples,
    value_held_out,
)

TESTS = ("test_values", "test_sentences", "test_other_values", "calibrate_values")


def _point_at(curve: list[Any], threshold: float) -> Any:
    best = None
    for p in curve:
        if p.threshold >= threshold and (best is None or p.threshold < best.threshold):
            best = p
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True, help="trained --held-out-by mixed")
    ap.add_argument("--split", type=Path, required=True, help="tagger_value_split.py --out")
    ap.add_argument("--held-out", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", type=float, default=0.97)
    args = ap.parse_args()
    examples = load_tagged_examples(args.split / "train.jsonl")
    held = calibration_split(examples, args.held_out, "mixed", args.seed, log=lambda *a: None)
    by_value = set(value_held_out(examples, args.held_out / 2, args.seed))
    parts = {
        f"mixed ({len(held)})": held,
        f"random half ({len(held) - len(by_value)})": [i for i in held if i not in by_value],
        f"value half ({len(by_value)})": sorted(by_value),
    }
    task = TaskConfig.model_validate(
        {"kind": "extract", "backend": {"type": "onnx", "bundle": str(args.bundle)}}
    )
    backend = OnnxTaggerBackend("bench", task)
    backend.load()
    model, decoder = backend.loaded()
    tagged = dict(
        zip(held, tag_examples(model, decoder, [examples[i][0] for i in held]), strict=True)
    )
    tests = {}
    for name in TESTS:
        path = args.split / f"{name}.jsonl"
        if path.is_file():
            rows = load_tagged_examples(path)
            tests[name] = ([t for _, t in rows], tag_examples(model, decoder, [w for w, _ in rows]))
    t = args.target
    for part, idx in parts.items():
        preds = [tagged[i] for i in idx]
        gold = [examples[i][1] for i in idx]
        cal, crossfit = fit_frame_calibrator(preds, frame_correct(preds, gold), seed=args.seed)
        ev = evaluate(preds, gold, decoder.tags, crossfit)
        rules = {
            (mode, rule): (
                escalation_for(ev.curves[mode], t)
                if rule == "cheapest"
                else bounded_threshold(ev.curves[mode], len(idx), t)
            ).threshold
            for mode in ("words", CALIBRATED)
            for rule in ("cheapest", "90% bound")
        }
        print(f"\n== calibrated on {part}: frame accuracy {ev.frame_accuracy:.1%} ==")
        print("| test | frames | needs (words / calibrated) | ECE (w / c) | " + " | ".join(
            f"{m} {r} {th:.3f}" for (m, r), th in rules.items()) + " |")  # fmt: skip
        for name, (g, p) in tests.items():
            conf = [0.0 if x is None or cal is None else cal.confidence(x) for x in p]
            tev = evaluate(p, g, decoder.tags, conf)
            cells = []
            for (mode, _), th in rules.items():
                pt = _point_at(tev.curves[mode], th)
                cells.append(
                    "all escalated" if pt is None else f"{pt.accuracy:.1%} @ {pt.escalation:.1%}"
                )
            print(
                f"| {name} | {len(g)} | {tev.escalation_for(t):.1%} / "
                f"{tev.escalation_for(t, CALIBRATED):.1%} | {tev.ece['words']:.3f} / "
                f"{tev.ece[CALIBRATED]:.3f} | " + " | ".join(cells) + " |"
            )
    backend.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
