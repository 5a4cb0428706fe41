"""The refit process: fit a candidate head, judge it against the serving one, promote or not.

Run by the daemon as ``python -m edgeagent.learning.refit JOB.json RESULT.json`` in a child
process (one thread, niced, address space capped); also callable in-process
(:func:`refit`) by tests and the benchmark.  numpy + onnxruntime only, no torch.

A round:

1. the serving bundle's head, its ``refit.npz`` (training embeddings, labels, held-out
   split; absent in bundles built before it existed) and the learned examples of the job
   (text, cloud label, deterministic train/holdout split);
2. the learned texts are embedded with the bundle's own INT8 encoder;
3. a candidate head is fitted with :func:`edgeagent.heads.fit.train_head` on the
   bundle's examples plus the learned *train* examples (a label the serving model does not
   know needs ``min_examples_per_label`` of them), with the bundle's L2 penalty and kNN
   blend (``reuse_hyperparameters``) and the out-of-scope class weighted ``oos_weight``
   (the cloud's out-of-scope answers are outlier exposure);
4. labels with fewer examples than the median (new intents) get their prior corrected
   (:func:`prior_correction`: the strongest of tau, tau/2, 0 that passes step 6);
5. candidate and serving head are evaluated at the task's operating point on the learned
   *holdout* and on the bundle's own held-out split: accuracy of the local answers at the
   task's threshold, and the escalation needed for ``target_accuracy`` with a perfect
   cloud.  The learned holdout is weighted like the traffic it was drawn from
   (:func:`traffic_weights`: an audit sample stands for 1 / ``audit_rate`` confident jobs);
6. the candidate is promoted only if (a) on the traffic-weighted holdout it is no worse
   than the serving head in both figures, (b) on the bundle's split its local accuracy is
   no worse than the serving head's, and (c) there it needs at most ``split_margin`` more
   escalation than the configured bundle (the forgetting budget: traffic unlike the
   training set may justify flagging a little more of the original task, never more than
   that in total over all rounds).  "No worse" allows ``tolerance`` and ``noise_se``
   binomial standard errors of the reference figure (one-sided; effective sample size
   for a weighted set).  A promoted candidate is published as a new bundle version and
   ``latest`` points at it; otherwise it is counted as ``rejected`` and only its figures
   are kept.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from edgeagent.backends.onnx import Head

    FloatArray = npt.NDArray[np.float32]

PROMOTED = "promoted"
REJECTED = "rejected"
SKIPPED = "skipped"
FAILED = "failed"
OUTCOMES = (PROMOTED, REJECTED, SKIPPED, FAILED)


def evaluate(
    head: Head,
    emb: FloatArray,
    truths: list[str],
    *,
    threshold: float,
    oos_distance: bool | None,
    use_bundle_threshold: bool,
    target_accuracy: float,
    weights: Any = None,
    needed_with_cut: bool = True,
) -> dict[str, Any]:
    """The task's operating point on labelled embeddings.

    ``oos_distance`` as the task's backend setting: ``None`` (unset) applies the head's
    out-of-scope cut-off when it was trained with out-of-scope examples, as the daemon does.
    ``local_accuracy``: share right among the jobs answered locally (no out-of-scope flag,
    not below the bundle threshold, confidence >= the task ``threshold``); ``escalation``:
    share not answered locally; ``accuracy``: overall with a perfect cloud at that point;
    ``escalation_needed``: least escalation reaching ``target_accuracy`` (perfect cloud);
    ``oos_recall``: share of out-of-scope inputs not answered locally (when any).
    ``weights``: one per input (an input standing for that many of the traffic's, see
    :func:`traffic_weights`); shares are then weighted, and ``n_eff`` / ``local_eff`` are
    the effective sample sizes (Kish) the gate's noise bound uses.  ``needed_with_cut``
    False: ``escalation_needed`` ignores the out-of-scope score cut-off (the arg-max
    out-of-scope answers still count)."""
    import numpy as np

    from edgeagent.backends.onnx import predict
    from edgeagent.heads.curves import is_correct

    n = len(truths)
    if n == 0:
        return {"n": 0}
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    preds = predict(head, emb, oos_distance=oos_distance, use_threshold=use_bundle_threshold)
    oos = head.oos_label or "oos"
    truth = np.array(truths, dtype=object)
    is_local = np.array([p.reason is None and p.confidence >= threshold for p in preds])
    right = np.array(
        [(p.output or {}).get("label") == t for p, t in zip(preds, truths, strict=True)]
    )
    is_oos = truth == oos
    raw = predict(
        head, emb, oos_distance=oos_distance if needed_with_cut else False, use_threshold=False
    )
    ok = np.array([is_correct(p, t) for p, t in zip(raw, truths, strict=True)])
    forced = np.array([p.reason == "out_of_scope" for p in raw])
    conf = np.array([p.confidence for p in raw])
    total, w_local = float(w.sum()), float(w[is_local].sum())
    w_right = float(w[is_local & right].sum())
    out: dict[str, Any] = {
        "n": n,
        "n_eff": round(_kish(w), 1),
        "local": int(is_local.sum()),
        "local_eff": round(_kish(w[is_local]), 1),
        "local_accuracy": w_right / w_local if w_local else 1.0,
        "escalation": 1.0 - w_local / total,
        "accuracy": (w_right + total - w_local) / total,
        "escalation_needed": _escalation_needed(conf, ok, forced, w, target_accuracy),
        "local_only_accuracy": float(w[ok | (is_oos & forced)].sum()) / total,
    }
    if is_oos.any():
        out["oos_recall"] = float(w[is_oos & ~is_local].sum() / w[is_oos].sum())
    return out


def _kish(w: Any) -> float:
    """Effective sample size of weights ``w``: (sum w)^2 / sum w^2."""
    sq = float((w * w).sum())
    return float(w.sum()) ** 2 / sq if sq else 0.0


def _escalation_needed(conf: Any, ok: Any, forced: Any, w: Any, target: float) -> float:
    """The least (weighted) share escalated for overall accuracy >= ``target`` with a
    perfect cloud (flagged inputs first, then by ascending confidence; nothing declined)."""
    from edgeagent.heads.curves import weighted_escalation

    return weighted_escalation(conf, ok, forced, None, w, target)


def _se(p: float, n: float) -> float:
    """Binomial standard error of a share ``p`` measured on ``n`` items (Laplace-smoothed,
    so a perfect score on a small set still has some)."""
    if n <= 0:
        return 0.0
    q = (p * n + 1) / (n + 2)
    return math.sqrt(q * (1 - q) / n)


def no_worse(
    cand: dict[str, Any],
    serv: dict[str, Any],
    tolerance: float,
    noise_se: float = 0.0,
    *,
    base: dict[str, Any] | None = None,
    margin: float = 0.0,
) -> list[str]:
    """Why ``cand`` is worse than ``serv`` on one evaluation set (empty: it is not).  A
    difference counts when it exceeds both ``tolerance`` and ``noise_se`` standard errors
    of the serving figure on that set (a one-sided binomial bound; weighted sets use
    their effective size).  With ``base``: the escalation needed is compared with
    ``base`` instead, allowing ``margin`` more (the forgetting budget of the bundle's
    split, see :func:`judge`)."""
    if not cand.get("n"):
        return []
    why = []
    # A serving model that answered nothing locally has a vacuous 100 %: the bound is then
    # that of the candidate's own answers (one wrong answer of one is noise, of 100 not).
    n_local = serv.get("local_eff", serv["local"]) or cand.get("local_eff", cand["local"])
    acc_slack = max(tolerance, noise_se * _se(serv["local_accuracy"], n_local))
    if cand["local_accuracy"] < serv["local_accuracy"] - acc_slack - 1e-12:
        why.append(
            f"local accuracy {cand['local_accuracy']:.4f} < {serv['local_accuracy']:.4f} "
            f"(slack {acc_slack:.4f})"
        )
    ref = serv if base is None else base
    esc_slack = margin + max(
        tolerance, noise_se * _se(ref["escalation_needed"], ref.get("n_eff", ref["n"]))
    )
    if cand["escalation_needed"] > ref["escalation_needed"] + esc_slack + 1e-12:
        why.append(
            f"escalation needed {cand['escalation_needed']:.4f} > "
            f"{ref['escalation_needed']:.4f}{'' if base is None else ' (configured bundle)'} "
            f"(slack {esc_slack:.4f})"
        )
    return why


def refit(job: dict[str, Any], log: Any = None) -> dict[str, Any]:
    """One learning round (see module docstring).  ``job`` keys: ``task``, ``round``,
    ``serving_bundle``, ``versions_dir``, ``examples`` (``[{"text", "label", "split"}]``),
    ``learn`` (:class:`~edgeagent.learning.config.LearnConfig` as a dict), ``threshold``,
    ``oos_distance``, ``use_bundle_threshold``, ``max_length``.  Returns the round's record."""
    import numpy as np

    from edgeagent.backends.onnx import Head
    from edgeagent.bundle import read_manifest
    from edgeagent.learning.config import LearnConfig
    from edgeagent.learning.refit_data import load_refit_data

    t0 = time.monotonic()
    say = log or (lambda *_a: None)
    cfg = LearnConfig.model_validate(job["learn"])
    serving = Path(job["serving_bundle"])
    manifest = read_manifest(serving, kind="classifier")
    head = Head.from_bundle(serving)
    record: dict[str, Any] = {
        "task": job["task"],
        "round": job["round"],
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "serving": serving.name,
        "serving_fingerprint": manifest["fingerprint"],
    }
    data = load_refit_data(serving) if "bundle" in cfg.sources else None
    if data is None:
        record["bundle_examples"] = 0
        record["note"] = (
            "the bundle carries no training embeddings (refit.npz; built by an older "
            "`edgeagent train`): learning from learned examples only"
            if "bundle" in cfg.sources
            else "`bundle` not in learn.sources: learning from learned examples only"
        )
    else:
        record["bundle_examples"] = len(data)

    examples = job["examples"]
    emb = (
        encoder_of(serving, manifest, job).embed_many([e["text"] for e in examples])
        if examples
        else np.zeros((0, head.dim), dtype=np.float32)
    )
    res = fit_round(
        job,
        cfg,
        manifest,
        head,
        data,
        emb,
        [e["label"] for e in examples],
        [e["split"] for e in examples],
        [bool(e.get("audit", False)) for e in examples],
        say,
    )
    record.update(res["record"])
    if res["skip"]:
        return _done(record, SKIPPED, res["skip"], t0)
    if res["failed"]:
        return _done(record, FAILED, res["failed"], t0)
    if res["reasons"]:
        return _done(record, REJECTED, "; ".join(res["reasons"]), t0)
    bundle = _publish(job, serving, manifest, res["head"], record, res["new_labels"], say)
    record["bundle"] = str(bundle)
    record["fingerprint"] = read_manifest(bundle, verify=False)["fingerprint"]
    return _done(record, PROMOTED, "no worse on every evaluation set", t0)


