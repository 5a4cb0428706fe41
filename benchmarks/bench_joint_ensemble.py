"""Joint SNIPS bundles that differ only in the training seed: each alone and ensembles.

    edgeagent train snips --examples ../shared/datasets/snips/train.jsonl --epochs 4 \
        --seed 0 --out /tmp/snipsens/s0
    edgeagent train snips --examples ../shared/datasets/snips/train.jsonl --epochs 4 \
        --seed 1 --split-seed 0 --out /tmp/snipsens/s1
    .venv/bin/python benchmarks/bench_joint_ensemble.py \
        --bundle /tmp/snipsens/s0/snips/latest --bundle /tmp/snipsens/s1/snips/latest \
        [--bundle …] [--examples ../shared/datasets/snips/train.jsonl] \
        [--data ../shared/datasets/snips/validation.jsonl] [--cache /tmp/snipsens/logits.pkl] \
        [--latency 700]

The bundles (two or more) must share their held-out split (``--split-seed``): each is run
through the runtime's model classes (``OnnxTaggerBackend``, INT8, one input at a time) over
that split and over validation (``--cache``: the joint logits kept per bundle), and every
frame confidence below is measured on both: frame accuracy of the answer, the escalation a
perfect cloud needs for 95/97/99 % frames, and what a threshold chosen on the held-out
split gives on validation (the honest figure: the cheapest held-out point for 97 %, and
``train``'s stored rule, answered frames >= 97 % with 90 % confidence).  A frame is right
when the intent and every slot span are right.

Confidences: each model alone (``product`` of the intent probability and the ``words``
slot confidence, the runtime default); ``agree`` (all frames the same, intent and every
span: the ``min``/``mean`` of the confidences, else 0; the most confident model's frame is
the answer); ``min of all`` (the lowest confidence whether or not they agree); ``avg
probs`` (a real ensemble: each model's calibrated intent probabilities and tag
probabilities averaged, decoded once with the BIO Viterbi restricted to the averaged
intent's slots, confidence as for one model); ``avg logits`` (the temperature-scaled logits
averaged instead; ``T refitted``: with a tag and an intent temperature fitted on the
averaged logits of the held-out split, as ``train`` fits a bundle's); ``avg probs, agree``
(``avg probs``, 0 when any model's own frame differs from it).  A bundle's frame
calibrator is not used (``train`` keeps none for these SNIPS bundles).  ``--latency N``
times single jobs on N validation inputs, interleaved: the first model alone vs the
averaged-logits ensemble (one encoder pass per model), median and ratio.
"""

from __future__ import annotations

import argparse
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import edgeagent.backends  # noqa: F401  (import order)
from edgeagent.backends.tagger import (
    Decoder,
    JointTaggerModel,
    TaggedText,
    frame_confidence,
    job_confidence,
    joint_tag,
)
from edgeagent.bundle import read_manifest
from edgeagent.heads.curves import CurvePoint, escalation_curve, escalation_for, fit_temperature
from edgeagent.modeltools.joint import bundle_held_out, bundle_split_seed, load_intents
from edgeagent.modeltools.tagger import (
    PRINTED_TARGET,
    calibration_backend,
    gold_spans,
    load_tagged_examples,
    offsets_of,
    printed_threshold,
)

REPO = Path(__file__).resolve().parent.parent
DATASETS = Path(os.environ.get("EDGEAGENT_DATASETS") or REPO.parent / "shared/datasets")
TARGETS = (0.95, 0.97, 0.99)

Frame = tuple[str, frozenset[tuple[str, int, int]]]


@dataclass(frozen=True)
class Answer:
    """One sentence's answered frame and its confidence (``None``: too long, escalated)."""

    frame: Frame | None
    confidence: float


@dataclass
class Split:
    name: str
    words: list[list[str]]
    tags: list[list[str]]
    gold: list[Frame]


@dataclass
class Member:
    """One bundle's model, decoder and cached joint logits per split."""

    bundle: Path
    model: JointTaggerModel
    decoder: Decoder
    logits: dict[str, list[Any]]
    ms_per_input: float


def _frame(intent: str, tagged: TaggedText) -> Frame:
    return intent, frozenset((s.slot, s.first, s.last) for s in tagged.spans)


