"""Does the threshold ``train`` prints reach its target on unseen ATIS data?  Several splits
and seeds, each with a binomial interval (issue 14, item 6).

    for s in 1 2 3; do
      python benchmarks/tagger_value_split.py --train ../shared/datasets/atis/train.jsonl \\
          --valid ../shared/datasets/atis/validation.jsonl --out /tmp/atis-split$s --seed $s
      edgeagent train atis_s$s --examples /tmp/atis-split$s/train.jsonl --no-intent \\
          --epochs 3 --seed $s --threads 1
    done
    python benchmarks/tagger_threshold_seeds.py --cache /tmp/atis-logits \\
        --run /tmp/atis-split1:models/bundles/atis_s1/latest \\
        --run /tmp/atis-split2:models/bundles/atis_s2/latest ...

For each ``--run SPLIT:BUNDLE`` (a tagger trained on ``SPLIT/train.jsonl``), it rebuilds the
bundle's calibration split (the same fraction, kind and seed as its manifest), runs the
INT8 model on it and on the split's test files — ``test_values`` (sentences with city
names held out of training: unseen values) and ``test_sentences`` (the validation
sentences without them: unseen sentences) — once, cached under ``--cache``, and reruns
:func:`~edgeagent.modeltools.tagger.calibrate_held_out` (what ``train`` does after
training, with the code of this checkout) on the calibration logits.  At the threshold
it chooses (the one ``train`` prints and stores in the bundle), each test file's frame
accuracy with a perfect cloud is printed with its 95 % Wilson interval, with the
escalation it costs and the escalation the target needs on that file (the best a
threshold could do there).  With ``--check-bundle``, the bundle's stored threshold must
equal the recomputed one (a bundle trained by this checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import edgeagent.backends  # noqa: F401  (import order: the package before edgeagent.config)
from edgeagent.backends.tagger import job_confidence
from edgeagent.heads.curves import escalation_curve, escalation_for
from edgeagent.modeltools.tagger import (
    CALIBRATED,
    PRINTED_BOUND_Z,
    PRINTED_RULE,
    HeldOutCalibration,
    calibrate_held_out,
    calibration_backend,
    calibration_split,
    frame_correct,
    load_tagged_examples,
    offsets_of,
    stored_threshold,
    wilson_interval,
)

TESTS = ("test_values", "test_sentences")


def cached_logits(split: Path, bundle: Path, cache: Path) -> dict[str, Any]:
    """The bundle's INT8 logits on its calibration split and the split's test files."""
    manifest = json.loads((bundle / "manifest.json").read_text("utf-8"))
    key = f"{split.resolve().name}-{manifest['files']['model.onnx']['sha256'][:16]}.pkl"
    path = cache / key
    if path.is_file():
        return dict(pickle.loads(path.read_bytes()))
    tagger = manifest["tagger"]
    train = load_tagged_examples(split / "train.jsonl")
    held = calibration_split(
        train, tagger["held_out"], tagger["held_out_by"], tagger["seed"], log=lambda *a: None
    )
    sets = {"calibration": [train[i] for i in held]}
    sets |= {name: load_tagged_examples(split / f"{name}.jsonl") for name in TESTS}
    backend = calibration_backend(bundle, 1)
    try:
        model, decoder = backend.loaded()
        data: dict[str, Any] = {"tags": decoder.tags, "sets": {}}
        for name, rows in sets.items():
            data["sets"][name] = {
                "words": [w for w, _ in rows],
                "gold": [t for _, t in rows],
                "logits": [model.word_logits(w) for w, _ in rows],
            }
    finally:
        backend.close()
    cache.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(data))
    return data


def measure(
    data: dict[str, Any], seed: int, target: float, rule: str, z: float
) -> tuple[dict[str, Any], HeldOutCalibration]:
    """Recalibrate on the cached calibration split; each test file at the printed threshold."""
    tags = data["tags"]
    cal = data["sets"]["calibration"]
    held = calibrate_held_out(
        tags, cal["words"], cal["gold"], cal["logits"], seed=seed, target=target, rule=rule, z=z
    )
    threshold = held.printed.threshold
    out: dict[str, Any] = {
        "threshold": threshold,
        "calibration_sentences": len(cal["gold"]),
        "calibration_frames_right": held.evaluation.frame_accuracy,
        "calibration_escalation": held.printed.escalation,
    }
    for name in TESTS:
        s = data["sets"][name]
        tagged = [
            None if lg is None else held.decoder.tag(lg, offsets_of(ws))
            for ws, lg in zip(s["words"], s["logits"], strict=True)
        ]
        ok = frame_correct(tagged, s["gold"])
        conf = [
            0.0
            if t is None
            else (held.calibrator.confidence(t) if held.calibrator else job_confidence(t, "words"))
            for t in tagged
        ]
        answered = [t is not None and c >= threshold for t, c in zip(tagged, conf, strict=True)]
        wrong = sum(a and not o for a, o in zip(answered, ok, strict=True))
        n = len(ok)
        curve = escalation_curve(conf, ok, [t is None for t in tagged])
        out[name] = {
            "sentences": n,
            "frame_accuracy": (n - wrong) / n,
            "interval95": wilson_interval(n - wrong, n),
            "escalation": 1 - sum(answered) / n,
            "local_accuracy": sum(a and o for a, o in zip(answered, ok, strict=True))
            / max(1, sum(answered)),
            "wrong_answered": wrong,
            "needed_for_target": escalation_for(curve, target).escalation,
        }
    return out, held


def store(bundle: Path, held: HeldOutCalibration) -> None:
    """Write ``held`` into the bundle's ``calibration.json`` as ``train`` does (for a bundle
    trained before this checkout's calibration code; the weights do not depend on it)."""
    from edgeagent.bundle import read_manifest, write_manifest

    path = bundle / "calibration.json"
    cal = json.loads(path.read_text("utf-8"))
    cal.update(
        temperature=held.temperature,
        frame_calibrator=held.calibrator and held.calibrator.to_json(),
        **stored_threshold(held.printed, len(held.tagged), CALIBRATED),
    )
    path.write_text(json.dumps(cal, indent=2, sort_keys=True) + "\n", "utf-8")
    metrics_path = bundle / "metrics.json"
    metrics = json.loads(metrics_path.read_text("utf-8"))
    metrics.update(
        printed_threshold_97=cal["threshold"], printed_threshold_escalation=held.printed.escalation
    )
    metrics_path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", "utf-8")
    manifest = read_manifest(bundle, kind="tagger", verify=False)
    base = {k: v for k, v in manifest.items() if k not in ("files", "fingerprint", "format")}
    write_manifest(bundle, base, list(manifest["files"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run", action="append", required=True, help="SPLIT_DIR:BUNDLE_DIR")
    ap.add_argument("--cache", type=Path, required=True, help="logits cache directory")
    ap.add_argument("--target", type=float, default=0.97)
    ap.add_argument("--rule", choices=["local", "overall"], default=PRINTED_RULE)
    ap.add_argument("--z", type=float, default=PRINTED_BOUND_Z, help="one-sided bound's z")
    ap.add_argument("--check-bundle", action="store_true")
    ap.add_argument(
        "--store",
        action="store_true",
        help="write the recomputed calibration into each bundle, as train would have",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    results: dict[str, Any] = {}
    pooled = {name: [0, 0, 0] for name in TESTS}  # wrong, escalated, n
    print(
        f"| split (bundle seed) | threshold | calibration: sentences, frames right, escalated |"
        f" {' | '.join(f'{n}: frames [95 % CI] @ escalated (best possible)' for n in TESTS)} |"
    )
    print("|---|---|---|" + "---|" * len(TESTS))
    status = 0
    for run in args.run:
        split_s, bundle_s = run.split(":", 1)
        split, bundle = Path(split_s), Path(bundle_s).resolve()
        manifest = json.loads((bundle / "manifest.json").read_text("utf-8"))
        seed = int(manifest["tagger"]["seed"])
        data = cached_logits(split, bundle, args.cache)
        r, held = measure(data, seed, args.target, args.rule, args.z)
        if args.store:
            store(bundle, held)
        if args.check_bundle:
            stored = json.loads((bundle / "calibration.json").read_text("utf-8")).get("threshold")
            if stored is None or abs(float(stored) - r["threshold"]) > 1e-9:
                print(f"{bundle}: stored threshold {stored} != {r['threshold']}", file=sys.stderr)
                status = 1
        results[run] = r
        cells = []
        for name in TESTS:
            t = r[name]
            lo, hi = t["interval95"]
            cells.append(
                f"{t['frame_accuracy']:.1%} [{lo:.1%}, {hi:.1%}] @ {t['escalation']:.1%} "
                f"({t['needed_for_target']:.1%}), n={t['sentences']}"
            )
            pooled[name][0] += t["wrong_answered"]
            pooled[name][1] += round(t["escalation"] * t["sentences"])
            pooled[name][2] += t["sentences"]
        print(
            f"| {split.name} ({seed}) | {r['threshold']:.4f} | {r['calibration_sentences']}, "
            f"{r['calibration_frames_right']:.1%}, {r['calibration_escalation']:.1%} | "
            + " | ".join(cells)
            + " |"
        )
    cells = []
    for name in TESTS:
        wrong, esc, n = pooled[name]
        lo, hi = wilson_interval(n - wrong, n)
        cells.append(f"{(n - wrong) / n:.1%} [{lo:.1%}, {hi:.1%}] @ {esc / n:.1%}, n={n}")
    print("| pooled | | | " + " | ".join(cells) + " |")
    results["pooled"] = pooled
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", "utf-8")
    return status


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