def fit_round(
    job: dict[str, Any],
    cfg: Any,
    manifest: dict[str, Any],
    head: Head,
    data: Any,
    emb: FloatArray,
    labels: list[str],
    splits: list[str],
    audits: list[bool],
    say: Any = None,
) -> dict[str, Any]:
    """Fit and judge a candidate on embeddings (the part of a round after embedding; the
    offline experiments call it directly).  Returns ``{"record": figures for the round's
    record, "skip"/"failed": why there is no candidate, "head", "reasons": why it is
    worse (empty: promote), "new_labels"}``."""
    import numpy as np

    from edgeagent.heads.fit import train_head

    t0 = time.monotonic()
    say = say or (lambda *_a: None)
    out: dict[str, Any] = {"record": {}, "skip": None, "failed": None, "reasons": []}
    record = out["record"]
    train_i = [i for i, s in enumerate(splits) if s == "train"]
    hold_i = [i for i, s in enumerate(splits) if s == "holdout"]
    known = set(head.labels) | (set(data.labels) if data is not None else set())
    counts: dict[str, int] = {}
    for i in train_i:
        counts[labels[i]] = counts.get(labels[i], 0) + 1
    new_labels = sorted(
        lb for lb, c in counts.items() if lb not in known and c >= cfg.min_examples_per_label
    )
    out["new_labels"] = new_labels
    waiting = sorted(lb for lb in counts if lb not in known and lb not in new_labels)
    use_i = [i for i in train_i if labels[i] in known or labels[i] in new_labels]
    record.update(
        learned_train=len(use_i),
        learned_holdout=len(hold_i),
        new_labels=new_labels,
        labels_waiting=waiting,
    )
    if not use_i:
        out["skip"] = "no learned training examples yet"
        return out
    if data is None:
        missing = sorted(set(head.labels) - {labels[i] for i in use_i})
        if missing:
            out["skip"] = (
                f"without the bundle's training embeddings a refit would forget "
                f"{len(missing)} label(s) with no learned examples (e.g. {missing[:3]})"
            )
            return out

    # The bundle's held-out split is never trained on, so it stays a fair test of every
    # learned version (an unseen sample of the original task: forgetting shows there).
    x_parts = [emb[use_i]]
    y = [labels[i] for i in use_i]
    if data is not None:
        keep = np.flatnonzero(~data.held_out)
        x_parts.insert(0, data.emb[keep])
        y = [data.labels[i] for i in keep] + y
    x = np.concatenate(x_parts).astype(np.float32)
    x, y = _balance(x, y, len(y) - len(use_i), cfg.balance_max)
    opts = bundle_options(manifest, head, job)
    cand_opts = dataclasses.replace(
        opts, oos_weight=cfg.oos_weight, oos_target_loss=cfg.oos_target_loss
    )
    say(f"fitting a candidate on {len(y)} examples ({len(use_i)} learned)")
    try:
        trained = train_head(x, y, cand_opts, log=lambda *_a: None)
    except ValueError as exc:
        out["failed"] = f"cannot fit: {exc}"
        return out
    cand = trained.head
    cand.threshold = head.threshold  # the operator's calibrated threshold carries over
    record["fit_s"] = round(time.monotonic() - t0, 2)

    # Variants that cost no refit, strongest first; the first no worse is kept:
    # prior correction tau, tau/2, 0 (a too strong one takes answers from the old labels,
    # which the bundle's split shows) x the out-of-scope cut-off at `oos_target_loss`,
    # then at `edgeagent train`'s 1 % (traffic like the training set gains nothing from
    # flagging more of it, and the traffic-weighted holdout shows that).
    rate = float(job.get("audit_rate") or 0.0)
    hold = (
        emb[hold_i],
        [labels[i] for i in hold_i],
        traffic_weights([audits[i] for i in hold_i], rate),
    )
    taus = sorted({cfg.prior_correction, cfg.prior_correction / 2, 0.0}, reverse=True)
    w_all = traffic_weights(audits, rate)
    traffic_oos = float(w_all[[lb == opts.oos_label for lb in labels]].sum() / w_all.sum())
    train_oos = (
        sum(lb == opts.oos_label for lb in data.labels) / len(data) if data is not None else 0.0
    )
    cuts = _cut_variants(trained.metrics, cand, cfg.oos_target_loss, traffic_oos, train_oos)
    record["traffic_oos_share"] = round(traffic_oos, 4)
    for tau, variant in [(t, c) for t in taus for c in cuts]:
        loss, cut = variant
        tried = copy.copy(cand)
        tried.oos_cut = cut
        shifts = prior_correction(tried, y, tau)
        if tau and not shifts:
            continue  # no label below the median: same as tau = 0
        evaluation, reasons, point = judge(job, cfg, manifest, head, data, hold, opts, tried)
        if not reasons:
            break
    record.update(
        evaluation=evaluation,
        operating_point=point,
        prior_correction={"tau": tau, "shifts": shifts},
        oos_cut={"target_loss": loss, "cut": cut},
    )
    out.update(head=tried, reasons=reasons, tau=tau)
    return out


