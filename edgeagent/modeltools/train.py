"""``edgeagent train``: a classification head on frozen INT8 sentence embeddings (numpy only).

The head is multinomial logistic regression with L2 (L-BFGS, standardised features folded
back into the weights), trained on the encoder bundle's own INT8 embeddings so training and
run time see the same numbers.  A stratified held-out split (seeded) chooses the L2
strength, fits the temperature (ECE before/after is recorded) and the out-of-scope
cut-off; the head is then refitted on all examples.  Examples labelled ``oos_label``
(default ``oos``) and the texts of ``--oos-examples`` (outlier exposure: texts known to be
out of scope) become an out-of-scope class.

Out-of-scope score: each candidate of :data:`edgeagent.backends.onnx.OOS_COMPONENTS`
(centroid cosine, max-softmax, energy, Mahalanobis distance under a shrunk tied covariance,
k-th-neighbour cosine, the out-of-scope class probability) and their combinations is
normalised on the held-out in-scope examples, and its cut-off set so that at most
``oos_target_loss`` of them are flagged.  ``benchmarks/bench_oos.py`` compares them on
out-of-scope text from domains the head never saw; the default is the best there.  A head
trained with no out-of-scope signal keeps the cut-off but the runtime applies it only when
the operator turns ``oos_distance`` on.

Optionally (``--finetune``, build extra) the encoder is first fine-tuned on the training
split with torch on CPU (:mod:`edgeagent.modeltools.finetune`), then re-exported to INT8.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeagent.backends.onnx import Head, OnnxEncoder, predict, split_oos_score
from edgeagent.bundle import read_manifest, sha256_file, write_manifest
from edgeagent.learning.refit_data import save_refit_data
from edgeagent.modeltools.calibrate import (
    curve_from_predictions,
    ece,
    escalation_for,
    fit_temperature,
    nll,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import numpy as np
    import numpy.typing as npt

    FloatArray = npt.NDArray[np.float32]
    Float64Array = npt.NDArray[np.float64]
    IntArray = npt.NDArray[np.int64]


class ExamplesError(ValueError):
    """The examples file is unreadable or has a bad line (the message names the line)."""


def json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` of each non-blank line of a JSON-lines file.
    Raises :class:`ExamplesError` naming the file (and line) when it cannot be read."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ExamplesError(f"{path}: cannot read: {exc}") from None
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield no, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ExamplesError(f"{path}:{no}: not JSON: {exc.msg}") from None


def load_examples(path: Path) -> list[tuple[str, str]]:
    """``{"text": ..., "label": ...}`` JSON lines -> ``[(text, label)]``; blank lines skipped."""
    out: list[tuple[str, str]] = []
    for no, row in json_lines(path):
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("text"), str)
            or not isinstance(row.get("label"), str)
            or not row["label"]
        ):
            raise ExamplesError(f'{path}:{no}: expected {{"text": str, "label": str}}')
        out.append((row["text"], row["label"]))
    if not out:
        raise ExamplesError(f"{path}: no examples")
    return out


def load_texts(path: Path) -> list[str]:
    """Out-of-scope texts: JSON lines of ``{"text": ...}`` (other keys ignored) or of bare
    strings; a ``.txt`` file is one text per line.  Blank lines are skipped."""
    if path.suffix == ".txt":
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ExamplesError(f"{path}: cannot read: {exc}") from None
        out = [line.strip() for line in lines if line.strip()]
    else:
        out = []
        for no, row in json_lines(path):
            text = row.get("text") if isinstance(row, dict) else row
            if not isinstance(text, str) or not text.strip():
                raise ExamplesError(f'{path}:{no}: expected {{"text": str}} or a JSON string')
            out.append(text)
    if not out:
        raise ExamplesError(f"{path}: no texts")
    return out


def stratified_split(labels: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices ``(train, held_out)``: about ``fraction`` of each label held out, at least
    one example of each label kept for training."""
    import numpy as np

    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, lb in enumerate(labels):
        by_label.setdefault(lb, []).append(i)
    train: list[int] = []
    held: list[int] = []
    for lb in sorted(by_label):
        idx = list(rng.permutation(by_label[lb]))
        k = min(len(idx) - 1, round(len(idx) * fraction))
        held.extend(int(i) for i in idx[:k])
        train.extend(int(i) for i in idx[k:])
    return sorted(train), sorted(held)


# -- logistic regression -----------------------------------------------------------------


