"""Encoder fine-tuning on Banking77: what each setting buys, through the INT8 runtime.

Run (``build`` extra, the encoder bundle from ``edgeagent models build``, datasets under
``EDGEAGENT_DATASETS``):

    python benchmarks/bench_finetune.py --encoder models/minilm-l6-int8 \
        --variant baseline --variant default \
        --variant 'old={"epochs": 1, "freeze_layers": 0, "bucket": false,
                        "max_length": 48, "lr": 5e-5}'

Data: Banking77 ``train.jsonl`` split 85/15 (stratified, seed 42, as
``bench_classify.py``); the 15 % is never seen by training (``train`` then holds out
another 15 % of the rest for its own calibration, excluded from the fine-tune too).

Each variant runs ``train_bundle`` exactly as ``edgeagent train [--finetune]`` does
(fine-tune, export, INT8, head) and is evaluated through ``OnnxBackend`` on the
validation texts: local-only accuracy, escalation needed for 98 % / 99 % overall
accuracy with a perfect cloud, ECE of the confidence, fine-tune seconds and peak RSS of
the fine-tune process (each variant runs in a fresh subprocess so the peaks are its own).
``baseline`` is the frozen-encoder head (no fine-tuning); ratios are against it.

Variants: ``baseline``, ``default`` (the :class:`FinetuneOptions` defaults) or
``NAME=JSON`` (keyword arguments of ``finetune_encoder``).  ``--json FILE`` writes all.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _datasets(arg: str | None) -> Path:
    return Path(arg or os.environ.get("EDGEAGENT_DATASETS") or REPO.parent / "shared/datasets")


def run_variant(
    name: str, finetune: dict[str, Any] | None, encoder: Path, data: Path, threads: int
) -> dict[str, Any]:
    """One variant in this process: train, then evaluate on the validation split."""
    import numpy as np

    import edgeagent.backends  # noqa: F401  (import order)
    from edgeagent.backends.onnx import OnnxBackend
    from edgeagent.config import TaskConfig
    from edgeagent.modeltools.calibrate import (
        curve_from_predictions,
        ece,
        escalation_for,
        is_correct,
    )
    from edgeagent.modeltools.train import (
        TrainOptions,
        load_examples,
        stratified_split,
        train_bundle,
    )

    rows = load_examples(data / "banking77/train.jsonl")
    tr, va = stratified_split([lb for _, lb in rows], 0.15, 42)
    lines: list[str] = []

    def log(*a: Any) -> None:
        text = " ".join(str(x) for x in a)
        lines.append(text)
        print(f"[{name}] {text}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        path = Path(tmp) / "train.jsonl"
        path.write_text(
            "".join(
                json.dumps({"text": rows[i][0], "label": rows[i][1]}, ensure_ascii=False) + "\n"
                for i in tr
            ),
            "utf-8",
        )
        t0 = time.monotonic()
        bundle = train_bundle(
            "b77",
            path,
            encoder,
            Path(tmp) / "bundles",
            TrainOptions(threads=threads),
            finetune=finetune,
            command="bench_finetune.py",
            log=log,
        )
        train_s = time.monotonic() - t0
        peak_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        task = TaskConfig.model_validate(
            {
                "kind": "classify",
                "backend": {"type": "onnx", "bundle": str(bundle), "intra_op_threads": threads},
            }
        )
        backend = OnnxBackend("bench", task)
        backend.load()
        texts = [rows[i][0] for i in va]
        truths = [rows[i][1] for i in va]
        preds: list[Any] = []
        for i in range(0, len(texts), 64):
            preds.extend(backend.infer_batch(texts[i : i + 64]))
        backend.close()
    curve = curve_from_predictions(preds, truths)
    ok = np.array([is_correct(p, t) for p, t in zip(preds, truths, strict=True)])
    conf = np.array([p.confidence for p in preds], dtype=np.float32)
    ft = [x for x in lines if "fine-tuned in" in x]
    ft_s = float(ft[0].split("fine-tuned in ")[1].split(" s")[0]) if ft else 0.0
    ft_cpu = float(ft[0].split("(CPU ")[1].split(" s")[0]) if ft and "(CPU " in ft[0] else 0.0
    return {
        "variant": name,
        "finetune": finetune,
        "train_examples": len(tr),
        "val_examples": len(va),
        "local_accuracy": float(ok.mean()),
        "escalation_for_98": escalation_for(curve, 0.98).escalation,
        "escalation_for_99": escalation_for(curve, 0.99).escalation,
        "ece": ece(conf, ok),
        "flagged_out_of_scope": sum(p.reason == "out_of_scope" for p in preds) / len(preds),
        "finetune_seconds": ft_s,
        "finetune_cpu_seconds": ft_cpu,
        "train_seconds": round(train_s, 1),
        "peak_rss_mb": round(peak_train, 1),
    }


def _parse(spec: str) -> tuple[str, dict[str, Any] | None]:
    if spec == "baseline":
        return spec, None
    if spec == "default":
        return spec, {}
    name, _, js = spec.partition("=")
    return name, json.loads(js)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", type=Path, default=REPO / "models/minilm-l6-int8")
    ap.add_argument("--datasets", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    ap.add_argument("--variant", action="append", default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process mode
    args = ap.parse_args()
    data = _datasets(args.datasets)
    if not (data / "banking77/train.jsonl").is_file():
        print(f"Banking77 not found under {data} (set EDGEAGENT_DATASETS)", file=sys.stderr)
        return 2
    if args.one is not None:
        name, ft = _parse(args.one)  # torch threads: train passes TrainOptions.threads
        print("RESULT " + json.dumps(run_variant(name, ft, args.encoder, data, args.threads)))
        return 0
    results: list[dict[str, Any]] = []
    for spec in args.variant or ["baseline", "default"]:
        cmd = [sys.executable, __file__, "--one", spec, "--encoder", str(args.encoder)]
        cmd += ["--threads", str(args.threads), "--datasets", str(data)]
        found: list[str] = []
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:  # the variant's progress, live
                if line.startswith("RESULT "):
                    found.append(line)
                else:
                    print(line, end="", flush=True)
        if proc.returncode != 0 or not found:
            print(f"variant {spec!r} failed (exit {proc.returncode})", file=sys.stderr)
            continue
        results.append(json.loads(found[-1].removeprefix("RESULT ")))
    base = next((r for r in results if r["variant"] == "baseline"), None)
    print(
        "\n| variant | local acc | esc. 98 % | esc. 99 % (goal <= 12 %) | ECE | fine-tune s "
        "(CPU s) | peak RSS MB | esc. 99 % / baseline |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        ratio = (
            f"{r['escalation_for_99'] / base['escalation_for_99']:.2f}"
            if base and base["escalation_for_99"]
            else "-"
        )
        print(
            f"| {r['variant']} | {r['local_accuracy']:.2%} | {r['escalation_for_98']:.1%} | "
            f"{r['escalation_for_99']:.1%} | {r['ece']:.4f} | {r['finetune_seconds']:.0f} "
            f"({r.get('finetune_cpu_seconds', 0):.0f}) | "
            f"{r['peak_rss_mb']:.0f} | {ratio} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", "utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