def _single(m: Member, split: Split) -> list[Answer]:
    """The runtime's answer: the bundle's combination of the intent and ``words``."""
    out: list[Answer] = []
    for ws, joint in zip(split.words, m.logits[split.name], strict=True):
        if joint is None:
            out.append(Answer(None, 0.0))
            continue
        tagged, probs = joint_tag(m.model, m.decoder, joint, offsets_of(ws))
        k = int(probs.argmax())
        conf = frame_confidence(float(probs[k]), job_confidence(tagged, "words"), m.model.combine)
        out.append(Answer(_frame(m.model.intents[k], tagged), conf))
    return out


def _agree(
    singles: list[list[Answer]], both: Callable[[list[float]], float], apart: str
) -> list[Answer]:
    """The most confident member's frame; confidence ``both`` of the members' confidences
    where every frame agrees, else 0 (``apart = "zero"``) or the lowest (``"lower"``)."""
    out: list[Answer] = []
    for row in zip(*singles, strict=True):
        if any(x.frame is None for x in row):
            out.append(Answer(None, 0.0))
            continue
        best = max(row, key=lambda x: x.confidence)
        confs = [x.confidence for x in row]
        if all(x.frame == best.frame for x in row):
            out.append(Answer(best.frame, both(confs)))
        else:
            out.append(Answer(best.frame, 0.0 if apart == "zero" else min(confs)))
    return out


def _mean_joint(members: list[Member], joints: list[Any], how: str) -> tuple[Any, Any]:
    """The members' averaged joint output for one sentence, as (word logits, intent logits)
    a decoder with temperature 1 reads: the mean of the calibrated probabilities as log
    probabilities (``probs``) or the mean of the temperature-scaled logits (``logits``)."""
    word_parts, intent_parts = [], []
    for m, (word_lg, intent_lg) in zip(members, joints, strict=True):
        z = word_lg / m.decoder.temperature
        zi = intent_lg / m.model.intent_temperature
        if how == "probs":
            e = np.exp(z - z.max(axis=1, keepdims=True))
            word_parts.append(e / e.sum(axis=1, keepdims=True))
            ei = np.exp(zi - zi.max())
            intent_parts.append(ei / ei.sum())
        else:
            word_parts.append(z)
            intent_parts.append(zi)
    word = np.mean(word_parts, axis=0)
    intent = np.mean(intent_parts, axis=0)
    if how == "probs":
        word, intent = np.log(np.maximum(word, 1e-30)), np.log(np.maximum(intent, 1e-30))
    word = word.astype(np.float32)
    word[~joints[0][0].any(axis=1)] = 0.0  # no sub-word token: the decoder forces O
    return word, intent.astype(np.float32)


def _ensemble_answer(
    members: list[Member], joints: list[Any], ws: list[str], decoder: Decoder, intent_t: float
) -> Answer:
    """One sentence's answer from its members' joint outputs, decoded once."""
    if any(j is None for j in joints):
        return Answer(None, 0.0)
    word_lg, intent_lg = _mean_joint(members, joints, "logits" if intent_t else "probs")
    zi = intent_lg / (intent_t or 1.0)
    ei = np.exp(zi - zi.max())
    probs = ei / ei.sum()
    k = int(probs.argmax())
    first = members[0].model
    label = first.intents[k]
    slots = (first.intent_slots or {}).get(label)
    allowed = None if slots is None else decoder.tags_of(slots)
    tagged = decoder.tag(word_lg, offsets_of(ws), allowed)
    conf = frame_confidence(float(probs[k]), job_confidence(tagged, "words"), first.combine)
    return Answer(_frame(label, tagged), conf)


def _averaged(
    members: list[Member], split: Split, how: str, temperatures: tuple[float, float] = (1, 1)
) -> list[Answer]:
    """One decode of the members' averaged output (:func:`_mean_joint`), with a tag and an
    intent temperature on top (1: none; ``probs`` takes none)."""
    decoder = Decoder(members[0].decoder.tags, temperatures[0])
    intent_t = temperatures[1] if how == "logits" else 0.0
    return [
        _ensemble_answer(members, [m.logits[split.name][i] for m in members], ws, decoder, intent_t)
        for i, ws in enumerate(split.words)
    ]