def lbfgs(
    fun: Callable[[Float64Array], tuple[float, Float64Array]],
    x0: Float64Array,
    *,
    max_iter: int = 500,
    memory: int = 10,
    gtol: float = 1e-5,
) -> Float64Array:
    """Minimise a smooth convex function with L-BFGS and an Armijo backtracking search."""
    import numpy as np

    x = x0.copy()
    f, g = fun(x)
    s_hist: list[Float64Array] = []
    y_hist: list[Float64Array] = []
    for _ in range(max_iter):
        if float(np.abs(g).max()) < gtol:
            break
        q = g.copy()
        alphas: list[tuple[float, float]] = []
        for s, y in zip(reversed(s_hist), reversed(y_hist), strict=True):
            rho = 1.0 / float(y @ s)
            a = rho * float(s @ q)
            q -= a * y
            alphas.append((rho, a))
        if s_hist:
            q *= float(s_hist[-1] @ y_hist[-1]) / float(y_hist[-1] @ y_hist[-1])
        else:
            q /= max(1.0, float(np.linalg.norm(g)))
        for (s, y), (rho, a) in zip(
            zip(s_hist, y_hist, strict=True), reversed(alphas), strict=True
        ):
            q += s * (a - rho * float(y @ q))
        d = -q
        slope = float(g @ d)
        if slope >= 0:  # not a descent direction: restart from steepest descent
            s_hist.clear()
            y_hist.clear()
            d = -g
            slope = float(g @ d)
        step = 1.0
        while True:
            x_new = x + step * d
            f_new, g_new = fun(x_new)
            if f_new <= f + 1e-4 * step * slope or step < 1e-10:
                break
            step *= 0.5
        s_vec, y_vec = x_new - x, g_new - g
        if float(s_vec @ y_vec) > 1e-12:
            s_hist.append(s_vec)
            y_hist.append(y_vec)
            if len(s_hist) > memory:
                s_hist.pop(0)
                y_hist.pop(0)
        converged = abs(f - f_new) <= 1e-10 * max(1.0, abs(f))
        x, f, g = x_new, f_new, g_new
        if converged:
            break
    return x


@dataclass
class LinearHead:
    """Softmax regression on raw (unit-length) embeddings: ``logits = x @ weight + bias``."""

    weight: FloatArray
    bias: FloatArray

    def logits(self, x: FloatArray) -> FloatArray:
        out: FloatArray = x @ self.weight + self.bias
        return out


def fit_logreg(
    x: FloatArray,
    y: IntArray,
    n_classes: int,
    *,
    l2: float,
    class_weight: FloatArray | None = None,
    max_iter: int = 300,
    init: Float64Array | None = None,
) -> tuple[LinearHead, Float64Array]:
    """Multinomial logistic regression, objective ``mean_i w_i * CE_i + l2/2 * |W|^2`` on
    standardised features (bias not penalised).  The scaling is folded into the result.
    Returns the head and the raw parameter vector (a warm start for a related fit)."""
    import numpy as np

    mu = x.mean(axis=0)
    sd = x.std(axis=0) + 1e-6
    xs = ((x - mu) / sd).astype(np.float32)
    n, d = xs.shape
    onehot = np.zeros((n, n_classes), dtype=np.float32)
    onehot[np.arange(n), y] = 1.0
    sw = np.ones(n) if class_weight is None else class_weight[y].astype(np.float64)
    sw = (sw / sw.sum()).astype(np.float32)

    def fun(theta: Float64Array) -> tuple[float, Float64Array]:
        # float32 for the big products (2x faster); L-BFGS itself runs in float64.
        w = theta[: d * n_classes].reshape(d, n_classes).astype(np.float32)
        b = theta[d * n_classes :].astype(np.float32)
        z = xs @ w + b
        z -= z.max(axis=1, keepdims=True)
        logsum = np.log(np.exp(z).sum(axis=1, keepdims=True))
        logp = z - logsum
        loss = float(-(sw * (onehot * logp).sum(axis=1)).sum() + 0.5 * l2 * (w * w).sum())
        r = (np.exp(logp) - onehot) * sw[:, None]
        gw = xs.T @ r + l2 * w
        gb = r.sum(axis=0)
        return loss, np.concatenate([gw.ravel(), gb]).astype(np.float64)

    start = np.zeros(d * n_classes + n_classes) if init is None else init
    theta = lbfgs(fun, start, max_iter=max_iter)
    w = theta[: d * n_classes].reshape(d, n_classes)
    b = theta[d * n_classes :]
    weight = (w / sd[:, None]).astype(np.float32)
    bias = (b - (mu / sd) @ w).astype(np.float32)
    return LinearHead(weight, bias), theta


