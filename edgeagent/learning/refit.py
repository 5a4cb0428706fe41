"""The refit process: fit a candidate head, judge it against the serving one, promote or not.

Run by the daemon as ``python -m edgeagent.learning.refit JOB.json RESULT.json`` in a child
process (one thread, niced, address space capped); also callable in-process
(:func:`refit`) by tests and the benchmark.  numpy + onnxruntime only, no torch.

A round:

1. the serving bundle's head, its ``refit.npz`` (training embeddings, labels, held-out
   split; absent in bundles built before it existed) and the learned examples of the job
   (text, cloud label, deterministic train/holdout split);
2. the learned texts are embedded with the bundle's own INT8 encoder;
3. a candidate head is fitted with :func:`edgeagent.modeltools.train.train_head` on the
   bundle's examples plus the learned *train* examples (a label the serving model does not
   know needs ``min_examples_per_label`` of them), with the bundle's L2 penalty and kNN
   blend (``reuse_hyperparameters``) and the out-of-scope class weighted ``oos_weight``
   (the cloud's out-of-scope answers are outlier exposure);
4. labels with fewer examples than the median (new intents) get their prior corrected
   (:func:`prior_correction`: the strongest of tau, tau/2, 0 that passes step 6);
5. candidate and serving head are evaluated at the task's operating point on the learned
   *holdout* and on the bundle's own held-out split: accuracy of the local answers at the
   task's threshold, and the escalation needed for ``target_accuracy`` with a perfect cloud;
6. the candidate is promoted only if it is no worse on both (a difference counts when it
   exceeds ``tolerance`` and ``noise_se`` binomial standard errors of the serving figure): it is
   published as a new bundle version and ``latest`` points at it; otherwise it is counted
   as ``rejected`` and only its figures are kept.
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
    oos_distance: bool,
    use_bundle_threshold: bool,
    target_accuracy: float,
) -> dict[str, Any]:
    """The task's operating point on labelled embeddings.

    ``local_accuracy``: share right among the jobs answered locally (no out-of-scope flag,
    not below the bundle threshold, confidence >= the task ``threshold``); ``escalation``:
    share not answered locally; ``accuracy``: overall with a perfect cloud at that point;
    ``escalation_needed``: least escalation reaching ``target_accuracy`` (perfect cloud);
    ``oos_recall``: share of out-of-scope inputs not answered locally (when any)."""
    from edgeagent.backends.onnx import predict
    from edgeagent.modeltools.calibrate import curve_from_predictions, escalation_for

    n = len(truths)
    if n == 0:
        return {"n": 0}
    preds = predict(head, emb, oos_distance=oos_distance, use_threshold=use_bundle_threshold)
    oos = head.oos_label or "oos"
    local = right = oos_n = oos_caught = 0
    for p, t in zip(preds, truths, strict=True):
        is_local = p.reason is None and p.confidence >= threshold
        label = (p.output or {}).get("label")
        if t == oos:
            oos_n += 1
            oos_caught += not is_local
        if is_local:
            local += 1
            right += label == t
    raw = predict(head, emb, oos_distance=oos_distance, use_threshold=False)
    curve = curve_from_predictions(raw, truths)
    out: dict[str, Any] = {
        "n": n,
        "local": local,
        "local_accuracy": right / local if local else 1.0,
        "escalation": 1.0 - local / n,
        "accuracy": (right + n - local) / n,
        "escalation_needed": escalation_for(curve, target_accuracy).escalation,
        "local_only_accuracy": sum(
            (p.output or {}).get("label") == t or (t == oos and p.reason == "out_of_scope")
            for p, t in zip(raw, truths, strict=True)
        )
        / n,
    }
    if oos_n:
        out["oos_recall"] = oos_caught / oos_n
    return out


def _se(p: float, n: int) -> float:
    """Binomial standard error of a share ``p`` measured on ``n`` items (Laplace-smoothed,
    so a perfect score on a small set still has some)."""
    if n <= 0:
        return 0.0
    q = (p * n + 1) / (n + 2)
    return math.sqrt(q * (1 - q) / n)


def no_worse(
    cand: dict[str, Any], serv: dict[str, Any], tolerance: float, noise_se: float = 0.0
) -> list[str]:
    """Why ``cand`` is worse than ``serv`` on one evaluation set (empty: it is not).  A
    difference counts when it exceeds both ``tolerance`` and ``noise_se`` standard errors
    of the serving figure on that set."""
    if not cand.get("n"):
        return []
    why = []
    acc_slack = max(tolerance, noise_se * _se(serv["local_accuracy"], serv["local"]))
    if cand["local_accuracy"] < serv["local_accuracy"] - acc_slack - 1e-12:
        why.append(
            f"local accuracy {cand['local_accuracy']:.4f} < {serv['local_accuracy']:.4f} "
            f"(slack {acc_slack:.4f})"
        )
    esc_slack = max(tolerance, noise_se * _se(serv["escalation_needed"], serv["n"]))
    if cand["escalation_needed"] > serv["escalation_needed"] + esc_slack + 1e-12:
        why.append(
            f"escalation needed {cand['escalation_needed']:.4f} > "
            f"{serv['escalation_needed']:.4f} (slack {esc_slack:.4f})"
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
    from edgeagent.modeltools.train import train_head

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
    train_i = [i for i, e in enumerate(examples) if e["split"] == "train"]
    hold_i = [i for i, e in enumerate(examples) if e["split"] == "holdout"]
    known = set(head.labels) | (set(data.labels) if data is not None else set())
    counts: dict[str, int] = {}
    for i in train_i:
        counts[examples[i]["label"]] = counts.get(examples[i]["label"], 0) + 1
    new_labels = sorted(
        lb for lb, c in counts.items() if lb not in known and c >= cfg.min_examples_per_label
    )
    waiting = sorted(lb for lb in counts if lb not in known and lb not in new_labels)
    use_i = [
        i for i in train_i if examples[i]["label"] in known or examples[i]["label"] in new_labels
    ]
    record.update(
        learned_train=len(use_i),
        learned_holdout=len(hold_i),
        new_labels=new_labels,
        labels_waiting=waiting,
    )
    if not use_i:
        return _done(record, SKIPPED, "no learned training examples yet", t0)
    if data is None:
        missing = sorted(set(head.labels) - {examples[i]["label"] for i in use_i})
        if missing:
            return _done(
                record,
                SKIPPED,
                f"without the bundle's training embeddings a refit would forget "
                f"{len(missing)} label(s) with no learned examples (e.g. {missing[:3]})",
                t0,
            )

    # The bundle's held-out split is never trained on, so it stays a fair test of every
    # learned version (an unseen sample of the original task: forgetting shows there).
    x_parts = [emb[use_i]]
    y_parts = [examples[i]["label"] for i in use_i]
    if data is not None:
        keep = np.flatnonzero(~data.held_out)
        x_parts.insert(0, data.emb[keep])
        y_parts = [data.labels[i] for i in keep] + y_parts
    x = np.concatenate(x_parts).astype(np.float32)
    x, y_parts = _balance(x, y_parts, len(y_parts) - len(use_i), cfg.balance_max)
    opts = bundle_options(manifest, head, job)
    cand_opts = dataclasses.replace(
        opts, oos_weight=cfg.oos_weight, oos_target_loss=cfg.oos_target_loss
    )
    say(f"fitting a candidate on {len(y_parts)} examples ({len(use_i)} learned)")
    try:
        cand = train_head(x, y_parts, cand_opts, log=lambda *_a: None).head
    except ValueError as exc:
        return _done(record, FAILED, f"cannot fit: {exc}", t0)
    cand.threshold = head.threshold  # the operator's calibrated threshold carries over
    fit_s = time.monotonic() - t0

    # Prior correction: the strongest of tau, tau/2, 0 that is no worse (the bias shift
    # costs no refit; a too strong one takes answers from the old labels, which the
    # bundle's split shows).
    hold = (emb[hold_i], [examples[i]["label"] for i in hold_i])
    taus = sorted({cfg.prior_correction, cfg.prior_correction / 2, 0.0}, reverse=True)
    for tau in taus:
        tried = copy.copy(cand)
        shifts = prior_correction(tried, y_parts, tau)
        if tau and not shifts:
            continue  # no label below the median: same as tau = 0
        evaluation, reasons, point = judge(job, cfg, manifest, head, data, hold, opts, tried)
        if not reasons:
            break
    cand = tried
    record.update(
        evaluation=evaluation,
        fit_s=round(fit_s, 2),
        operating_point=point,
        prior_correction={"tau": tau, "shifts": shifts},
    )
    if reasons:
        return _done(record, REJECTED, "; ".join(reasons), t0)
    bundle = _publish(job, serving, manifest, cand, record, new_labels, say)
    record["bundle"] = str(bundle)
    record["fingerprint"] = read_manifest(bundle, verify=False)["fingerprint"]
    return _done(record, PROMOTED, "no worse on every evaluation set", t0)


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
    """The :class:`~edgeagent.modeltools.train.TrainOptions` the bundle was trained with
    (as far as its manifest records them).  With ``learn.reuse_hyperparameters`` the L2
    penalty and kNN blend its training chose are taken as they are instead of searched
    again (one fit instead of a grid of them)."""
    from edgeagent.modeltools.train import TrainOptions

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
    hold: tuple[FloatArray, list[str]],
    opts: Any,
    cand: Head,
) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """Candidate vs serving head at the task's operating point on the learned holdout
    ``hold`` and the bundle's own held-out split (``data``): ``(evaluation, why the
    candidate is worse, operating point)``; no reasons means it may be promoted."""
    import numpy as np

    point: dict[str, Any] = {
        "threshold": float(job.get("threshold", 0.5)),
        "oos_distance": bool(job.get("oos_distance", True)),
        "use_bundle_threshold": bool(job.get("use_bundle_threshold", True)),
        "target_accuracy": cfg.target_accuracy,
    }
    sets: dict[str, tuple[FloatArray, list[str]]] = {}
    if hold[1]:
        sets["learned_holdout"] = hold
    if data is not None and data.held_out.any():
        idx = np.flatnonzero(data.held_out)
        sets["bundle_held_out"] = (data.emb[idx], [data.labels[i] for i in idx])
    evaluation: dict[str, Any] = {}
    reasons: list[str] = []
    Path(job["versions_dir"]).mkdir(parents=True, exist_ok=True)
    for name, (e, t) in sets.items():
        serving = head
        if name == "bundle_held_out" and not manifest.get("learned") and data is not None:
            # The configured bundle was refitted on its whole set, split included: stand
            # in for it with the same recipe fitted without the split (cached per bundle).
            serving = _control_head(job, manifest, data, opts, head)
        before = evaluate(serving, e, t, **point)
        after = evaluate(cand, e, t, **point)
        evaluation[name] = {"serving": before, "candidate": after}
        if serving is not head:
            evaluation[name]["serving_is"] = "control: the bundle's recipe without the split"
        reasons += [f"{name}: {w}" for w in no_worse(after, before, cfg.tolerance, cfg.noise_se)]
    if not sets:
        reasons.append("nothing to judge the candidate on (no holdout, no bundle split)")
    return evaluation, reasons, point


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
    from edgeagent.modeltools.train import train_head

    cache = Path(job["versions_dir"]) / f".control-{manifest['fingerprint'][:16]}"
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
    from edgeagent.learning.refit_data import REFIT_FILE
    from edgeagent.learning.versions import base_fingerprint
    from edgeagent.modeltools.train import publish_bundle

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


def main(argv: list[str] | None = None) -> int:
    """``python -m edgeagent.learning.refit JOB.json RESULT.json``: exit 0 with a result
    file for every outcome, 1 (and a traceback on stderr) when the round crashed."""
    args = sys.argv[1:] if argv is None else argv
    job_path, result_path = Path(args[0]), Path(args[1])
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
