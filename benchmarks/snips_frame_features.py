"""Which frame confidence ranks a joint bundle's SNIPS frame errors best (issue 12).

    .venv/bin/python benchmarks/snips_frame_features.py --bundle models/bundles/snips/latest \
        [--examples ../shared/datasets/snips/train.jsonl] \
        [--data ../shared/datasets/snips/validation.jsonl] [--cache /tmp/snips-joint.pkl]

Runs the bundle's INT8 model once over its own held-out split of the training file (the
split ``train`` calibrated on: the manifest's ``held_out`` and ``seed``) and over the
validation file, one input at a time, and caches the joint logits (``--cache``).  Then,
on the decoded frames (the bundle's temperatures, slots of the predicted intent only, as
the runtime decodes), it compares confidences by the escalation a perfect cloud needs for
97 % frames (intent and every span right):

* ``product/words`` (the runtime default without a frame calibrator);
* logistic regressions on feature sets (:data:`FEATURE_SETS`): the bundle calibrator's
  log confidences + log intent (``base``), plus tag margins at the span boundaries, the
  intent margin, entropy, the span count against the intent's, and gazetteer features
  (is each predicted value one the training part gave that slot; is it another slot's;
  is a value of that slot one word longer or shorter: a boundary near-miss).

The regressions are fitted on the held-out split only, never on validation: the held-out
figure is cross-fitted (5 folds, averaged over 5 fold seeds), the validation figure comes
from the regression fitted on the whole held-out split.  The gazetteer is built from the
bundle's training part (the held-out sentences excluded), as ``train`` would store it.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np

import edgeagent.backends  # noqa: F401  (import order)
from edgeagent.backends import tagger as device
from edgeagent.bundle import read_manifest
from edgeagent.heads.curves import ece, escalation_curve, escalation_for
from edgeagent.modeltools.joint import bundle_held_out, joint_correct, load_intents
from edgeagent.modeltools.tagger import (
    calibration_backend,
    fit_logistic,
    load_tagged_examples,
    offsets_of,
)

REPO = Path(__file__).resolve().parent.parent
DATASETS = Path(os.environ.get("EDGEAGENT_DATASETS") or REPO.parent / "shared/datasets")
TARGET = 0.97
_FLOOR = 1e-6


def _log(x: float) -> float:
    return math.log(max(x, _FLOOR))


class Gazetteer:
    """What the training part says about slot values, per slot and per intent."""

    def ambiguity(self, side: str, slot: str, word: str) -> float:
        """How often the training part puts ``word`` on the other side of a ``slot`` edge."""
        i = self.inside.get((side, slot, word), 0)
        o = self.outside.get((side, slot, word), 0)
        return min(i, o) / (i + o + 1.0)

    def __init__(self, examples: list[tuple[list[str], list[str]]], intents: list[str]) -> None:
        from edgeagent.modeltools.tagger import gold_spans

        self.values: dict[str, set[str]] = {}
        self.slots_of: dict[str, set[str]] = {}
        spans_of_intent: dict[str, list[int]] = {}
        # intent -> (sorted slot types of a sentence) -> count: how usual the whole set is
        slot_sets: dict[str, dict[tuple[str, ...], int]] = {}
        slot_in_intent: dict[str, dict[str, int]] = {}
        halves: list[dict[str, list[str]]] = [{}, {}]
        # (side, slot, word) -> how often the word is a span's edge word / the O word next
        # to the span: a word on both sides of the edge ("the" before a title) is ambiguous
        self.inside: dict[tuple[str, str, str], int] = {}
        self.outside: dict[tuple[str, str, str], int] = {}
        for k, ((words, tags), intent) in enumerate(zip(examples, intents, strict=True)):
            spans = sorted(gold_spans(tags), key=lambda s: s[1])
            spans_of_intent.setdefault(intent, []).append(len(spans))
            key = tuple(sorted(s for s, _, _ in spans))
            sets = slot_sets.setdefault(intent, {})
            sets[key] = sets.get(key, 0) + 1
            folded = [w.casefold() for w in words]
            for slot, a, b in spans:
                for key, where in (
                    (("L", slot, folded[a]), self.inside),
                    (("R", slot, folded[b]), self.inside),
                    (
                        ("L", slot, folded[a - 1]),
                        self.outside if a > 0 and tags[a - 1] == "O" else None,
                    ),
                    (
                        ("R", slot, folded[b + 1] if b + 1 < len(words) else ""),
                        self.outside if b + 1 < len(words) and tags[b + 1] == "O" else None,
                    ),
                ):
                    if where is not None:
                        where[key] = where.get(key, 0) + 1
                v = " ".join(words[a : b + 1]).casefold()
                self.values.setdefault(slot, set()).add(v)
                self.slots_of.setdefault(v, set()).add(slot)
                counts = slot_in_intent.setdefault(intent, {})
                counts[slot] = counts.get(slot, 0) + 1
                halves[k % 2].setdefault(slot, []).append(v)
        # novelty: share of the odd half's occurrences of a slot unseen in the even half
        self.novelty: dict[str, float] = {}
        for slot in self.values:
            seen = set(halves[0].get(slot, []))
            odd = halves[1].get(slot, [])
            unseen = sum(v not in seen for v in odd)
            self.novelty[slot] = (unseen + 0.5) / (len(odd) + 1.0)
        self.span_counts: dict[str, dict[int, float]] = {}
        for intent, ns in spans_of_intent.items():
            total = len(ns)
            hist: dict[int, float] = {}
            for n in ns:
                hist[n] = hist.get(n, 0) + 1
            self.span_counts[intent] = {n: c / total for n, c in hist.items()}
        self.slot_set_share: dict[str, dict[tuple[str, ...], float]] = {
            i: {k: c / len(spans_of_intent[i]) for k, c in sets.items()}
            for i, sets in slot_sets.items()
        }
        self.slot_share: dict[str, dict[str, float]] = {
            i: {s: c / len(spans_of_intent[i]) for s, c in counts.items()}
            for i, counts in slot_in_intent.items()
        }


def features(
    t: device.TaggedText,
    tag_probs: np.ndarray[Any, Any],
    p_intent: np.ndarray[Any, Any],
    intent: str,
    words: list[str],
    gaz: Gazetteer,
) -> dict[str, float]:
    """Every candidate feature of one decoded frame."""
    base = device.FrameCalibrator.features(t, float(p_intent.max()))
    out = dict(base)
    srt = np.sort(p_intent)[::-1]
    out["intent_margin"] = _log(float(srt[0])) - _log(float(srt[1]) if len(srt) > 1 else 0.0)
    out["intent_entropy"] = float(-(p_intent * np.log(np.maximum(p_intent, _FLOOR))).sum())
    n = len(t.path)
    # per-word margin between the chosen tag and the best other tag
    margins = []
    for w in range(n):
        row = tag_probs[w]
        chosen = float(row[t.path[w]])
        other = float(np.max(np.delete(row, t.path[w]))) if row.size > 1 else 0.0
        margins.append(_log(chosen) - _log(other))
    boundary: set[int] = set()
    for s in t.spans:
        boundary.update({s.first, s.last})
        if s.first > 0:
            boundary.add(s.first - 1)
        if s.last + 1 < n:
            boundary.add(s.last + 1)
    out["min_margin"] = min(margins, default=20.0)
    out["boundary_margin"] = min((margins[w] for w in boundary), default=20.0)
    ent = [float(-(r * np.log(np.maximum(r, _FLOOR))).sum()) for r in tag_probs]
    out["max_entropy"] = max(ent, default=0.0)
    out["max_boundary_entropy"] = max((ent[w] for w in boundary), default=0.0)
    sets = gaz.slot_set_share.get(intent, {})
    out["log_slot_set"] = _log(sets.get(tuple(sorted(s.slot for s in t.spans)), 0.0) + 1e-3)
    out["slot_set_surprise"] = -out["log_slot_set"]
    out["sum_entropy"] = float(sum(ent))
    hist = gaz.span_counts.get(intent, {})
    out["log_span_count"] = _log(hist.get(len(t.spans), 0.0) + 1e-3)
    shares = gaz.slot_share.get(intent, {})
    out["min_slot_share"] = min((_log(shares.get(s.slot, 0.0)) for s in t.spans), default=0.0)
    out["log_words_n"] = math.log(max(n, 1))
    out["n_spans"] = float(len(t.spans))
    unseen = surprise = other = near = 0.0
    max_surprise = 0.0
    folded = [w.casefold() for w in words]
    for s in t.spans:
        v = " ".join(folded[s.first : s.last + 1])
        known = gaz.values.get(s.slot, set())
        if v in known:
            continue
        unseen += 1
        sup = -math.log(gaz.novelty.get(s.slot, 1.0))
        surprise += sup
        max_surprise = max(max_surprise, sup)
        if gaz.slots_of.get(v):
            other += 1
        for a, b in ((s.first - 1, s.last), (s.first + 1, s.last), (s.first, s.last + 1)):
            if 0 <= a <= b < n and " ".join(folded[a : b + 1]) in known:
                near += 1
                break
        else:
            if s.last > s.first and " ".join(folded[s.first : s.last]) in known:
                near += 1
    amb = [0.0]
    for s in t.spans:
        edges = [("L", folded[s.first]), ("R", folded[s.last])]
        if s.first > 0:
            edges.append(("L", folded[s.first - 1]))
        if s.last + 1 < n:
            edges.append(("R", folded[s.last + 1]))
        amb.extend(gaz.ambiguity(side, s.slot, w) for side, w in edges)
    out["max_edge_ambiguity"] = max(amb)
    out["sum_edge_ambiguity"] = sum(amb)
    for name in gaz.span_counts:
        out[f"intent={name}"] = float(name == intent)
    out["unseen"] = unseen
    out["unseen_surprise"] = surprise
    out["max_unseen_surprise"] = max_surprise
    out["other_slot_value"] = other
    out["near_miss"] = near
    return out


BASE = ("log_words", "log_spans", "log_frame", "log_intent")
MARGINS = ("intent_margin", "min_margin", "boundary_margin")
SHAPE = ("max_entropy", "sum_entropy", "log_span_count", "min_slot_share", "log_words_n", "n_spans")
GAZ = ("unseen", "unseen_surprise", "max_unseen_surprise", "other_slot_value", "near_miss")
EDGES = ("max_edge_ambiguity", "sum_edge_ambiguity")
# tried after the 4-epoch bundle's search: how usual the predicted set of slot types is for
# the intent in training (log share of its sentences with exactly that set), and the
# largest tag entropy on a span edge word or its neighbour
SLOT_SET = ("log_slot_set", "max_boundary_entropy")
INTENTS = (
    "AddToPlaylist",
    "BookRestaurant",
    "GetWeather",
    "PlayMusic",
    "RateBook",
    "SearchCreativeWork",
    "SearchScreeningEvent",
)
INTENT = tuple(f"intent={x}" for x in INTENTS)  # SNIPS's: a per-intent offset
FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "base (bundle calibrator)": BASE,
    "base + margins": BASE + MARGINS,
    "base + shape": BASE + SHAPE,
    "base + gazetteer": BASE + GAZ,
    "base + margins + gazetteer": BASE + MARGINS + GAZ,
    "base + gaz surprise/other/near": (*BASE, "unseen_surprise", "other_slot_value", "near_miss"),
    "log_words + log_intent + gaz surprise/other/near": (
        "log_words",
        "log_intent",
        "unseen_surprise",
        "other_slot_value",
        "near_miss",
    ),
    "base + edge ambiguity": BASE + EDGES,
    "base + intent": BASE + INTENT,
    "all": BASE + MARGINS + SHAPE + GAZ,
    "all + edge ambiguity": BASE + MARGINS + SHAPE + GAZ + EDGES,
    "all + intent": BASE + MARGINS + SHAPE + GAZ + INTENT,
    "base + slot set": BASE + SLOT_SET,
    "base + margins + slot set": BASE + MARGINS + SLOT_SET,
    "all + slot set": BASE + MARGINS + SHAPE + GAZ + SLOT_SET,
}


def _run(model: device.JointTaggerModel, words: list[list[str]]) -> list[Any]:
    return [model.joint_logits(w) for w in words]


def cached_logits(args: argparse.Namespace) -> dict[str, Any]:
    """The held-out split's and validation's joint logits (cached in ``--cache``)."""
    if args.cache and args.cache.is_file():
        with args.cache.open("rb") as fh:
            data: dict[str, Any] = pickle.load(fh)
        if data.get("bundle") == str(args.bundle.resolve()):
            return data
    manifest = read_manifest(args.bundle, kind="tagger", verify=False)["tagger"]
    examples = load_tagged_examples(args.examples)
    held = bundle_held_out(manifest, len(examples))
    val = load_tagged_examples(args.data)
    backend = calibration_backend(args.bundle, args.threads)
    try:
        model, _ = backend.loaded()
        assert isinstance(model, device.JointTaggerModel)
        t0 = time.monotonic()
        held_out = _run(model, [examples[i][0] for i in held])
        validation = _run(model, [w for w, _ in val])
        print(f"ran {len(held) + len(val)} sentences in {time.monotonic() - t0:.0f} s")
    finally:
        backend.close()
    data = {
        "bundle": str(args.bundle.resolve()),
        "held": held,
        "held_out": held_out,
        "validation": validation,
    }
    if args.cache:
        with args.cache.open("wb") as fh:
            pickle.dump(data, fh)
    return data


def decoded(
    model: device.JointTaggerModel,
    decoder: Any,
    words: list[list[str]],
    outs: list[Any],
    gold_tags: list[list[str]],
    gold_intents: list[str],
    gaz: Gazetteer,
) -> tuple[list[dict[str, float]], list[bool], list[float]]:
    """Features, whether each frame is right, and ``product/words`` for each sentence."""
    tagged: list[device.TaggedText | None] = []
    probs: list[Any] = []
    feats: list[dict[str, float]] = []
    base: list[float] = []
    for ws, o in zip(words, outs, strict=True):
        assert o is not None  # SNIPS sentences are short
        t, p = device.joint_tag(model, decoder, o, offsets_of(ws))
        z = o[0] / decoder.temperature
        z = z - z.max(axis=1, keepdims=True)
        tp = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        intent = model.intents[int(p.argmax())]
        feats.append(features(t, tp, p, intent, ws, gaz))
        base.append(
            device.frame_confidence(float(p.max()), device.job_confidence(t, "words"), "product")
        )
        tagged.append(t)
        probs.append(p)
    right = joint_correct(tagged, probs, gold_tags, gold_intents, model.intents)
    return feats, right, base


def escalation(conf: list[float] | np.ndarray[Any, Any], right: list[bool]) -> float:
    pts = escalation_curve([float(c) for c in conf], right, [False] * len(right))
    return escalation_for(pts, TARGET).escalation


def _conf(x: np.ndarray[Any, Any], w: Any, b: float, p_intent: np.ndarray[Any, Any]) -> Any:
    z = np.clip(x @ w + b, -50, 50)
    return np.minimum(1.0 / (1.0 + np.exp(-z)), p_intent)


def crossfit(
    x: np.ndarray[Any, Any],
    y: np.ndarray[Any, Any],
    p_intent: np.ndarray[Any, Any],
    seeds: int = 5,
    folds: int = 5,
    l2: float = 1.0,
) -> tuple[float, float]:
    """Escalation for 97 % with cross-fitted confidences: mean and spread over fold seeds."""
    out = []
    for seed in range(seeds):
        order = np.random.default_rng(seed).permutation(len(y))
        fold = np.empty(len(y), dtype=np.int64)
        fold[order] = np.arange(len(y)) % folds
        conf = np.zeros(len(y))
        for k in range(folds):
            w, b = fit_logistic(x[fold != k], y[fold != k], l2)
            conf[fold == k] = _conf(x[fold == k], w, b, p_intent[fold == k])
        out.append(escalation(conf, y.tolist()))
    return float(np.mean(out)), float(np.std(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--examples", type=Path, default=DATASETS / "snips/train.jsonl")
    ap.add_argument("--data", type=Path, default=DATASETS / "snips/validation.jsonl")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--l2", type=float, default=1.0)
    args = ap.parse_args()
    data = cached_logits(args)
    examples = load_tagged_examples(args.examples)
    intents = load_intents(args.examples)
    held = data["held"]
    held_set = set(held)
    train = [i for i in range(len(examples)) if i not in held_set]
    gaz = Gazetteer([examples[i] for i in train], [intents[i] for i in train])
    val = load_tagged_examples(args.data)
    val_intents = load_intents(args.data)

    backend = calibration_backend(args.bundle, args.threads)
    model, decoder = backend.loaded()
    assert isinstance(model, device.JointTaggerModel)
    hf, hy, hb = decoded(
        model,
        decoder,
        [examples[i][0] for i in held],
        data["held_out"],
        [examples[i][1] for i in held],
        [intents[i] for i in held],
        gaz,
    )
    vf, vy, vb = decoded(
        model,
        decoder,
        [w for w, _ in val],
        data["validation"],
        [t for _, t in val],
        val_intents,
        gaz,
    )
    backend.close()
    hy_a, vy_a = np.array(hy), np.array(vy)
    print(
        f"held-out {len(hy)} frames, {hy_a.mean():.2%} right; validation {len(vy)}, "
        f"{vy_a.mean():.2%} right"
    )
    wrong_h = ~hy_a
    for name, cut in (
        ("unseen", 0),
        ("other_slot_value", 0),
        ("near_miss", 0),
        ("max_edge_ambiguity", 0.1),
    ):
        col = np.array([f[name] > cut for f in hf])
        print(
            f"  held-out: {name} > {cut} on {col.mean():.1%} of frames; of those "
            f"{wrong_h[col].mean():.1%} wrong (vs {wrong_h[~col].mean():.1%} otherwise)"
        )
    print("\n| confidence | held-out esc. for 97 % (cross-fitted) | validation esc. | val. ECE |")
    print("|---|---|---|---|")
    print(
        f"| product/words | {escalation(hb, hy):.1%} | {escalation(vb, vy):.1%} | "
        f"{ece(np.array(vb), vy_a):.4f} |"
    )
    hpi = np.array([math.exp(f["log_intent"]) for f in hf])
    vpi = np.array([math.exp(f["log_intent"]) for f in vf])
    weights: dict[str, float] = {}
    for name, cols in FEATURE_SETS.items():
        xh = np.array([[f[c] for c in cols] for f in hf])
        xv = np.array([[f[c] for c in cols] for f in vf])
        mean, sd = crossfit(xh, hy_a, hpi, l2=args.l2)
        w, b = fit_logistic(xh, hy_a, args.l2)
        cv = _conf(xv, w, b, vpi)
        print(
            f"| {name} | {mean:.1%} ± {sd:.1%} | {escalation(cv, vy):.1%} | {ece(cv, vy_a):.4f} |"
        )
        if name == "all":
            weights.update(
                {c: round(float(v), 2) for c, v in zip(cols, w * xh.std(axis=0), strict=True)}
            )
    # product/words discounted by one feature: exp(-beta * feature), beta chosen on held-out
    for name in (
        "unseen",
        "unseen_surprise",
        "near_miss",
        "max_edge_ambiguity",
        "slot_set_surprise",
        "max_boundary_entropy",
    ):
        lh = np.log(np.maximum(np.array(hb), _FLOOR))
        fh = np.array([f[name] for f in hf])
        fv = np.array([f[name] for f in vf])
        beta = min(BETAS, key=lambda x: escalation(lh - x * fh, hy))
        print(
            f"| product/words × exp(-{beta} {name}) (beta chosen on held-out) | "
            f"{escalation(lh - beta * fh, hy):.1%} (in-sample) | "
            f"{escalation(np.log(np.maximum(np.array(vb), _FLOOR)) - beta * fv, vy):.1%} | |"
        )
    print("\n'all' weights (per sd, fitted on the held-out split):", weights)
    return 0


BETAS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


if __name__ == "__main__":
    raise SystemExit(main())
