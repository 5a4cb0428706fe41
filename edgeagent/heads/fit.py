"""The classifier head: multinomial logistic regression + kNN blend + temperature +
out-of-scope cut-off, fitted on sentence embeddings (numpy only).

:func:`train_head` is what ``edgeagent train`` fits on the bundle's embeddings and what a
refit on the device fits on the bundle's plus the learned examples
(:mod:`edgeagent.learning.refit`).  The rationale of each step is in
:mod:`edgeagent.modeltools.train`.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgeagent.backends.onnx import Head, predict, split_oos_score
from edgeagent.heads.curves import (
    curve_from_predictions,
    ece,
    escalation_for,
    fit_temperature,
    nll,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np
    import numpy.typing as npt

    FloatArray = npt.NDArray[np.float32]
    Float64Array = npt.NDArray[np.float64]
    IntArray = npt.NDArray[np.int64]


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