def encoder_of(bundle: Path, manifest: dict[str, Any], job: dict[str, Any]) -> Any:
    """The bundle's own INT8 encoder, one thread."""
    from edgeagent.backends.onnx import OnnxEncoder

    tok = manifest.get("tokenizer", {})
    return OnnxEncoder(
        bundle / "model.onnx",
        bundle / tok.get("file", "tokenizer.json"),
        max_length=int(job.get("max_length", 128)),
        intra_op_threads=1,
        pad_token=tok.get("pad_token", "[PAD]"),
    )


def bundle_options(manifest: dict[str, Any], head: Head, job: dict[str, Any]) -> Any:
    """The :class:`~edgeagent.heads.fit.TrainOptions` the bundle was trained with
    (as far as its manifest records them).  With ``learn.reuse_hyperparameters`` the L2
    penalty and kNN blend its training chose are taken as they are instead of searched
    again (one fit instead of a grid of them)."""
    from edgeagent.heads.fit import TrainOptions

    hinfo = manifest.get("head", {})
    grids: dict[str, Any] = {}
    if job.get("learn", {}).get("reuse_hyperparameters", True):
        if isinstance(hinfo.get("l2"), (int, float)):
            grids["l2_grid"] = (float(hinfo["l2"]),)
        if isinstance(hinfo.get("blend"), (int, float)):
            grids["blend_grid"] = (float(hinfo["blend"]),)
    return TrainOptions(
        oos_label=head.oos_label or hinfo.get("oos_label") or "oos",
        held_out=float(hinfo.get("held_out", 0.15)),
        seed=int(hinfo.get("seed", 0)),
        max_length=int(job.get("max_length", 128)),
        threads=1,
        **grids,
    )


