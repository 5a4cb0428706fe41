"""Scenario 2 of bench_learning.py (new intents) offline: seconds per variant, and why.

    .venv/bin/python benchmarks/bench_learning_offline.py                  # the defaults
    .venv/bin/python benchmarks/bench_learning_offline.py --learn "prior_correction = 2"
    .venv/bin/python benchmarks/bench_learning_offline.py --ceiling 16,40,85

The same base bundle (120 CLINC150 intents, cached under ``--work`` like bench_learning.py's),
the same cloud answers in the same order, and the rounds the daemon would run (one after
every 5 answers per new intent: ``every_examples`` = 150) -- but in-process: the learned
texts are embedded once (cached), each round is the real
:func:`edgeagent.learning.refit.fit_round` (fit, prior-correction and cut-off variants,
the promotion rule), a promoted candidate serves the next round.  After 5, 10 and 20
answers per new intent it prints what bench_learning.py prints (local accuracy per new
intent: answered locally and right; the old intents' validation figures) and, per new
intent below 90 %, where its validation sentences went: flagged out of scope by the
cut-off (``cut``) or by the out-of-scope class winning (``oos``), below the task threshold
(``<thr``), answered with another label (``wrong``, with the labels it was confused with).

``--ceiling N,…``: no rounds, no promotion rule; the head fitted directly (bundle
recipe, no prior correction) on the base examples plus the first N training sentences of
each new intent -- what the encoder and head reach with N answers taken at face value,
N = 85 being as many as the old intents have (the upper bound of the rounds).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_learning import TARGET, THRESHOLD, Data, new_intents_setup  # noqa: E402

REPORT = (5, 10, 20)
ROUNDS = (5, 10, 15, 20)


def diagnose(head: Any, emb: Any, truths: list[str], labels: list[str]) -> dict[str, Any]:
    """Per label: ``right`` (local and right), ``argmax`` (arg-max right), and where the
    others went (see the module docstring)."""
    from edgeagent.backends.onnx import predict

    preds = predict(head, emb, oos_distance=True, use_threshold=True)
    out: dict[str, dict[str, Any]] = {
        lb: {"n": 0, "right": 0, "argmax": 0, "cut": 0, "oos": 0, "<thr": 0, "wrong": 0}
        for lb in labels
    }
    for p, t in zip(preds, truths, strict=True):
        if t not in out:
            continue
        c = out[t]
        got = (p.output or {}).get("label")
        c["n"] += 1
        c["argmax"] += got == t
        if p.reason == "out_of_scope":
            c["oos" if got == head.oos_label else "cut"] += 1
        elif p.reason is not None or p.confidence < THRESHOLD:
            c["<thr"] += 1
        elif got == t:
            c["right"] += 1
        else:
            c["wrong"] += 1
            conf = c.setdefault("confused", {})
            conf[got] = conf.get(got, 0) + 1
    return out


def old_figures(head: Any, s: argparse.Namespace) -> dict[str, Any]:
    """The old intents' validation figures, as bench_learning.py reads them."""
    from edgeagent.learning.refit import evaluate

    return evaluate(
        head,
        s.old_emb,
        s.old_truths,
        threshold=THRESHOLD,
        oos_distance=True,
        use_bundle_threshold=True,
        target_accuracy=TARGET,
    )


def report(name: str, head: Any, s: argparse.Namespace, verbose: bool) -> None:
    per = diagnose(head, s.emb, s.truths, s.new)
    acc = sorted(c["right"] / c["n"] for c in per.values())
    top1 = sorted(c["argmax"] / c["n"] for c in per.values())
    old = old_figures(head, s)
    misses = {k: sum(c[k] for c in per.values()) for k in ("cut", "oos", "<thr", "wrong")}
    print(
        f"  {name}: >= 90 %: {sum(a >= 0.9 for a in acc)}/{len(acc)}, median "
        f"{acc[len(acc) // 2]:.0%}, min {acc[0]:.0%} (arg-max right >= 90 %: "
        f"{sum(a >= 0.9 for a in top1)}); misses {misses}; old intents: local accuracy "
        f"{old['local_accuracy']:.2%} (base {s.old_base['local_accuracy']:.2%}), escalation "
        f"for 98 % {old['escalation_needed']:.1%} (base {s.old_base['escalation_needed']:.1%})",
        flush=True,
    )
    if verbose:
        for lb, c in sorted(per.items(), key=lambda kv: kv[1]["right"]):
            if c["right"] < 0.9 * c["n"]:
                rest = " ".join(f"{k} {c[k]}" for k in ("cut", "oos", "<thr", "wrong") if c[k])
                print(f"    {lb:<24} {c['right']:>2}/{c['n']}  {rest}  {c.get('confused', '')}")