def fit_mahalanobis(
    x: FloatArray, y: IntArray, classes: list[int], shrinkage: float | None = None
) -> tuple[FloatArray, FloatArray, float]:
    """Class means of ``classes`` and the inverse of their shared (tied) covariance, shrunk
    towards a scaled identity by ``shrinkage`` in [0, 1] (``None``: the Ledoit-Wolf
    estimate).  Returns ``(means (k, d), precision (d, d), shrinkage used)``."""
    import numpy as np

    means = np.stack([x[y == k].mean(axis=0) for k in classes]).astype(np.float64)
    pos = {k: i for i, k in enumerate(classes)}
    sel = np.isin(y, classes)
    r = x[sel].astype(np.float64) - means[[pos[int(k)] for k in y[sel]]]
    n, d = r.shape
    cov = r.T @ r / n
    mu = float(np.trace(cov)) / d
    if shrinkage is None:
        # Ledoit & Wolf (2004): the shrinkage towards mu*I minimising expected Frobenius loss.
        d2 = float(((cov - mu * np.eye(d)) ** 2).sum())
        b2 = (float(((r * r).sum(axis=1) ** 2).sum()) - n * float((cov * cov).sum())) / n**2
        shrinkage = 1.0 if d2 <= 0 else min(1.0, max(0.0, b2 / d2))
    shrunk = (1.0 - shrinkage) * cov + shrinkage * mu * np.eye(d)
    prec = np.linalg.inv(shrunk)
    return means.astype(np.float32), prec.astype(np.float32), float(shrinkage)


def centroids(x: FloatArray, y: IntArray, classes: list[int]) -> FloatArray:
    """Unit-length mean embedding of each class in ``classes`` (in that order)."""
    import numpy as np

    c = np.stack([x[y == k].mean(axis=0) for k in classes])
    out: FloatArray = (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)
    return out


# -- the whole training run --------------------------------------------------------------


@dataclass
class TrainOptions:
    """Knobs of ``edgeagent train`` (defaults are what the benchmark reports)."""

    oos_label: str = "oos"
    held_out: float = 0.15
    seed: int = 0
    l2_grid: tuple[float, ...] = (0.01, 0.003, 0.001)
    blend_grid: tuple[float, ...] = (1.0, 0.7, 0.5)  # 1.0 (linear only) must come first
    knn_k: int = 10
    knn_temp: float = 0.05
    knn_classes: int = 10
    """The kNN vote compares an input with the examples of the linear head's
    ``knn_classes`` best classes only (0: with all examples): same answers in practice,
    a fraction of the cost per job (benchmarks/bench_oos.py --latency)."""
    knn_min_gain: float = 0.05
    oos_weight: float = 1.0
    distance_quantile: float = 0.005  # ignored since oos_target_loss (kept for old callers)
    oos_score: str = "auto"
    """Out-of-scope score: components of ``OOS_COMPONENTS`` joined by ``+`` (mean) or ``|``
    (maximum), or ``auto``
    (:data:`DEFAULT_OOS_SCORE`; :data:`DEFAULT_NO_OOS_SCORE` without an out-of-scope class)."""
    oos_target_loss: float = 0.01
    """Largest share of held-out in-scope examples the out-of-scope cut-off may flag.  The
    held-out split comes from the same collection as the training examples and is easier
    than new traffic: 2 % there flagged 2.5-3.8 % of CLINC150's validation intents, so
    the default aims at 1 % to stay near 2 % on new traffic (benchmarks/bench_oos.py)."""
    oos_candidates: tuple[str, ...] = ()
    """Extra scores to calibrate and report in ``metrics["oos"]["candidates"]``."""
    oos_decline_loss: float | None = 0.001
    """Largest share of held-out in-scope examples above the *decline* cut-off (confidently
    out of scope: a task with ``out_of_scope = "decline"`` answers them ``unrecognized``
    without the cloud).  Set only for a head trained with out-of-scope examples; ``None``:
    no decline cut-off."""
    oos_knn_k: int = 5
    maha_shrinkage: float | None = None  # None: Ledoit-Wolf
    refit: bool = True
    max_length: int = 128
    threads: int = 2


@dataclass
class TrainedHead:
    """The runtime head plus the held-out metrics that went into choosing it."""

    head: Head
    metrics: dict[str, Any] = field(default_factory=dict)


#: The out-of-scope score ``oos_score="auto"`` picks for a head with an out-of-scope class
#: (benchmarks/bench_oos.py).  ``knn+oos_class`` needs less escalation on out-of-scope
#: queries like the training ones (CLINC150's own: ``--proxy``) but flags far fewer of a
#: domain never seen (ATIS flights: 42 vs 55 of 91, tests/test_onnx_backend.py), so it is
#: the README's choice for CLINC-like traffic, not the default.
DEFAULT_OOS_SCORE = "energy|oos_class"
#: ``auto`` for a head without an out-of-scope class (applied only with ``oos_distance``).
DEFAULT_NO_OOS_SCORE = "energy"


def _build_head(
    lin: LinearHead,
    x: FloatArray,
    y: IntArray,
    labels: list[str],
    in_scope: list[int],
    calibration: dict[str, Any],
    maha: tuple[FloatArray, FloatArray, float] | None = None,
) -> Head:
    """A head with every array an out-of-scope score may need (``Head.save`` keeps only
    the ones the chosen score uses)."""
    arrays: dict[str, Any] = {
        "weight": lin.weight,
        "bias": lin.bias,
        "centroids": centroids(x, y, in_scope),
        "knn_emb": x,
        "knn_label": y,
    }
    if maha is not None:
        arrays["maha_mean"], arrays["maha_prec"] = maha[0], maha[1]
    return Head(arrays, labels, calibration)