def judge(
    job: dict[str, Any],
    cfg: Any,
    manifest: dict[str, Any],
    head: Head,
    data: Any,
    hold: tuple[FloatArray, list[str], Any],
    opts: Any,
    cand: Head,
) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """Candidate vs serving head at the task's operating point on the learned holdout
    ``hold`` and the bundle's own held-out split (``data``): ``(evaluation, why the
    candidate is worse, operating point)``; no reasons means it may be promoted."""
    import numpy as np

    point: dict[str, Any] = {
        "threshold": float(job.get("threshold", 0.5)),
        # The backend's setting as it is: unset (None) means the head's own out-of-scope
        # signal decides, as at run time (bool(None) judged a CLINC-like head without its
        # cut-off while the daemon serves it with it).
        "oos_distance": job.get("oos_distance", True),
        "use_bundle_threshold": bool(job.get("use_bundle_threshold", True)),
        "target_accuracy": cfg.target_accuracy,
    }
    sets: dict[str, tuple[FloatArray, list[str], Any]] = {}
    if hold[1]:
        sets["learned_holdout"] = hold
    if data is not None and data.held_out.any():
        idx = np.flatnonzero(data.held_out)
        sets["bundle_held_out"] = (data.emb[idx], [data.labels[i] for i in idx], None)
    evaluation: dict[str, Any] = {}
    reasons: list[str] = []
    Path(job["versions_dir"]).mkdir(parents=True, exist_ok=True)
    for name, (e, t, w) in sets.items():
        # On the bundle's split the escalation needed is read without the out-of-scope
        # cut-off (flagged-as-out-of-scope answers still count): the split stands for the
        # original task, and what a cut-off costs on in-scope traffic against what it
        # catches is the traffic-weighted holdout's to judge.
        with_cut = name != "bundle_held_out"
        before = evaluate(head, e, t, weights=w, needed_with_cut=with_cut, **point)
        after = evaluate(cand, e, t, weights=w, needed_with_cut=with_cut, **point)
        entry: dict[str, Any] = {"serving": before, "candidate": after}
        base = None
        if name == "bundle_held_out" and data is not None:
            # The configured bundle was refitted on its whole set, split included: it is
            # represented by the same recipe fitted without the split (cached per bundle).
            control = _control_head(job, manifest, data, opts, head)
            base = evaluate(control, e, t, needed_with_cut=with_cut, **point)
            entry["base"] = base
            if not manifest.get("learned"):
                entry["serving"] = before = base
                entry["serving_is"] = "control: the bundle's recipe without the split"
        evaluation[name] = entry
        why = no_worse(
            after, before, cfg.tolerance, cfg.noise_se, base=base, margin=cfg.split_margin
        )
        reasons += [f"{name}: {w}" for w in why]
    if not sets:
        reasons.append("nothing to judge the candidate on (no holdout, no bundle split)")
    return evaluation, reasons, point