def _latency(members: list[Member], words: list[list[str]]) -> None:
    """Single-job latency, interleaved per sentence: the first member alone (one encoder
    pass, the runtime's decode) vs the averaged-logits ensemble (one pass per member)."""
    one, both = [], []
    decoder = Decoder(members[0].decoder.tags, 1.0)
    for ws in words:
        t0 = time.perf_counter()
        joint = members[0].model.joint_logits(ws)
        if joint is not None:
            joint_tag(members[0].model, members[0].decoder, joint, offsets_of(ws))
        t1 = time.perf_counter()
        joints = [m.model.joint_logits(ws) for m in members]
        _ensemble_answer(members, joints, ws, decoder, 1.0)
        t2 = time.perf_counter()
        one.append((t1 - t0) * 1000)
        both.append((t2 - t1) * 1000)
    med1, med2 = float(np.median(one)), float(np.median(both))
    print(
        f"single-job latency over {len(words)} validation sentences: one model median "
        f"{med1:.2f} ms (mean {np.mean(one):.2f}), ensemble of {len(members)} median "
        f"{med2:.2f} ms (mean {np.mean(both):.2f}): {med2 / med1:.2f}x"
    )


def _refit(members: list[Member], split: Split, how: str) -> tuple[float, float]:
    """Tag and intent temperatures of the averaged output, fitted on ``split`` (the
    held-out one) as ``train`` fits a bundle's."""
    tag_index = {t: i for i, t in enumerate(members[0].decoder.tags)}
    intents = members[0].model.intents
    rows, ys, irows, iys = [], [], [], []
    for i in range(len(split.words)):
        joints = [m.logits[split.name][i] for m in members]
        if any(j is None for j in joints):
            continue
        word_lg, intent_lg = _mean_joint(members, joints, how)
        rows.append(word_lg)
        ys.extend(tag_index[t] for t in split.tags[i])
        irows.append(intent_lg)
        iys.append(intents.index(split.gold[i][0]))
    return (
        fit_temperature(np.concatenate(rows), np.array(ys, dtype=np.int64)),
        fit_temperature(np.stack(irows), np.array(iys, dtype=np.int64)),
    )


def _gated(ens: list[Answer], singles: list[list[Answer]]) -> list[Answer]:
    """``ens``, with confidence 0 unless every member's own frame is the same."""
    return [
        e if all(s[i].frame == e.frame for s in singles) else Answer(e.frame, 0.0)
        for i, e in enumerate(ens)
    ]


@dataclass(frozen=True)
class Measured:
    accuracy: float
    escalation: dict[float, float]
    curve: list[CurvePoint]
    correct: list[bool]
    confidence: list[float]
    forced: list[bool]


def measure(answers: list[Answer], gold: list[Frame]) -> Measured:
    correct = [a.frame == g for a, g in zip(answers, gold, strict=True)]
    forced = [a.frame is None for a in answers]
    conf = [a.confidence for a in answers]
    curve = escalation_curve(conf, correct, forced)
    return Measured(
        float(np.mean(correct)),
        {t: escalation_for(curve, t).escalation for t in TARGETS},
        curve,
        correct,
        conf,
        forced,
    )


def at_threshold(m: Measured, threshold: float) -> tuple[float, float]:
    """(overall frame accuracy with a perfect cloud, escalation) answering ``conf >= t``."""
    local = [not f and c >= threshold for c, f in zip(m.confidence, m.forced, strict=True)]
    n = len(local)
    right = sum(ok for ok, here in zip(m.correct, local, strict=True) if here)
    return (right + n - sum(local)) / n, 1 - sum(local) / n


def _run_logits(bundles: list[Path], splits: list[Split], threads: int) -> list[Member]:
    members: list[Member] = []
    for bundle in bundles:
        backend = calibration_backend(bundle, threads)
        model, decoder = backend.loaded()
        assert isinstance(model, JointTaggerModel), f"{bundle}: not a joint bundle"
        logits: dict[str, list[Any]] = {}
        t0 = time.monotonic()
        for split in splits:
            logits[split.name] = [model.joint_logits(w) for w in split.words]
        ms = (time.monotonic() - t0) * 1000 / sum(len(s.words) for s in splits)
        members.append(Member(bundle, model, decoder, logits, ms))
    return members


def _members(
    bundles: list[Path], splits: list[Split], threads: int, cache: Path | None
) -> list[Member]:
    """Each bundle loaded, with its joint logits on every split (from ``cache``, a pickle
    keyed by bundle path, where there; computed and added there otherwise)."""
    stored: dict[str, Any] = {}
    if cache and cache.is_file():
        with cache.open("rb") as fh:
            stored = pickle.load(fh)
    members: list[Member] = []
    for bundle in bundles:
        key = str(bundle.resolve())
        if key in stored:
            backend = calibration_backend(bundle, threads)
            model, decoder = backend.loaded()
            assert isinstance(model, JointTaggerModel), f"{bundle}: not a joint bundle"
            logits, ms = stored[key]
            members.append(Member(bundle, model, decoder, logits, ms))
        else:
            (member,) = _run_logits([bundle], splits, threads)
            members.append(member)
            stored[key] = (member.logits, member.ms_per_input)
            if cache:
                with cache.open("wb") as fh:
                    pickle.dump(stored, fh)
    return members