def _resolve_oos_score(score: str, has_oos_class: bool) -> str:
    """``auto`` -> the default; ``oos_class`` dropped when there is no out-of-scope class."""
    if score == "auto":
        score = DEFAULT_OOS_SCORE if has_oos_class else DEFAULT_NO_OOS_SCORE
    how, comps = split_oos_score(score)
    if not has_oos_class:
        comps = [c for c in comps if c != "oos_class"] or ["energy"]
    return ("|" if how == "max" else "+").join(comps)


#: Decline losses whose cut-offs are also recorded (``metrics.json``: oos.candidates).
DECLINE_GRID = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02)
#: Fewer expected held-out in-scope examples above the cut than this: extrapolate it.
MIN_TAIL = 5
NORMAL_Q90 = 1.2815515655446004  # the standard normal's 90 % quantile


def cut_for_loss(values: FloatArray, budget: int, target_loss: float, n_in: int) -> float:
    """The cut-off above which at most ``budget`` of ``values`` (in-scope scores) lie:
    ``+inf`` when ``budget`` < 0, ``-inf`` when it covers them all.  When ``target_loss``
    of ``n_in`` is fewer than :data:`MIN_TAIL` examples the quantile cannot be read off them
    (it would be their maximum, flagging far more than the target of new inputs): the cut
    is extrapolated with a normal fitted robustly (median, 10-90 % spread), its spread
    widened for the few examples it was measured on."""
    import numpy as np

    cand = np.sort(values)[::-1]
    cut = float(cand[budget]) if 0 <= budget < len(cand) else math.inf
    if budget >= len(cand):
        cut = -math.inf
    if target_loss * n_in < MIN_TAIL and len(cand) >= 2 and math.isfinite(cut):
        lo, mid, hi = np.quantile(cand, [0.1, 0.5, 0.9])
        sigma = float(hi - lo) / (2 * NORMAL_Q90) * (1.0 + 4.0 / len(cand))
        z = statistics.NormalDist().inv_cdf(1.0 - max(target_loss, 1e-6))
        cut = max(cut, float(mid) + z * sigma)
    return cut


def calibrate_oos(
    head: Head,
    emb: FloatArray,
    y: IntArray,
    scores: list[str],
    target_loss: float,
    decline_loss: float | None = None,
) -> dict[str, dict[str, Any]]:
    """For each out-of-scope score in ``scores``: its per-component normalisation (median
    and 10-90 % spread on the in-scope rows of ``emb``) and the cut-off flagging at most
    ``target_loss`` of those rows (arg-max out-of-scope answers count against the budget);
    with the in-scope loss and out-of-scope recall it reaches on these rows.  With
    ``decline_loss``: also the decline cut-off (``oos_decline_cut``, at least the flagging
    cut), above which at most ``decline_loss`` of the in-scope rows lie, with the in-scope
    loss and out-of-scope recall of declining there."""
    import numpy as np

    probs = head.probabilities(emb)
    oos_idx = head.labels.index(head.oos_label) if head.oos_label in head.labels else -1
    is_in = y != oos_idx
    argmax_oos = probs.argmax(axis=1) == oos_idx
    comps = sorted({c for sc in scores for c in split_oos_score(sc)[1]})
    raw = {c: head.component(c, emb, probs) for c in comps}
    norm: dict[str, list[float]] = {}
    for c, v in raw.items():
        lo, mid, hi = np.quantile(v[is_in], [0.1, 0.5, 0.9])
        norm[c] = [float(mid), float(max(hi - lo, 1e-6))]
    out: dict[str, dict[str, Any]] = {}
    n_in = int(is_in.sum())
    budget = math.floor(target_loss * n_in + 1e-9) - int((argmax_oos & is_in).sum())
    for sc in scores:
        how, parts = split_oos_score(sc)
        normed = np.stack([(raw[c] - norm[c][0]) / norm[c][1] for c in parts])
        v = normed.max(axis=0) if how == "max" else normed.mean(axis=0)
        cut = cut_for_loss(v[is_in & ~argmax_oos], budget, target_loss, n_in)
        flagged = argmax_oos | (v > cut)
        res: dict[str, Any] = {
            "oos_score": sc,
            "oos_norm": {c: norm[c] for c in parts},
            # +inf: the arg-max answers alone use the budget; -inf: flag every input.
            "oos_cut": cut if math.isfinite(cut) else (None if cut > 0 else -1e30),
            "in_scope_loss": float(flagged[is_in].mean()) if n_in else 0.0,
        }
        if (~is_in).any():
            res["oos_recall"] = float(flagged[~is_in].mean())
        if decline_loss is not None:
            # At least the flagging cut; when the arg-max answers alone use the flagging
            # budget (no score cut), declining still applies to them above this cut.
            floor = cut if math.isfinite(cut) else -math.inf
            cuts = {
                f"{loss:g}": max(
                    floor, cut_for_loss(v[is_in], math.floor(loss * n_in + 1e-9), loss, n_in)
                )
                for loss in sorted({decline_loss, *DECLINE_GRID})
            }
            dcut = cuts[f"{decline_loss:g}"]
            declined = flagged & (v > dcut)
            res["oos_decline_cut"] = dcut if math.isfinite(dcut) else None
            # The cut-off for other losses (for a hand-edited calibration.json, the benchmark).
            res["oos_decline_cuts"] = {k: c for k, c in cuts.items() if math.isfinite(c)}
            res["declined_in_scope_loss"] = float(declined[is_in].mean()) if n_in else 0.0
            if (~is_in).any():
                res["declined_oos_recall"] = float(declined[~is_in].mean())
        out[sc] = res
    return out