def _cut_variants(
    metrics: dict[str, Any],
    cand: Head,
    target_loss: float,
    traffic_oos: float,
    train_oos: float,
) -> list[tuple[float, float | None]]:
    """``[(loss, cut)]`` to try, in order: the out-of-scope cut-offs flagging
    ``target_loss`` and 1 % (``edgeagent train``'s) of the candidate's held-out in-scope
    examples.  The stricter one is tried only when the traffic's out-of-scope odds
    (learned examples, traffic-weighted) are at least ``target_loss / 1 %`` times the
    training set's: flagging more in-scope inputs pays only where out-of-scope inputs are
    that much more common (a Bayes cut-off moves with the prior odds).  The 1 % cut-off
    is the one ``train_head`` recorded among the decline cut-offs (the same score)."""
    low_loss = 0.01
    oos = metrics.get("oos") or {}
    cuts = ((oos.get("candidates") or {}).get(oos.get("score")) or {}).get("oos_decline_cuts")
    low = (cuts or {}).get(f"{low_loss:g}")
    if target_loss <= low_loss or not isinstance(low, (int, float)) or cand.oos_cut is None:
        return [(target_loss, cand.oos_cut)]
    weak = (low_loss, max(float(low), cand.oos_cut))

    def odds(p: float) -> float:
        return min(p, 0.999) / (1.0 - min(p, 0.999))

    if odds(traffic_oos) >= odds(max(train_oos, 1e-3)) * target_loss / low_loss:
        return [(target_loss, cand.oos_cut), weak]
    return [weak]