def _split(name: str, path: Path, rows: list[int] | None = None) -> Split:
    examples = load_tagged_examples(path)
    intents = load_intents(path)
    idx = range(len(examples)) if rows is None else rows
    return Split(
        name,
        [examples[i][0] for i in idx],
        [examples[i][1] for i in idx],
        [(intents[i], frozenset(gold_spans(examples[i][1]))) for i in idx],
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, action="append", required=True)
    ap.add_argument("--examples", type=Path, default=DATASETS / "snips/train.jsonl")
    ap.add_argument("--data", type=Path, default=DATASETS / "snips/validation.jsonl")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=None, help="pickle of the joint logits")
    ap.add_argument(
        "--latency", type=int, default=0, help="time single jobs on this many validation inputs"
    )
    args = ap.parse_args()
    if len(args.bundle) < 2:
        ap.error("give two or more --bundle")
    manifests = [read_manifest(b, kind="tagger", verify=False)["tagger"] for b in args.bundle]
    n_train = len(load_tagged_examples(args.examples))
    helds = [bundle_held_out(m, n_train) for m in manifests]
    if any(h != helds[0] for h in helds):
        ap.error("the bundles hold out different rows: train them with one --split-seed")
    splits = [_split("held-out", args.examples, helds[0]), _split("validation", args.data)]
    members = _members(args.bundle, splits, args.threads, args.cache)
    if any(
        m.decoder.tags != members[0].decoder.tags or m.model.intents != members[0].model.intents
        for m in members
    ):
        ap.error("the bundles have different tag or intent sets")
    for m, man in zip(members, manifests, strict=True):
        print(
            f"{m.bundle}: seed {man['seed']}, split seed {bundle_split_seed(man)}, "
            f"{man['epochs']} epochs, T={m.decoder.temperature:.3f}, intent "
            f"T={m.model.intent_temperature:.3f}, {m.model.combine}; "
            f"{m.ms_per_input:.1f} ms/input"
        )

    refit = _refit(members, splits[0], "logits")
    print(f"averaged logits: T={refit[0]:.3f}, intent T={refit[1]:.3f} refitted on held-out")
    results: dict[str, dict[str, Measured]] = {}
    for split in splits:
        singles = [_single(m, split) for m in members]
        probs = _averaged(members, split, "probs")
        variants = {
            **{f"model {chr(65 + i)} (--bundle {i + 1})": x for i, x in enumerate(singles)},
            "agree: min, else 0": _agree(singles, min, "zero"),
            "agree: mean, else 0": _agree(singles, lambda c: sum(c) / len(c), "zero"),
            "min of all (agree or not)": _agree(singles, min, "lower"),
            "avg probs": probs,
            "avg logits": _averaged(members, split, "logits"),
            "avg logits, T refitted on held-out": _averaged(members, split, "logits", refit),
            "avg probs, agree": _gated(probs, singles),
        }
        for name, answers in variants.items():
            results.setdefault(name, {})[split.name] = measure(answers, split.gold)
        agree = np.mean(
            [all(x.frame == row[0].frame for x in row) for row in zip(*singles, strict=True)]
        )
        print(f"{split.name} ({len(split.words)}): the models' frames all agree on {agree:.1%}")

    if args.latency:
        _latency(members, splits[1].words[: args.latency])
    n_held = len(splits[0].words)
    print(
        "\n| confidence | held-out: frames, esc. 95/97/99 % | validation: frames, esc. "
        "95/97/99 % | held-out 97 % threshold on validation | stored rule on validation |"
    )
    print("|---|---|---|---|---|")
    for name, by in results.items():
        h, v = by["held-out"], by["validation"]
        cheapest = escalation_for(h.curve, 0.97).threshold
        stored = printed_threshold(h.curve, n_held, PRINTED_TARGET).threshold
        acc_c, esc_c = at_threshold(v, cheapest)
        acc_s, esc_s = at_threshold(v, stored)

        def escs(m: Measured) -> str:
            return " / ".join(f"{m.escalation[t]:.1%}" for t in TARGETS)

        print(
            f"| {name} | {h.accuracy:.1%}, {escs(h)} | {v.accuracy:.1%}, {escs(v)} | "
            f"{acc_c:.1%} at {esc_c:.1%} | {acc_s:.1%} at {esc_s:.1%} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