def train_head(
    emb: FloatArray,
    labels: list[str],
    opts: TrainOptions | None = None,
    log: Any = print,
    *,
    oos_emb: FloatArray | None = None,
) -> TrainedHead:
    """Fit the head on embeddings (see module docstring).  Pure numpy.

    ``emb`` (n, dim) unit-length embeddings with their ``labels`` (examples labelled
    ``opts.oos_label`` are out-of-scope examples); ``oos_emb`` (m, dim): embeddings of extra
    texts known to be out of scope (outlier exposure), added with ``opts.oos_label``.

    On a stratified held-out split: choose L2 (calibrated NLL of the linear head), then the
    kNN blend weight (calibrated NLL), fit the temperature, measure ECE before/after and
    the escalation curve, calibrate the out-of-scope score cut-off for
    ``opts.oos_target_loss``.  Then refit on everything.
    """
    import numpy as np

    opts = opts or TrainOptions()
    if oos_emb is not None and len(oos_emb):
        emb = np.concatenate([emb, np.asarray(oos_emb, dtype=np.float32)])
        labels = [*labels, *[opts.oos_label] * len(oos_emb)]
    label_set = sorted(set(labels), key=lambda lb: (lb == opts.oos_label, lb))
    if len([lb for lb in label_set if lb != opts.oos_label]) < 2:
        raise ValueError("need examples of at least two in-scope labels")
    index = {lb: i for i, lb in enumerate(label_set)}
    y = np.array([index[lb] for lb in labels], dtype=np.int64)
    oos_idx = index.get(opts.oos_label)
    in_scope = [i for i, lb in enumerate(label_set) if lb != opts.oos_label]
    class_weight = np.ones(len(label_set), dtype=np.float32)
    if oos_idx is not None:
        class_weight[oos_idx] = opts.oos_weight

    tr, ho = stratified_split(labels, opts.held_out, opts.seed)
    if len(ho) < len(label_set):
        raise ValueError(f"too few examples to hold out {opts.held_out:.0%} for calibration")
    xtr, ytr, xho, yho = emb[tr], y[tr], emb[ho], y[ho]
    maha = fit_mahalanobis(xtr, ytr, in_scope, opts.maha_shrinkage)

    t0 = time.monotonic()
    best: tuple[float, float, LinearHead] | None = None
    scores: dict[str, dict[str, float]] = {}
    theta: Float64Array | None = None
    thetas: dict[float, Float64Array] = {}
    for l2 in opts.l2_grid:  # strongest penalty first; each fit warm-starts the next
        lin, theta = fit_logreg(
            xtr, ytr, len(label_set), l2=l2, class_weight=class_weight, init=theta
        )
        thetas[l2] = theta
        logits = lin.logits(xho)
        temp = fit_temperature(logits, yho)
        score = nll(logits, yho, temp)
        acc = float((logits.argmax(axis=1) == yho).mean())
        scores[f"l2={l2:g}"] = {"nll_calibrated": score, "accuracy": acc}
        log(f"  l2={l2:g}: held-out accuracy {acc:.2%}, calibrated NLL {score:.4f}")
        if best is None or score < best[0]:
            best = (score, l2, lin)
    if best is None:
        raise ValueError("l2_grid is empty")
    _, l2, lin = best

    base_cal: dict[str, Any] = {
        "temperature": 1.0,
        "blend": 1.0,
        "knn_k": opts.knn_k,
        "knn_temp": opts.knn_temp,
        "knn_classes": opts.knn_classes,
        "oos_label": opts.oos_label if oos_idx is not None else None,
        "centroid_cos_min": None,
        "threshold": None,
        "oos_signal": oos_idx is not None,
        "oos_knn_k": opts.oos_knn_k,
    }
    chosen: tuple[float, float, float] | None = None  # (nll, blend, temperature)
    linear_score = math.inf
    for blend in opts.blend_grid:
        probe = _build_head(lin, xtr, ytr, label_set, in_scope, {**base_cal, "blend": blend})
        log_s = probe.log_scores(xho)
        temp = fit_temperature(log_s, yho)
        score = nll(log_s, yho, temp)
        acc = float((log_s.argmax(axis=1) == yho).mean())
        scores[f"blend={blend:g}"] = {"nll_calibrated": score, "accuracy": acc}
        log(
            f"  blend={blend:g} (kNN weight {1 - blend:g}): held-out accuracy {acc:.2%}, "
            f"calibrated NLL {score:.4f}"
        )
        # The kNN vote costs a pass over the examples of the knn_classes best classes
        # per input (and the bundle carries every training embedding): take it only for
        # a clear gain over the linear head alone.
        if blend == 1.0:
            linear_score = score
        elif score >= linear_score * (1.0 - opts.knn_min_gain):
            continue
        if chosen is None or score < chosen[0]:
            chosen = (score, blend, temp)
    if chosen is None:
        raise ValueError("blend_grid is empty")
    _, blend, temperature = chosen

    cal = {**base_cal, "blend": blend}
    probe = _build_head(lin, xtr, ytr, label_set, in_scope, cal)
    log_s = probe.log_scores(xho)
    p_raw = _softmax(log_s)
    p_cal = _softmax(log_s / temperature)
    correct = p_raw.argmax(axis=1) == yho
    ece_before = ece(p_raw.max(axis=1), correct)
    ece_after = ece(p_cal.max(axis=1), correct)
    cal.update(temperature=temperature, ece_before=ece_before, ece_after=ece_after)
    probe = _build_head(lin, xtr, ytr, label_set, in_scope, cal, maha)
    chosen_score = _resolve_oos_score(opts.oos_score, oos_idx is not None)
    scores_to_try = list(dict.fromkeys([chosen_score, *opts.oos_candidates]))
    if oos_idx is None:
        scores_to_try = [sc for sc in scores_to_try if "oos_class" not in split_oos_score(sc)[1]]
    decline_loss = opts.oos_decline_loss if oos_idx is not None else None
    oos_cal = calibrate_oos(
        probe, xho, yho, scores_to_try, opts.oos_target_loss, decline_loss=decline_loss
    )
    oos_choice = oos_cal[chosen_score]
    cal.update(
        oos_score=chosen_score,
        oos_norm=oos_choice["oos_norm"],
        oos_cut=oos_choice["oos_cut"],
        oos_decline_cut=oos_choice.get("oos_decline_cut"),
        oos_target_loss=opts.oos_target_loss,
        maha_shrinkage=maha[2],
    )
    recall = oos_choice.get("oos_recall")
    log(
        f"  out-of-scope score {chosen_score}: held-out in-scope flagged "
        f"{oos_choice['in_scope_loss']:.1%} (target {opts.oos_target_loss:.1%})"
        + ("" if recall is None else f", out-of-scope recall {recall:.1%}")
        + ("" if oos_idx is not None else " (applied only with oos_distance = true)")
    )
    if oos_choice.get("oos_decline_cut") is not None:
        d_recall = oos_choice.get("declined_oos_recall")
        log(
            f'  decline cut-off (tasks with out_of_scope = "decline"): held-out in-scope '
            f"declined {oos_choice['declined_in_scope_loss']:.2%} (target {decline_loss:.2%})"
            + ("" if d_recall is None else f", out-of-scope declined {d_recall:.1%}")
        )
    probe = _build_head(lin, xtr, ytr, label_set, in_scope, cal, maha)
    # Held-out metrics through the same decision code the runtime uses.
    preds = predict(probe, xho, use_threshold=False)
    curve = curve_from_predictions(preds, [label_set[i] for i in yho])
    metrics: dict[str, Any] = {
        "held_out_examples": len(ho),
        "train_examples": len(tr),
        "labels": len(label_set),
        "l2": l2,
        "blend": blend,
        "selection": scores,
        "accuracy": float(correct.mean()),
        "nll_before": nll(log_s, yho),
        "nll_after": nll(log_s, yho, temperature),
        "ece_before": ece_before,
        "ece_after": ece_after,
        "temperature": temperature,
        "flagged_out_of_scope": sum(p.reason == "out_of_scope" for p in preds) / len(preds),
        "escalation_for_98": escalation_for(curve, 0.98).escalation,
        "escalation_for_99": escalation_for(curve, 0.99).escalation,
        "oos": {
            "score": chosen_score,
            "signal": oos_idx is not None,
            "target_loss": opts.oos_target_loss,
            "held_out_in_scope_loss": oos_choice["in_scope_loss"],
            "held_out_oos_recall": recall,
            "decline_loss": decline_loss,
            "held_out_declined_in_scope_loss": oos_choice.get("declined_in_scope_loss"),
            "held_out_declined_oos_recall": oos_choice.get("declined_oos_recall"),
            "maha_shrinkage": maha[2],
            "candidates": oos_cal,
        },
    }
    log(
        f"held-out ({len(ho)}): accuracy {metrics['accuracy']:.2%}, T={temperature:.3f}, "
        f"ECE {ece_before:.4f} -> {ece_after:.4f}, escalation for 98% "
        f"{metrics['escalation_for_98']:.1%}, for 99% {metrics['escalation_for_99']:.1%}"
    )
    head = probe
    if opts.refit:
        lin, _ = fit_logreg(
            emb, y, len(label_set), l2=l2, class_weight=class_weight, init=thetas[l2]
        )
        maha_all = fit_mahalanobis(emb, y, in_scope, maha[2])
        head = _build_head(lin, emb, y, label_set, in_scope, cal, maha_all)
    metrics["fit_seconds"] = round(time.monotonic() - t0, 2)
    metrics["refit_on_all"] = opts.refit
    return TrainedHead(head, metrics)


