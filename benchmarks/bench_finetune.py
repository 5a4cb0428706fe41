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
``NAME=JSON`` (keyword arguments of ``finetune_encoder``).  ``--json FILE`` writes all,
with each validation example's confidence, correctness, answer and calibrated probability
vector: ``--compare`` pairs results of one split seed, ``--ensemble`` combines every two of
them into a two-model ensemble (:data:`ENSEMBLE_RULES`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _datasets(arg: str | None) -> Path:
    return Path(arg or os.environ.get("EDGEAGENT_DATASETS") or REPO.parent / "shared/datasets")


def single_job_ms(backend: Any, encoder: Path, texts: list[str], threads: int) -> dict[str, float]:
    """Single-job latency (p50, ms): the trained bundle through ``OnnxBackend`` (encoder +
    head) and its encoder alone, interleaved with the untuned encoder bundle's (same
    texts, same process): the fine-tuned INT8 graph must cost what the original does."""
    from edgeagent.backends.onnx import OnnxEncoder

    def encoder_of(bundle: Path) -> OnnxEncoder:
        return OnnxEncoder(
            bundle / "model.onnx", bundle / "tokenizer.json", intra_op_threads=threads
        )

    tuned, base = encoder_of(backend.config.bundle), encoder_of(encoder)
    runs: dict[str, list[float]] = {"job": [], "encoder": [], "base_encoder": []}
    calls = {
        "job": lambda t: backend.infer_batch([t]),
        "encoder": lambda t: tuned.embed([t]),
        "base_encoder": lambda t: base.embed([t]),
    }
    for t in texts[:5]:  # warm-up
        for call in calls.values():
            call(t)
    keys = list(calls)
    for k, t in enumerate(texts):  # the order rotates: no call always runs first or last
        for key in keys[k % 3 :] + keys[: k % 3]:
            t0 = time.perf_counter()
            calls[key](t)
            runs[key].append((time.perf_counter() - t0) * 1000)
    return {key: round(statistics.median(v), 3) for key, v in runs.items()}


def result_curve(r: dict[str, Any], idx: Any = None) -> Any:
    """The escalation curve of a result's ``confidence`` / ``correct`` / ``forced`` lists
    (the rows ``idx`` of them, or all)."""
    from edgeagent.heads.curves import escalation_curve

    rows = range(len(r["correct"])) if idx is None else idx
    return escalation_curve(
        [r["confidence"][i] for i in rows],
        [r["correct"][i] for i in rows],
        [r["forced"][i] for i in rows],
    )


def escalation_needed(r: dict[str, Any], target: float, idx: Any = None) -> float:
    """Escalation needed for ``target`` overall accuracy with a perfect cloud."""
    from edgeagent.heads.curves import escalation_for

    return escalation_for(result_curve(r, idx), target).escalation


def wrong_kept(r: dict[str, Any], rate: float = 0.12) -> str:
    """The wrong answers kept local (and the overall accuracy) when at most ``rate`` of
    the validation rows are escalated to a perfect cloud: 99 % allows 1 % of the rows."""
    from edgeagent.heads.curves import threshold_for_escalation

    point = threshold_for_escalation(result_curve(r), rate)
    return f"{round((1 - point.accuracy) * len(r['correct']))} ({point.accuracy:.2%})"


def bootstrap_escalation(
    r: dict[str, Any], target: float, rounds: int = 200, seed: int = 0
) -> list[float]:
    """5 % and 95 % quantiles of the escalation needed for ``target`` over bootstrap
    resamples of the validation set: on 1,500 examples the 99 % point rests on ~15 errors
    and moves by several points between resamples (and between split seeds)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = len(r["correct"])
    got = [escalation_needed(r, target, rng.integers(0, n, n)) for _ in range(rounds)]
    return [round(float(q), 4) for q in np.quantile(got, [0.05, 0.95])]


def validation_probabilities(head: Any, bundle: Path, texts: list[str], threads: int) -> Any:
    """The head's calibrated probabilities over all labels, shape ``(n, k)``, for the
    validation texts embedded in the same batches of 64 as the backend's answers (INT8
    activations are quantized per batch, so other batches give other embeddings)."""
    import numpy as np

    from edgeagent.backends.onnx import OnnxEncoder

    enc = OnnxEncoder(bundle / "model.onnx", bundle / "tokenizer.json", intra_op_threads=threads)
    return np.concatenate(
        [head.probabilities(enc.embed(texts[i : i + 64])) for i in range(0, len(texts), 64)]
    )


def run_variant(
    name: str,
    finetune: dict[str, Any] | None,
    encoder: Path,
    data: Path,
    threads: int,
    split_seed: int = 42,
    latency: int = 0,
) -> dict[str, Any]:
    """One variant in this process: train, then evaluate on the validation split
    (``split_seed``); ``latency``: that many single jobs timed (:func:`single_job_ms`)."""
    import numpy as np

    import edgeagent.backends  # noqa: F401  (import order)
    from edgeagent.backends.onnx import Head, OnnxBackend
    from edgeagent.config import TaskConfig
    from edgeagent.heads.curves import (
        OOS_REASON,
        curve_from_predictions,
        ece,
        escalation_for,
        is_correct,
    )
    from edgeagent.heads.fit import TrainOptions, stratified_split
    from edgeagent.modeltools.train import load_examples, train_bundle

    rows = load_examples(data / "banking77/train.jsonl")
    tr, va = stratified_split([lb for _, lb in rows], 0.15, split_seed)
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
        timing = single_job_ms(backend, encoder, texts[:latency], threads) if latency else {}
        head = Head.from_bundle(bundle)
        blend = head.blend
        backend.close()
        probs = validation_probabilities(head, bundle, texts, threads)
    predicted = [p.output.get("label") if p.output else None for p in preds]
    if [head.labels[int(j)] for j in probs.argmax(axis=1)] != predicted:
        raise RuntimeError("the saved probabilities do not give the backend's answers")
    curve = curve_from_predictions(preds, truths)
    ok = np.array([is_correct(p, t) for p, t in zip(preds, truths, strict=True)])
    conf = np.array([p.confidence for p in preds], dtype=np.float32)
    forced = [p.reason == OOS_REASON for p in preds]
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
        "escalation_for_99_90ci": bootstrap_escalation(
            {"confidence": conf.tolist(), "correct": ok.tolist(), "forced": forced}, 0.99
        ),
        "ece": ece(conf, ok),
        "flagged_out_of_scope": sum(p.reason == "out_of_scope" for p in preds) / len(preds),
        "finetune_seconds": ft_s,
        "finetune_cpu_seconds": ft_cpu,
        "train_seconds": round(train_s, 1),
        "peak_rss_mb": round(peak_train, 1),
        "head": "logistic_regression" + ("" if blend >= 1 else f"+knn (weight {1 - blend:g})"),
        "split_seed": split_seed,
        "single_job_ms": timing,
        # per validation example, for paired comparisons (--compare)
        "confidence": [round(float(c), 6) for c in conf],
        "correct": [bool(x) for x in ok],
        "forced": forced,
        # for --ensemble: the answers, the gold labels and the calibrated probabilities
        "predicted": predicted,
        "truth": truths,
        "label_names": list(head.labels),
        "probabilities": [[round(float(x), 5) for x in row] for row in probs],
    }


def paired_better(a: dict[str, Any], b: dict[str, Any], rounds: int = 200) -> float:
    """Share of paired bootstrap resamples of the validation split (the same rows for both)
    in which ``b`` needs less escalation for 99 % than ``a`` (ties count half)."""
    import numpy as np

    rng = np.random.default_rng(0)
    wins = 0.0
    for _ in range(rounds):
        idx = rng.integers(0, len(a["correct"]), len(a["correct"]))
        ea, eb = escalation_needed(a, 0.99, idx), escalation_needed(b, 0.99, idx)
        wins += 1.0 if eb < ea else 0.5 if eb == ea else 0.0
    return wins / rounds


def compare(files: list[Path]) -> None:
    """Paired comparison at 99 % of every pair of results of one split seed (``--json``
    files of separate runs: the validation rows are the same for a split seed)."""
    results = [r for f in files for r in json.loads(f.read_text()) if "correct" in r]
    print("| split seed | a | b | b needs less escalation for 99 % than a, paired |")
    print("|---|---|---|---|")
    for i, a in enumerate(results):
        for b in results[i + 1 :]:
            if a["split_seed"] == b["split_seed"]:
                print(
                    f"| {a['split_seed']} | {a['variant']} | {b['variant']} | "
                    f"{paired_better(a, b):.0%} |"
                )


#: How an ensemble of two results answers and ranks for escalation (``--ensemble``).  The
#: answer is the arg-max of the mean of the two calibrated probability vectors in every rule;
#: "agree" rules escalate every disagreement of the two members' answers before any
#: agreement (disagreements among themselves by the mean vector's max probability).
ENSEMBLE_RULES = {
    "mean": "mean probability vector, its max probability",
    "agree-mean": "disagreements first, then the mean of the two max probabilities",
    "agree-min": "disagreements first, then the lower of the two max probabilities",
}


def shared_errors(a: dict[str, Any], b: dict[str, Any], rate: float = 0.12) -> str:
    """Of ``a``'s wrong answers kept local at ``rate`` escalation (its most confident
    ``1 - rate``), how many ``b`` gives the same wrong answer: those no agreement flags."""
    n = len(a["correct"])
    kept = sorted(range(n), key=lambda i: -a["confidence"][i])[: int(n * (1 - rate))]
    wrong = [i for i in kept if not a["correct"][i]]
    return f"{sum(a['predicted'][i] == b['predicted'][i] for i in wrong)}/{len(wrong)}"


def ensemble(a: dict[str, Any], b: dict[str, Any], rule: str) -> dict[str, Any]:
    """The result of the two-model ensemble ``a`` + ``b`` (two ``--json`` results of one
    split seed) under ``rule`` (:data:`ENSEMBLE_RULES`), with the keys :func:`paired_better`
    and :func:`bootstrap_escalation` read.  Forced (out-of-scope) when either member is."""
    import numpy as np

    if a["truth"] != b["truth"]:
        raise ValueError("not the same validation rows (another split seed?)")
    names = a["label_names"]
    pa = np.asarray(a["probabilities"], dtype=np.float64)
    order = [b["label_names"].index(n) for n in names]  # b's columns in a's label order
    pb = np.asarray(b["probabilities"], dtype=np.float64)[:, order]
    mean = (pa + pb) / 2
    answer = [names[int(j)] for j in mean.argmax(axis=1)]
    agree = np.array([x == y for x, y in zip(a["predicted"], b["predicted"], strict=True)])
    ca, cb, cm = pa.max(axis=1), pb.max(axis=1), mean.max(axis=1)
    if rule == "mean":
        conf = cm
    elif rule in ("agree-mean", "agree-min"):
        both = (ca + cb) / 2 if rule == "agree-mean" else np.minimum(ca, cb)
        conf = np.where(agree, both, cm - 1.0)  # below every agreement's confidence
    else:
        raise ValueError(f"unknown ensemble rule {rule!r}")
    correct = [x == t for x, t in zip(answer, a["truth"], strict=True)]
    return {
        "variant": f"{a['variant']}+{b['variant']} {rule}",
        "split_seed": a["split_seed"],
        "confidence": conf.tolist(),
        "correct": correct,
        "forced": [x or y for x, y in zip(a["forced"], b["forced"], strict=True)],
        "local_accuracy": float(np.mean(correct)),
        "disagreement": float(1.0 - agree.mean()),
    }


def ensembles(files: list[Path]) -> None:
    """Every pair of results of one split seed in these ``--json`` files as a two-model
    ensemble under each rule: local accuracy, escalation for 98 / 99 % with a perfect
    cloud (the cut-off read off the validation split itself, as for single models) and
    its bootstrap interval, and the paired comparison at 99 % against the best single
    result of that split seed in the files (and against each member); then, for every two
    results, how many of one's confidently wrong answers the other gives too
    (:func:`shared_errors`)."""
    results = [r for f in files for r in json.loads(f.read_text()) if "probabilities" in r]
    print(
        "| split seed | ensemble | rule | local acc | members disagree | esc. 98 % | "
        "esc. 99 % [90 % bootstrap] | wrong kept at 12 % esc. | paired vs best single | "
        "vs a | vs b |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for seed in sorted({r["split_seed"] for r in results}):
        singles = [r for r in results if r["split_seed"] == seed]
        best = min(singles, key=lambda r: r["escalation_for_99"])
        for r in singles:
            ci = bootstrap_escalation(r, 0.99)
            print(
                f"| {seed} | {r['variant']} alone{' (best)' if r is best else ''} | - | "
                f"{r['local_accuracy']:.2%} | - | {r['escalation_for_98']:.1%} | "
                f"{r['escalation_for_99']:.1%} [{ci[0]:.1%}-{ci[1]:.1%}] | {wrong_kept(r)} | "
                f"{paired_better(best, r):.0%} | - | - |"
            )
        for i, a in enumerate(singles):
            for b in singles[i + 1 :]:
                for rule in ENSEMBLE_RULES:
                    e = ensemble(a, b, rule)
                    ci = bootstrap_escalation(e, 0.99)
                    print(
                        f"| {seed} | {a['variant']} + {b['variant']} | {rule} | "
                        f"{e['local_accuracy']:.2%} | {e['disagreement']:.1%} | "
                        f"{escalation_needed(e, 0.98):.1%} | "
                        f"{escalation_needed(e, 0.99):.1%} [{ci[0]:.1%}-{ci[1]:.1%}] | "
                        f"{wrong_kept(e)} | {paired_better(best, e):.0%} | "
                        f"{paired_better(a, e):.0%} | {paired_better(b, e):.0%} |"
                    )
    print(
        "\npaired: the share of 200 paired bootstrap resamples in which the row needs less "
        "escalation for 99 % than the single result named (ties half; 50 % is no difference)"
    )
    print("\n| split seed | a | b | a's wrong answers kept at 12 % that b gives too |")
    print("|---|---|---|---|")
    for a in results:
        for b in results:
            if a is not b and a["split_seed"] == b["split_seed"]:
                print(
                    f"| {a['split_seed']} | {a['variant']} | {b['variant']} | "
                    f"{shared_errors(a, b)} |"
                )


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
    ap.add_argument(
        "--split-seed",
        type=int,
        default=42,
        help="seed of the 85/15 split (another seed: a second, independent check)",
    )
    ap.add_argument(
        "--latency",
        type=int,
        default=0,
        metavar="N",
        help="time N single jobs per variant against the untuned encoder (interleaved)",
    )
    ap.add_argument(
        "--compare",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="print paired comparisons of the results in these --json files and exit",
    )
    ap.add_argument(
        "--ensemble",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="print every pair of results of one split seed in these --json files as a "
        "two-model ensemble (each rule) and exit",
    )
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process mode
    args = ap.parse_args()
    if args.compare:
        compare(args.compare)
        return 0
    if args.ensemble:
        ensembles(args.ensemble)
        return 0
    data = _datasets(args.datasets)
    if not (data / "banking77/train.jsonl").is_file():
        print(f"Banking77 not found under {data} (set EDGEAGENT_DATASETS)", file=sys.stderr)
        return 2
    if args.one is not None:
        name, ft = _parse(args.one)  # torch threads: train passes TrainOptions.threads
        res = run_variant(name, ft, args.encoder, data, args.threads, args.split_seed, args.latency)
        print("RESULT " + json.dumps(res))
        return 0
    results: list[dict[str, Any]] = []
    for spec in args.variant or ["baseline", "default"]:
        cmd = [sys.executable, __file__, "--one", spec, "--encoder", str(args.encoder)]
        cmd += ["--threads", str(args.threads), "--datasets", str(data)]
        cmd += ["--split-seed", str(args.split_seed), "--latency", str(args.latency)]
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
        f"\nsplit seed {args.split_seed}\n| variant | head | local acc | esc. 98 % | "
        "esc. 99 % (goal <= 12 %) [90 % bootstrap] | ECE | fine-tune s (CPU s) | peak RSS MB | "
        "esc. 99 % / baseline | job ms (encoder / untuned encoder) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ratio = (
            f"{r['escalation_for_99'] / base['escalation_for_99']:.2f}"
            if base and base["escalation_for_99"]
            else "-"
        )
        ms = r.get("single_job_ms") or {}
        ci = r.get("escalation_for_99_90ci") or [math.nan, math.nan]
        job = (
            f"{ms['job']:.2f} ({ms['encoder'] / ms['base_encoder']:.2f})"
            if ms.get("base_encoder")
            else "-"
        )
        print(
            f"| {r['variant']} | {r.get('head', '?')} | {r['local_accuracy']:.2%} | "
            f"{r['escalation_for_98']:.1%} | "
            f"{r['escalation_for_99']:.1%} [{ci[0]:.1%}-{ci[1]:.1%}] | {r['ece']:.4f} | "
            f"{r['finetune_seconds']:.0f} "
            f"({r.get('finetune_cpu_seconds', 0):.0f}) | "
            f"{r['peak_rss_mb']:.0f} | {ratio} | {job} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", "utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