def traffic_weights(audits: list[bool], audit_rate: float) -> Any:
    """Importance weights that make learned examples stand for the traffic they came from:
    every escalated job reaches the cloud (weight 1) but only ``audit_rate`` of the
    confident local answers are audited, so an audit sample stands for 1 / audit_rate jobs.
    Without audits (rate 0) every example weighs 1."""
    import numpy as np

    w = np.ones(len(audits))
    if 0.0 < audit_rate < 1.0:
        w[np.asarray(audits, dtype=bool)] = 1.0 / audit_rate
    return w


def _balance(
    x: FloatArray, y: list[str], first_learned: int, factor: float
) -> tuple[FloatArray, list[str]]:
    """Repeat the learned examples of labels with fewer examples than the median label
    (new intents start with a handful against ~100) up to ``factor`` times."""
    import numpy as np

    if factor <= 1.0 or first_learned >= len(y):
        return x, y
    counts: dict[str, int] = {}
    for lb in y:
        counts[lb] = counts.get(lb, 0) + 1
    median = float(np.median(list(counts.values())))
    extra: list[int] = []
    for i in range(first_learned, len(y)):
        c = counts[y[i]]
        reps = round(min(factor, median / c)) - 1 if c < median else 0
        extra.extend([i] * reps)
    if not extra:
        return x, y
    out: FloatArray = np.concatenate([x, x[extra]]).astype(np.float32)
    return out, y + [y[i] for i in extra]


def prior_correction(head: Head, labels: list[str], tau: float) -> dict[str, float]:
    """Logit adjustment for labels with fewer training examples than the median label (a
    new intent with a handful of cloud answers against ~100 for the others): a softmax
    regression fitted on such data learns their scarcity as a low prior, so their bias is
    raised by ``tau * ln(median / count)``.  The out-of-scope class is left alone (its
    count is outlier exposure, not a prior).  Returns the shifts applied, by label."""
    import numpy as np

    if tau <= 0:
        return {}
    counts: dict[str, int] = {}
    for lb in labels:
        counts[lb] = counts.get(lb, 0) + 1
    median = float(np.median([c for lb, c in counts.items() if lb != head.oos_label]))
    shifts: dict[str, float] = {}
    for lb in head.labels:
        c = counts.get(lb, 0)
        if lb != head.oos_label and 0 < c < median:
            shifts[lb] = round(tau * math.log(median / c), 4)
    if shifts:  # a new array: a copied head shares the old one
        head.bias = head.bias + np.array(
            [shifts.get(lb, 0.0) for lb in head.labels], dtype=np.float32
        )
    return shifts