def _softmax(z: FloatArray) -> FloatArray:
    import numpy as np

    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: FloatArray = e / e.sum(axis=1, keepdims=True)
    return out


def embed_examples(encoder_bundle: Path, texts: list[str], opts: TrainOptions) -> FloatArray:
    """INT8 embeddings of ``texts`` from an encoder (or classifier) bundle."""
    manifest = read_manifest(encoder_bundle)
    tok = manifest.get("tokenizer", {})
    encoder = OnnxEncoder(
        encoder_bundle / "model.onnx",
        encoder_bundle / tok.get("file", "tokenizer.json"),
        max_length=opts.max_length,
        intra_op_threads=opts.threads,
        pad_token=tok.get("pad_token", "[PAD]"),
    )
    return encoder.embed_many(texts)


def train_bundle(
    task: str,
    examples_path: Path,
    encoder_bundle: Path,
    out_root: Path,
    opts: TrainOptions,
    *,
    finetune: dict[str, Any] | None = None,
    command: str | None = None,
    log: Any = print,
    oos_examples: Path | None = None,
) -> Path:
    """Train a head and write a new versioned classifier bundle under ``out_root/task/``.
    Returns the bundle directory.  ``oos_examples``: texts known to be out of scope
    (:func:`load_texts`), trained as the out-of-scope class (outlier exposure).

    With ``finetune`` (keyword arguments of
    :func:`edgeagent.modeltools.finetune.finetune_encoder`, ``{}`` for the defaults) the
    encoder bundle's source model is first fine-tuned on the training split (needs the
    ``build`` extra), exported and quantized again, and the head is trained on that."""
    examples = load_examples(examples_path)
    oos_texts = load_texts(oos_examples) if oos_examples is not None else []
    source = read_manifest(encoder_bundle).get("source")
    with tempfile.TemporaryDirectory(prefix="edgeagent-train-") as tmp:
        if finetune is not None:
            encoder_bundle = _finetuned_encoder(
                task, examples, encoder_bundle, Path(tmp), opts, finetune, log
            )
            # [fine-tune head] On a fine-tuned encoder the kNN vote gains less held-out
            # NLL but still cuts the confident errors that the 99 % escalation hinges on
            # (benchmarks/README.md, bench_finetune.py): a smaller gain takes it.
            from edgeagent.modeltools.finetune import KNN_MIN_GAIN

            opts = replace(opts, knn_min_gain=min(opts.knn_min_gain, KNN_MIN_GAIN))
        return _train_bundle(
            task,
            examples_path,
            examples,
            encoder_bundle,
            source,
            out_root,
            opts,
            finetune,
            command,
            log,
            (oos_examples, oos_texts) if oos_examples is not None else None,
        )


