"""Banking77 at 99 %: other escalation rankings and cleaned training labels (frozen encoder).

Run (``onnx`` extra, the encoder bundle from ``edgeagent models build``; sklearn for the
learned selector, skipped without it):

    python benchmarks/bench_selective.py --encoder models/minilm-l6-int8 --threads 1 \
        [--split-seed 42 --split-seed 7] [--json out.json]

Every Banking77 ``train.jsonl`` sentence is embedded once with the frozen INT8 encoder;
for each split seed (85/15 stratified, as ``bench_finetune.py``) the head is fitted with
``train_head`` (``edgeagent train``'s defaults) on the training split and its answers on
the validation split go through the runtime's ``predict``.  Rows:

- ranking signals with the same answers (local accuracy unchanged), escalating the lowest
  first instead of the calibrated max probability: top-1 minus top-2 (margin), negative
  entropy, the kNN vote's share alone, linear times kNN probability, agreement of the
  linear and kNN arg-max then max probability, and a learned selector (logistic
  regression on those features, fitted on ``train_head``'s own held-out split);
- training-label cleaning (confident learning, Northcutt et al. 2021): out-of-fold
  probabilities of the training split (5 folds, the same head), per-class thresholds
  ``t_j`` = mean ``p_j`` of the rows labelled ``j``; a row is flagged when the most
  probable label above its threshold is not its own.  Variants drop the flagged rows, only
  those whose own label's probability is below 0.1, or every row whose out-of-fold
  arg-max (p >= 0.5) contradicts its label; the head is refitted on the rest.  The
  validation labels are not cleaned (the goal is measured against them).

Each row prints local accuracy, escalation for 98 % / 99 % with a perfect cloud, the
99 % figure's 90 % bootstrap interval (200 resamples) and, against ``baseline`` of the
same split, the share of paired resamples in which the row needs less escalation for
99 % (ties count half: 50 % is no difference).  Embeddings in one process here are
batched differently from ``bench_finetune.py``'s (INT8 activations are quantized per
batch), so its baseline differs by a few tenths from that bench's: compare within a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def escalation(conf: Any, ok: Any, target: float) -> float:
    """Escalation for ``target`` overall accuracy, lowest ``conf`` escalated first."""
    from edgeagent.heads.curves import escalation_curve, escalation_for

    curve = escalation_curve([float(c) for c in conf], [bool(o) for o in ok], [False] * len(ok))
    return escalation_for(curve, target).escalation


def resampled(conf: Any, ok: Any, ref: tuple[Any, Any], rounds: int = 200) -> dict[str, Any]:
    """90 % bootstrap interval of the 99 % escalation and the paired share of resamples in
    which ``conf`` needs less of it than ``ref`` (ties half)."""
    import numpy as np

    rng = np.random.default_rng(0)
    got, wins = [], 0.0
    for _ in range(rounds):
        idx = rng.integers(0, len(ok), len(ok))
        mine = escalation(conf[idx], ok[idx], 0.99)
        theirs = escalation(ref[0][idx], ref[1][idx], 0.99)
        got.append(mine)
        wins += 1.0 if mine < theirs else 0.5 if mine == theirs else 0.0
    lo, hi = np.quantile(got, [0.05, 0.95])
    return {"ci99": [round(float(lo), 4), round(float(hi), 4)], "paired_better": wins / rounds}


def head_answers(x_tr: Any, y_tr: list[str], x_va: Any, y_va: list[str], opts: Any) -> Any:
    """The head fitted on the training rows; its validation answers through ``predict``:
    ``(head, probabilities, correct, confidence)``."""
    import numpy as np

    from edgeagent.backends.onnx import predict
    from edgeagent.heads.curves import is_correct
    from edgeagent.heads.fit import train_head

    head = train_head(x_tr, y_tr, opts, log=lambda *_: None).head
    preds = predict(head, x_va, use_threshold=False)
    ok = np.array([is_correct(p, t) for p, t in zip(preds, y_va, strict=True)])
    conf = np.array([p.confidence for p in preds])
    return head, head.probabilities(x_va), ok, conf


def signals(head: Any, x: Any) -> dict[str, Any]:
    """Per-input ranking signals of ``head`` on ``x`` (higher = keep local)."""
    import numpy as np

    from edgeagent.backends.onnx import knn_probabilities, softmax

    p = head.probabilities(x)
    top = p.argmax(axis=1)
    rows = np.arange(len(x))
    ordered = np.sort(p, axis=1)
    p_lin = softmax(x @ head.weight + head.bias)
    p_knn = knn_probabilities(
        x, head.knn_emb, head.knn_label, len(head.labels), head.knn_k, head.knn_temp
    )
    agree = (p_lin.argmax(axis=1) == p_knn.argmax(axis=1)).astype(np.float64)
    return {
        "max probability (runtime)": ordered[:, -1],
        "margin top-1 - top-2": ordered[:, -1] - ordered[:, -2],
        "negative entropy": (p * np.log(np.clip(p, 1e-12, None))).sum(axis=1),
        "kNN vote share of the answer": p_knn[rows, top],
        "linear x kNN probability": p_lin[rows, top] * p_knn[rows, top],
        "kNN agrees, then max probability": agree + ordered[:, -1],
        "centroid cosine": head.centroid_cos(x),
    }


def selector_features(head: Any, x: Any) -> Any:
    import numpy as np

    s = signals(head, x)
    eps = 1e-6
    return np.stack(
        [
            np.log(s["max probability (runtime)"] + eps),
            np.log(s["margin top-1 - top-2"] + eps),
            np.log(s["kNN vote share of the answer"] + eps),
            s["kNN agrees, then max probability"] >= 1.0,
            s["centroid cosine"],
            s["negative entropy"],
        ],
        axis=1,
    ).astype(np.float64)


def out_of_fold(x: Any, y: list[str], opts: Any, folds: int = 5) -> Any:
    """Out-of-fold probabilities ``(n, labels)`` (columns: sorted labels) of each row."""
    import numpy as np

    from edgeagent.heads.fit import train_head

    labels = sorted(set(y))
    rng = np.random.default_rng(opts.seed)
    fold = np.empty(len(y), dtype=np.int64)
    for lb in labels:
        rows = rng.permutation([i for i, v in enumerate(y) if v == lb])
        fold[rows] = np.arange(len(rows)) % folds
    probs = np.zeros((len(y), len(labels)), dtype=np.float32)
    for f in range(folds):
        tr, te = np.where(fold != f)[0], np.where(fold == f)[0]
        head = train_head(
            x[tr], [y[i] for i in tr], replace(opts, refit=False), log=print_none
        ).head
        probs[te] = head.probabilities(x[te])[:, [head.labels.index(lb) for lb in labels]]
    return probs


def print_none(*_: Any) -> None:
    return None


def label_issues(probs: Any, y: Any) -> Any:
    """Confident-learning flags: the most probable label above its class threshold exists
    and is not the row's own."""
    import numpy as np

    thresholds = np.array([probs[y == j, j].mean() for j in range(probs.shape[1])])
    above = probs >= thresholds[None, :]
    confident = np.where(above, probs, -1.0).argmax(axis=1)
    flagged: Any = above.any(axis=1) & (confident != y)
    return flagged