def _control_head(
    job: dict[str, Any], manifest: dict[str, Any], data: Any, opts: Any, head: Head
) -> Head:
    """The configured bundle's recipe fitted on its examples minus the held-out split;
    saved under ``versions_dir/.control-<fingerprint>`` and reused."""
    import numpy as np

    from edgeagent.backends.onnx import Head
    from edgeagent.heads.fit import train_head
    from edgeagent.learning.versions import base_fingerprint

    cache = Path(job["versions_dir"]) / f".control-{base_fingerprint(manifest)[:16]}"
    if (cache / "head.npz").exists():
        with contextlib.suppress(OSError, ValueError, KeyError):
            return Head.from_bundle(cache)
    keep = np.flatnonzero(~data.held_out)
    control = train_head(
        data.emb[keep], [data.labels[i] for i in keep], opts, log=lambda *_a: None
    ).head
    control.threshold = head.threshold
    tmp = Path(tempfile.mkdtemp(prefix=".control-", dir=cache.parent))
    control.save(tmp)
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)
    return control


def _done(record: dict[str, Any], outcome: str, why: str, t0: float) -> dict[str, Any]:
    record.update(
        outcome=outcome,
        why=why,
        seconds=round(time.monotonic() - t0, 2),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )
    return record


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # versions share the encoder file (same bytes, hashed anyway)
    except OSError:
        shutil.copyfile(src, dst)


def _publish(
    job: dict[str, Any],
    serving: Path,
    manifest: dict[str, Any],
    cand: Head,
    record: dict[str, Any],
    new_labels: list[str],
    say: Any,
) -> Path:
    from edgeagent.bundle import publish_bundle
    from edgeagent.learning.refit_data import REFIT_FILE
    from edgeagent.learning.versions import base_fingerprint

    vdir = Path(job["versions_dir"])
    vdir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".round-", dir=vdir))
    try:
        tok_file = manifest.get("tokenizer", {}).get("file", "tokenizer.json")
        files = ["model.onnx", tok_file]
        for name in files:
            _link_or_copy(serving / name, staging / name)
        files += cand.save(staging)
        if (serving / REFIT_FILE).exists():
            # The bundle's own examples only: learned ones come from the store each round.
            _link_or_copy(serving / REFIT_FILE, staging / REFIT_FILE)
            files.append(REFIT_FILE)
        (staging / "metrics.json").write_text(
            json.dumps(record, indent=2, sort_keys=True) + "\n", "utf-8"
        )
        files.append("metrics.json")
        new = {k: v for k, v in manifest.items() if k not in ("files", "fingerprint", "format")}
        new.update(
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            created_by=f"edgeagent learning round {job['round']} (task {job['task']})",
        )
        new["head"] = {**manifest.get("head", {}), "labels": len(cand.labels)}
        new["learned"] = {
            "base_fingerprint": base_fingerprint(manifest),
            "parent_fingerprint": manifest["fingerprint"],
            "round": job["round"],
            "learned_train": record["learned_train"],
            "learned_holdout": record["learned_holdout"],
            "new_labels": new_labels,
        }
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return publish_bundle(staging, vdir, new, files, say)


PARENT_ENV = "EDGEAGENT_REFIT_PARENT"
"""The daemon's pid, set by the learner for the refit process."""


def _die_with_parent() -> None:
    """Ask the kernel to kill this process when the daemon dies (Linux
    ``PR_SET_PDEATHSIG``): a refit the daemon paused (SIGSTOP) must not outlive it."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    parent = os.environ.get(PARENT_ENV)
    if parent and os.getppid() != int(parent):  # the daemon died before that took effect
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    """``python -m edgeagent.learning.refit JOB.json RESULT.json``: exit 0 with a result
    file for every outcome, 1 (and a traceback on stderr) when the round crashed."""
    args = sys.argv[1:] if argv is None else argv
    job_path, result_path = Path(args[0]), Path(args[1])
    _die_with_parent()
    job = json.loads(job_path.read_text("utf-8"))
    limits = job.get("limits", {})
    if limits.get("nice"):
        os.nice(int(limits["nice"]))
    if limits.get("idle") and hasattr(os, "sched_setscheduler"):
        # SCHED_IDLE: the refit gets a core only when nothing else wants it (Linux).
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    if limits.get("max_memory_mb"):
        cap = int(limits["max_memory_mb"]) << 20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        record = refit(job, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except MemoryError:
        record = _done(
            {"task": job.get("task"), "round": job.get("round")},
            FAILED,
            "out of memory (learn.refit_max_memory_mb)",
            time.monotonic(),
        )
    except Exception:
        traceback.print_exc()
        return 1
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, sort_keys=True) + "\n", "utf-8")
    tmp.replace(result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