def _finetuned_encoder(
    task: str,
    examples: list[tuple[str, str]],
    encoder_bundle: Path,
    work: Path,
    opts: TrainOptions,
    finetune: dict[str, Any],
    log: Any,
) -> Path:
    from edgeagent.modeltools.build import build_encoder, resolve_source
    from edgeagent.modeltools.finetune import finetune_encoder

    manifest = read_manifest(encoder_bundle, kind="encoder")
    source = resolve_source(str(manifest["source"]["from"]))
    if not Path(source.path_or_id).is_dir():
        raise ValueError(f"fine-tuning needs the source model on disk, not {source.spec!r}")
    train_idx, _ = stratified_split([lb for _, lb in examples], opts.held_out, opts.seed)
    log(f"fine-tuning {source.upstream} on {len(train_idx)} examples (held-out split excluded) …")
    tuned = finetune_encoder(
        Path(source.path_or_id),
        [examples[i] for i in train_idx],
        work / "tuned",
        seed=opts.seed,
        threads=opts.threads,
        log=log,
        **finetune,
    )
    out = work / "encoder"
    build_encoder(
        str(tuned),
        out,
        name=f"{task}-finetuned",
        opset=int(manifest.get("quantization", {}).get("opset", 18)),
        license_override=manifest["source"].get("license"),
        command=f"finetuned from {manifest['source']['from']}",
        log=log,
    )
    return out