def rounds(s: argparse.Namespace, learn: dict[str, Any], verbose: bool) -> None:
    from edgeagent.learning.config import LearnConfig
    from edgeagent.learning.examples import split_of
    from edgeagent.learning.refit import fit_round

    cfg = LearnConfig.model_validate(
        {"enabled": True, "min_examples_per_label": 3, "memory": False, **learn}
    )
    head, manifest = s.head, s.manifest
    vdir = tempfile.mkdtemp(prefix="newintents-offline-")
    for number, k in enumerate(ROUNDS, 1):
        n = k * len(s.new)
        texts = [t for t, _ in s.items[:n]]
        labels = [lb for _, lb in s.items[:n]]
        job = {
            "task": "intent",
            "round": number,
            "versions_dir": vdir,
            "learn": cfg.model_dump(mode="json"),
            "threshold": THRESHOLD,
            "oos_distance": None,  # the daemon's: the backend's setting, unset
            "use_bundle_threshold": True,
            "max_length": 128,
            "audit_rate": 0.0,
        }
        t0 = time.monotonic()
        res = fit_round(
            job,
            cfg,
            manifest,
            head,
            s.data_refit,
            s.item_emb[:n],
            labels,
            [split_of("intent", t, cfg.holdout) for t in texts],
            [False] * n,
        )
        rec = res["record"]
        why = res["skip"] or res["failed"] or "; ".join(res["reasons"])
        if not why:
            head = res["head"]
            manifest = {**s.manifest, "learned": {"round": number}}
        print(
            f"round {number} ({k} answers per new intent, {rec.get('learned_train', 0)} "
            f"trained on): {'rejected: ' + why if why else 'promoted'}, prior correction tau "
            f"{(rec.get('prior_correction') or {}).get('tau')}, {time.monotonic() - t0:.0f} s",
            flush=True,
        )
        if k in REPORT:
            report(f"after {k} answers", head, s, verbose)


def ceiling(s: argparse.Namespace, sizes: list[int], verbose: bool) -> None:
    import numpy as np

    from edgeagent.heads.fit import train_head
    from edgeagent.learning.refit import bundle_options

    opts = bundle_options(s.manifest, s.head, {"learn": {}})
    texts = [t for lb in s.new for t in s.pool[lb]]
    emb = s.data.embed(s.base, texts, "newpool")
    keep = np.flatnonzero(~s.data_refit.held_out)
    for size in sizes:
        pick = [i for i, t in enumerate(texts) if s.pool_rank[t] < size]
        x = np.concatenate([s.data_refit.emb[keep], emb[pick]]).astype(np.float32)
        y = [s.data_refit.labels[i] for i in keep] + [s.label_of[texts[i]] for i in pick]
        head = train_head(x, y, opts, log=lambda *_a: None).head
        report(f"{size} sentences per new intent, fitted directly", head, s, verbose)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--learn", default="", help="[tasks.intent.learn] lines, ';'-separated")
    ap.add_argument("--ceiling", default="", help="N,… sentences per new intent, no rounds")
    ap.add_argument("--verbose", "-v", action="store_true", help="per new intent below 90 %")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeagent-bench-learning"))
    ap.add_argument("--datasets", type=Path, default=None)
    args = ap.parse_args()
    root = args.datasets or Path(os.environ.get("EDGEAGENT_DATASETS", "/work/shared/datasets"))
    from edgeagent.backends.onnx import Head
    from edgeagent.bundle import read_manifest
    from edgeagent.learning.refit_data import load_refit_data

    data = Data(root, args.work, quick=False)
    _intents, new, base, pool, val = new_intents_setup(data)
    s = argparse.Namespace(data=data, new=new, base=base, pool=pool)
    s.emb = data.embed(base, [r["text"] for r in val], "newval")
    s.truths = [r["label"] for r in val]
    old_val = [r for r in data.clinc_val if r["label"] not in new]
    s.old_emb = data.embed(base, [r["text"] for r in old_val], "oldval")
    s.old_truths = [r["label"] for r in old_val]
    s.items = [(pool[lb][j], lb) for j in range(max(ROUNDS)) for lb in new]
    s.item_emb = data.embed(base, [t for t, _ in s.items], "newitems")
    s.head, s.manifest = Head.from_bundle(base), read_manifest(base, kind="classifier")
    refit_data = load_refit_data(base)
    if refit_data is None:
        raise SystemExit(f"{base} carries no refit.npz")
    s.data_refit = refit_data
    s.pool_rank = {t: j for lb in new for j, t in enumerate(pool[lb])}
    s.label_of = {t: lb for lb in new for t in pool[lb]}
    s.old_base = old_figures(s.head, s)
    if args.ceiling:
        ceiling(s, [int(x) for x in args.ceiling.split(",")], args.verbose)
        return 0
    learn = tomllib.loads("\n".join(x.strip() for x in args.learn.split(";")))
    print(f"[newintents offline] {len(new)} new intents, learn settings {learn or 'defaults'}")
    rounds(s, learn, args.verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