def run_seed(
    emb: Any, rows: list[tuple[str, str]], seed: int, threads: int
) -> list[dict[str, Any]]:
    import numpy as np

    from edgeagent.heads.curves import ece
    from edgeagent.heads.fit import TrainOptions, stratified_split

    labels = [lb for _, lb in rows]
    tr, va = stratified_split(labels, 0.15, seed)
    opts = TrainOptions(threads=threads)
    x_tr, x_va = emb[tr], emb[va]
    y_tr, y_va = [labels[i] for i in tr], [labels[i] for i in va]
    head, _, ok, conf = head_answers(x_tr, y_tr, x_va, y_va, opts)
    ref = (conf, ok)
    out: list[dict[str, Any]] = []

    def row(name: str, ok_: Any, conf_: Any, **extra: Any) -> None:
        res = {
            "split_seed": seed,
            "variant": name,
            "local_accuracy": float(ok_.mean()),
            "escalation_for_98": escalation(conf_, ok_, 0.98),
            "escalation_for_99": escalation(conf_, ok_, 0.99),
            "ece": ece(np.asarray(conf_, dtype=np.float32), ok_),
            **resampled(conf_, ok_, ref),
            **extra,
        }
        out.append(res)
        print(
            f"| {seed} | {name} | {res['local_accuracy']:.2%} | {res['escalation_for_98']:.1%} | "
            f"{res['escalation_for_99']:.1%} [{res['ci99'][0]:.1%}-{res['ci99'][1]:.1%}] | "
            f"{res['paired_better']:.0%} | {extra.get('dropped', '')} |",
            flush=True,
        )

    row("baseline (frozen encoder, default head)", ok, conf)
    for name, score in signals(head, x_va).items():
        if name != "max probability (runtime)":
            row(f"rank by {name}", ok, score)
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        print("(no sklearn: learned selector skipped)", file=sys.stderr)
    else:
        from edgeagent.heads.fit import train_head

        _, h_ho = stratified_split(y_tr, opts.held_out, opts.seed)
        probe = train_head(x_tr, y_tr, replace(opts, refit=False), log=print_none).head
        ho_right = probe.probabilities(x_tr[h_ho]).argmax(axis=1) == np.array(
            [probe.labels.index(y_tr[i]) for i in h_ho]
        )
        sel = LogisticRegression(C=1.0, max_iter=1000)
        sel.fit(selector_features(probe, x_tr[h_ho]), ho_right)
        row(
            "rank by a learned selector", ok, sel.predict_proba(selector_features(head, x_va))[:, 1]
        )

    t0 = time.monotonic()
    probs = out_of_fold(x_tr, y_tr, opts)
    index = {lb: i for i, lb in enumerate(sorted(set(y_tr)))}
    y_idx = np.array([index[lb] for lb in y_tr])
    flagged = label_issues(probs, y_idx)
    own = probs[np.arange(len(y_idx)), y_idx]
    print(f"(out-of-fold probabilities: {time.monotonic() - t0:.0f} s)", flush=True)
    for name, drop in (
        ("drop confident-learning label issues", flagged),
        ("drop label issues with own p < 0.1", flagged & (own < 0.1)),
        (
            "drop rows whose out-of-fold answer (p >= 0.5) differs",
            (probs.argmax(1) != y_idx) & (probs.max(1) >= 0.5),
        ),
    ):
        keep = ~drop
        _, _, ok2, conf2 = head_answers(
            x_tr[keep], [y for y, k in zip(y_tr, keep, strict=True) if k], x_va, y_va, opts
        )
        row(name, ok2, conf2, dropped=int(drop.sum()))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", type=Path, default=REPO / "models/minilm-l6-int8")
    ap.add_argument("--datasets", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--split-seed", type=int, action="append", default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    data = Path(
        args.datasets or os.environ.get("EDGEAGENT_DATASETS") or REPO.parent / "shared/datasets"
    )
    if not (data / "banking77/train.jsonl").is_file():
        print(f"Banking77 not found under {data} (set EDGEAGENT_DATASETS)", file=sys.stderr)
        return 2
    import edgeagent.backends  # noqa: F401  (import order)
    from edgeagent.heads.fit import TrainOptions
    from edgeagent.modeltools.train import embed_examples, load_examples

    rows = load_examples(data / "banking77/train.jsonl")
    emb = embed_examples(args.encoder, [t for t, _ in rows], TrainOptions(threads=args.threads))
    print(
        "| split seed | variant | local acc | esc. 98 % | esc. 99 % [90 % bootstrap] | "
        "paired: better than baseline at 99 % | training rows dropped |"
    )
    print("|---|---|---|---|---|---|---|")
    results: list[dict[str, Any]] = []
    for seed in args.split_seed or [42, 7]:
        results += run_seed(emb, rows, seed, args.threads)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", "utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