def _train_bundle(
    task: str,
    examples_path: Path,
    examples: list[tuple[str, str]],
    encoder_bundle: Path,
    source: Any,
    out_root: Path,
    opts: TrainOptions,
    finetune: dict[str, Any] | None,
    command: str | None,
    log: Any,
    oos: tuple[Path, list[str]] | None = None,
) -> Path:
    enc_manifest = read_manifest(encoder_bundle)
    oos_texts = oos[1] if oos is not None else []
    log(
        f"embedding {len(examples)} examples"
        + (f" and {len(oos_texts)} out-of-scope texts" if oos_texts else "")
        + f" with {encoder_bundle} …"
    )
    t0 = time.monotonic()
    emb = embed_examples(encoder_bundle, [t for t, _ in examples] + oos_texts, opts)
    log(f"  {time.monotonic() - t0:.1f} s")
    trained = train_head(
        emb[: len(examples)],
        [lb for _, lb in examples],
        opts,
        log=log,
        oos_emb=emb[len(examples) :] if oos_texts else None,
    )

    out_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{task}-", dir=out_root))
    try:
        for name in ("model.onnx", "tokenizer.json"):
            shutil.copyfile(encoder_bundle / name, staging / name)
        files = ["model.onnx", "tokenizer.json", *trained.head.save(staging)]
        # What an on-device refit needs (edgeagent.learning): embeddings, labels, split.
        labels = [lb for _, lb in examples]
        _, held = stratified_split(labels, opts.held_out, opts.seed)
        files.append(save_refit_data(staging, emb, labels, held))
        (staging / "metrics.json").write_text(
            json.dumps(trained.metrics, indent=2, sort_keys=True) + "\n", "utf-8"
        )
        files.append("metrics.json")
        manifest: dict[str, Any] = {
            "kind": "classifier",
            "name": task,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "created_by": command or " ".join(sys.argv),
            "source": source,
            "quantization": enc_manifest.get("quantization"),
            "tokenizer": enc_manifest.get("tokenizer"),
            "encoder": {
                **enc_manifest.get("encoder", {}),
                "bundle_fingerprint": enc_manifest["fingerprint"],
                "max_length_trained": opts.max_length,
            },
            "head": {
                "type": "logistic_regression+knn"
                if trained.head.blend < 1
                else "logistic_regression",
                "l2": trained.metrics["l2"],
                "blend": trained.head.blend,
                "labels": len(trained.head.labels),
                "oos_label": trained.head.oos_label,
                "trained_on_examples": len(examples),
                "examples_sha256": sha256_file(examples_path),
                "oos_examples": len(oos_texts),
                "oos_examples_sha256": sha256_file(oos[0]) if oos is not None else None,
                "oos_score": trained.head.oos_score,
                "oos_signal": trained.head.oos_signal,
                "seed": opts.seed,
                "held_out": opts.held_out,
            },
            "metrics": {
                k: trained.metrics[k]
                for k in (
                    "accuracy",
                    "ece_before",
                    "ece_after",
                    "temperature",
                    "escalation_for_98",
                    "escalation_for_99",
                )
            },
            "encoder_finetuned": finetune is not None,
            "finetune": finetune,
        }
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return publish_bundle(staging, out_root / task, manifest, files, log)


def publish_bundle(
    staging: Path, task_dir: Path, manifest: dict[str, Any], files: list[str], log: Any
) -> Path:
    """Hash ``files`` into the staging directory's manifest, move it to
    ``task_dir/<UTC time>-<fingerprint>`` and point ``task_dir/latest`` at it.  The staging
    directory is removed on failure.  Returns the bundle directory."""
    try:
        written = write_manifest(staging, manifest, files)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        final = task_dir / f"{stamp}-{written['fingerprint'][:8]}"
        final.parent.mkdir(parents=True, exist_ok=True)
        staging.chmod(0o755)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _point_latest(final)
    log(f"wrote {final} (fingerprint {written['fingerprint'][:12]}); {final.parent}/latest -> it")
    return final


def _point_latest(bundle: Path) -> None:
    """``TASK/latest`` -> the newest bundle, swapped atomically (a config can name it; a
    SIGHUP then loads the new model; the cache fingerprint changes with the files)."""
    link = bundle.parent / "latest"
    tmp = bundle.parent / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(bundle.name)
    tmp.replace(link)
