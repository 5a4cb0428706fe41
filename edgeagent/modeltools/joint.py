"""``edgeagent train`` on tagged examples that also carry an intent: one joint model.

``{"tokens": [...], "tags": [...], "intent": "PlayMusic"}`` lines (the SNIPS and ATIS
files) train a single encoder with two heads in one pass: the BIO tag head of
:mod:`edgeagent.modeltools.tagger` and an intent head on the mean-pooled encoder output.
Both heads live in one token-classification layer with ``tags + intents`` columns (the
intent logits are the token mean of the intent columns; see
:class:`edgeagent.backends.tagger.JointTaggerModel`), so the stock optimum export and INT8
quantization carry both, and the runtime needs nothing but onnxruntime.

Training: cross-entropy on each word's first sub-word tag plus cross-entropy on the
intent, AdamW with warm-up and decay, length-bucketed batches with dynamic padding (short
utterances waste little compute on padding), progress with an ETA.  Calibration on the
held-out split through the INT8 model: a temperature for the tags and one for the intent,
and the frame confidence (intent probability combined with the slots' job confidence,
``product`` or ``min``) that needs the least escalation for 97 % frame accuracy, and the
threshold at which the answered frames are right >= 97 % with 90 % confidence (printed,
stored in ``calibration.json`` and applied by default, as for a tagger bundle).  A frame
is right when the intent and every slot span are right.
"""

from __future__ import annotations

import json
import math
import random
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeagent.backends.tagger import (
    COMBINE_MODES,
    INTENTS_FILE,
    Decoder,
    FrameCalibrator,
    JointTaggerModel,
    TaggedText,
    frame_confidence,
    job_confidence,
    joint_tag,
)
from edgeagent.heads.curves import (
    CurvePoint,
    ece,
    escalation_curve,
    escalation_for,
    fit_temperature,
)
from edgeagent.modeltools.progress import Progress
from edgeagent.modeltools.tagger import (
    CALIBRATED,
    CONFIDENCE_MODES,
    PRINTED_TARGET,
    Tagged,
    calibration_backend,
    check_one_target,
    evaluate,
    export_tagger,
    first_subword_labels,
    fit_frame_calibrator,
    gold_spans,
    head_body_optimizer,
    load_tagged_examples,
    offsets_of,
    printed_line,
    printed_threshold,
    random_held_out,
    staging_dir,
    store_frame_threshold,
    stored_threshold,
    tag_set,
    tagger_manifest,
    tagger_section,
    token_classifier,
    write_json,
)
from edgeagent.modeltools.train import ExamplesError, json_lines

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from edgeagent.modeltools.build import Source

    FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class JointOptions:
    """Defaults measured on SNIPS (see ``benchmarks/README.md``, ``bench_joint.py``)."""

    epochs: int = 3
    batch_size: int = 32
    lr: float = 2e-4
    head_lr: float = 2e-3
    intent_weight: float = 1.0
    held_out: float = 0.1
    #: initialisation, shuffling and, unless ``split_seed`` is set, the held-out split
    seed: int = 0
    #: the held-out split's own seed (``None``: ``seed``), so models trained with other
    #: seeds can share one split (``benchmarks/bench_joint_ensemble.py``)
    split_seed: int | None = None
    threads: int = 1
    max_length: int = 128
    opset: int = 18
    progress_every: float = 30.0
    #: the weights the bundle keeps: the last step's (``none``) or an average of
    #: :data:`~edgeagent.modeltools.finetune.AVERAGES` (see ``WeightAverages``)
    average: str = "none"
    #: encoder learning rate multiplied by this per layer below the top (1: one rate)
    layer_decay: float = 1.0


def is_joint_file(path: Path) -> bool:
    """Whether the first non-blank line is ``{"tokens", "tags", "intent": str}``."""
    try:
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    row = json.loads(line)
                    return (
                        isinstance(row, dict)
                        and "tokens" in row
                        and "tags" in row
                        and isinstance(row.get("intent"), str)
                    )
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return False


def intent_slots(examples: list[Tagged], intents_of: list[str]) -> dict[str, frozenset[str]]:
    """intent -> the slots its training sentences fill: the runtime decodes only those for
    the predicted intent (SNIPS validation: no sentence fills a slot its intent never
    filled in training)."""
    out: dict[str, set[str]] = {}
    for (_, tags), intent in zip(examples, intents_of, strict=True):
        out.setdefault(intent, set()).update(slot for slot, _, _ in gold_spans(tags))
    return {k: frozenset(v) for k, v in out.items()}


def load_intents(path: Path) -> list[str]:
    """The ``intent`` of every line (aligned with :func:`load_tagged_examples`)."""
    out: list[str] = []
    for no, row in json_lines(path):
        intent = row.get("intent") if isinstance(row, dict) else None
        if not isinstance(intent, str) or not intent.strip():
            raise ExamplesError(f'{path}:{no}: expected a non-empty "intent" string')
        out.append(intent)
    return out


# -- evaluation (numpy) ----------------------------------------------------------------------


@dataclass(frozen=True)
class JointEvaluation:
    """Frame = intent and every slot span right."""

    examples: int
    intent_accuracy: float
    slot_f1: float
    slot_frame_accuracy: float
    frame_accuracy: float
    curves: dict[str, list[CurvePoint]]  # "<combine>/<slot confidence mode>"
    ece: dict[str, float]

    def escalation_for(self, target: float, mode: str) -> float:
        return escalation_for(self.curves[mode], target).escalation

    def best_mode(self, target: float = 0.97, margin: float = 0.01) -> str:
        """The confidence that needs the least escalation for ``target``.  ``product`` (the
        frame's probability if intent and slots err independently) is kept unless another
        combination needs at least ``margin`` less: on SNIPS the held-out split preferred
        ``min`` by 0.2 points, validation preferred ``product`` by 2.5 (selection noise)."""
        modes = [m for m in self.curves if m != CALIBRATED]
        best = min(modes, key=lambda m: (self.escalation_for(target, m), self.ece[m]))
        products = [m for m in self.curves if m.startswith("product/")]
        if not products:
            return best
        product = min(products, key=lambda m: (self.escalation_for(target, m), self.ece[m]))
        if self.escalation_for(target, best) <= self.escalation_for(target, product) - margin:
            return best
        return product

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "examples": self.examples,
            "intent_accuracy": round(self.intent_accuracy, 5),
            "slot_f1": round(self.slot_f1, 5),
            "slot_frame_accuracy": round(self.slot_frame_accuracy, 5),
            "frame_accuracy": round(self.frame_accuracy, 5),
        }
        for mode in self.curves:
            key = mode.replace("/", "_")
            out[f"ece_{key}"] = round(self.ece[mode], 5)
            for target in (0.95, 0.97, 0.99):
                out[f"escalation_for_{round(target * 100)}_{key}"] = round(
                    self.escalation_for(target, mode), 5
                )
        return out


def evaluate_joint(
    tagged: list[TaggedText | None],
    intent_probs: list[FloatArray | None],
    gold_tags: list[list[str]],
    gold_intents: list[str],
    intents: list[str],
    tags: list[str],
    calibrated: list[float] | None = None,
) -> JointEvaluation:
    """Intent accuracy, slot F1, frame accuracy and, for every combination of
    :data:`COMBINE_MODES` and slot confidence mode, the escalation curve with a perfect
    cloud.  ``None`` (too long) counts as wrong and is always escalated.
    ``calibrated``: each frame's :class:`FrameCalibrator` confidence, one more curve
    (``calibrated``)."""
    import numpy as np

    slots = evaluate(tagged, gold_tags, tags)
    correct: list[bool] = []
    forced: list[bool] = []
    intent_ok: list[bool] = []
    conf: dict[str, list[float]] = {f"{c}/{m}": [] for c in COMBINE_MODES for m in CONFIDENCE_MODES}
    slot_ok_all: list[bool] = []
    for pred, p, gt, gi in zip(tagged, intent_probs, gold_tags, gold_intents, strict=True):
        if pred is None or p is None:
            correct.append(False)
            forced.append(True)
            intent_ok.append(False)
            slot_ok_all.append(False)
            for key in conf:
                conf[key].append(0.0)
            continue
        k = int(p.argmax())
        i_ok = intents[k] == gi
        s_ok = {(s.slot, s.first, s.last) for s in pred.spans} == gold_spans(gt)
        intent_ok.append(i_ok)
        slot_ok_all.append(s_ok)
        correct.append(i_ok and s_ok)
        forced.append(False)
        for c in COMBINE_MODES:
            for m in CONFIDENCE_MODES:
                conf[f"{c}/{m}"].append(frame_confidence(float(p[k]), job_confidence(pred, m), c))
    ok = np.array(correct, dtype=bool)
    if calibrated is not None:
        conf[CALIBRATED] = [0.0 if f else c for c, f in zip(calibrated, forced, strict=True)]
    return JointEvaluation(
        examples=len(gold_tags),
        intent_accuracy=float(np.mean(intent_ok)),
        slot_f1=slots.slot_f1,
        slot_frame_accuracy=float(np.mean(slot_ok_all)),
        frame_accuracy=float(ok.mean()),
        curves={k: escalation_curve(v, correct, forced) for k, v in conf.items()},
        ece={k: ece(np.array(v, dtype=np.float32), ok) for k, v in conf.items()},
    )


def joint_correct(
    tagged: list[TaggedText | None],
    intent_probs: list[FloatArray | None],
    gold_tags: list[list[str]],
    gold_intents: list[str],
    intents: list[str],
) -> list[bool]:
    """Whether each frame (the intent and every slot span) is right."""
    return [
        t is not None
        and p is not None
        and intents[int(p.argmax())] == gi
        and {(s.slot, s.first, s.last) for s in t.spans} == gold_spans(gt)
        for t, p, gt, gi in zip(tagged, intent_probs, gold_tags, gold_intents, strict=True)
    ]


def calibrated_confidences(
    calibrator: FrameCalibrator,
    tagged: list[TaggedText | None],
    intent_probs: list[FloatArray | None] | None = None,
) -> list[float]:
    """The calibrator's confidence for each prediction (0.0 for ``None``), as the runtime
    computes it."""
    probs = intent_probs if intent_probs is not None else [None] * len(tagged)
    return [
        0.0 if t is None else calibrator.confidence(t, None if p is None else float(p.max()))
        for t, p in zip(tagged, probs, strict=True)
    ]


def predict_joint(
    model: JointTaggerModel,
    decoder: Decoder,
    words: list[list[str]],
    outs: list[tuple[FloatArray, FloatArray] | None] | None = None,
) -> tuple[list[TaggedText | None], list[FloatArray | None]]:
    """Tag and classify pre-split sentences one at a time, as the runtime does (``outs``:
    the model's joint logits for ``words`` when already computed)."""
    tagged: list[TaggedText | None] = []
    probs: list[FloatArray | None] = []
    if outs is None:
        outs = [model.joint_logits(ws) for ws in words]
    for ws, joint in zip(words, outs, strict=True):
        if joint is None:
            tagged.append(None)
            probs.append(None)
            continue
        t, p = joint_tag(model, decoder, joint, offsets_of(ws))
        tagged.append(t)
        probs.append(p)
    return tagged, probs


# -- training (torch) ------------------------------------------------------------------------


def finetune_joint(
    source_dir: Path,
    examples: list[Tagged],
    intents_of: list[str],
    tags: list[str],
    intents: list[str],
    out_dirs: dict[str, Path],
    opts: JointOptions,
    log: Any = print,
) -> dict[str, Any]:
    """Fine-tune ``source_dir`` with the joint tag + intent layer; save model + tokenizer
    with each weight average of ``out_dirs`` (``{"none": dir}``: the last step's weights)
    to its directory.  Returns training stats (seconds, peak RSS, loss by epoch)."""
    from edgeagent.modeltools.finetune import length_buckets, quiet_ml_libraries

    with quiet_ml_libraries():
        return _finetune_joint(
            source_dir, examples, intents_of, tags, intents, out_dirs, opts, log, length_buckets
        )


def _finetune_joint(
    source_dir: Path,
    examples: list[Tagged],
    intents_of: list[str],
    tags: list[str],
    intents: list[str],
    out_dirs: dict[str, Path],
    opts: JointOptions,
    log: Any,
    length_buckets: Any,
) -> dict[str, Any]:
    from edgeagent.modeltools.finetune import (
        WeightAverages,
        save_tuned,
        train_step,
        warmup_decay,
    )

    columns = [*tags, *(f"intent:{x}" for x in intents)]
    torch, tokenizer, model = token_classifier(source_dir, columns, opts.seed, opts.threads)
    rng = random.Random(opts.seed)
    n_tags = len(tags)
    tag_index = {t: i for i, t in enumerate(tags)}
    intent_index = {x: i for i, x in enumerate(intents)}
    # Tokenize once; keep each example's ids and first-sub-word labels.
    enc = tokenizer(
        [toks for toks, _ in examples],
        is_split_into_words=True,
        truncation=True,
        max_length=opts.max_length,
    )
    rows: list[tuple[list[int], list[int]]] = [
        (list(enc["input_ids"][i]), first_subword_labels(enc.word_ids(i), row_tags, tag_index))
        for i, (_, row_tags) in enumerate(examples)
    ]
    lengths = [len(ids) for ids, _ in rows]
    pad_id = int(tokenizer.pad_token_id or 0)

    model.train()
    optim = head_body_optimizer(torch, model, opts.lr, opts.head_lr, opts.layer_decay)
    averages = WeightAverages(model, list(out_dirs), opts.epochs)
    steps_per_epoch = math.ceil(len(examples) / opts.batch_size)
    total = steps_per_epoch * opts.epochs
    sched = warmup_decay(optim, total)
    prog = Progress(total, "training tagger + intent", log=log, every=opts.progress_every)
    losses: list[float] = []
    for epoch in range(opts.epochs):
        running = 0.0
        for batch in length_buckets(lengths, opts.batch_size, rng):
            width = max(lengths[i] for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for r, i in enumerate(batch):
                n = lengths[i]
                ids[r, :n] = torch.tensor(rows[i][0])
                mask[r, :n] = 1
                labels[r, :n] = torch.tensor(rows[i][1])
            logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, tags+intents)
            tag_loss = torch.nn.functional.cross_entropy(
                logits[..., :n_tags].reshape(-1, n_tags), labels.reshape(-1), ignore_index=-100
            )
            w = mask.unsqueeze(-1).to(logits.dtype)
            intent_logits = (logits[..., n_tags:] * w).sum(dim=1) / w.sum(dim=1)
            target = torch.tensor([intent_index[intents_of[i]] for i in batch])
            intent_loss = torch.nn.functional.cross_entropy(intent_logits, target)
            value = train_step(model, optim, sched, tag_loss + opts.intent_weight * intent_loss)
            averages.step(epoch)
            running += value
            prog.update(extra=f"epoch {epoch + 1}/{opts.epochs}, loss {value:.3f}")
        losses.append(running / steps_per_epoch)
        averages.epoch_end(epoch)
    seconds = prog.close(extra="loss by epoch " + ", ".join(f"{x:.3f}" for x in losses))
    # The last step's weights first, as they are (no copy), then each average over them.
    for mode, out_dir in sorted(out_dirs.items(), key=lambda item: item[0] != "none"):
        if mode != "none":
            model.load_state_dict(averages.state(mode))
        save_tuned(model, tokenizer, out_dir)
    return {
        "train_seconds": round(seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "loss_by_epoch": [round(x, 4) for x in losses],
    }


def train_joint_bundle(
    task: str,
    examples_path: Path,
    source_spec: str,
    out_root: Path,
    opts: JointOptions,
    *,
    command: str | None = None,
    also_average: tuple[str, ...] = (),
    log: Any = print,
) -> Path:
    """Fine-tune, export, quantize, calibrate and write a joint ``tagger`` bundle (with
    ``intents.json``); returns it.  ``also_average``: other weight averages of the same
    training run (``opts.average`` names the bundle's), each written as bundle
    ``<task>-<average>`` beside it, to compare them at the cost of one training."""

    from edgeagent.modeltools.build import resolve_source

    examples = load_tagged_examples(examples_path)
    intents_of = load_intents(examples_path)
    tags = tag_set(examples)
    intents = sorted(set(intents_of))
    if len(intents) < 2:
        raise ValueError("a joint model needs examples of at least two intents")
    source = resolve_source(source_spec)
    if not Path(source.path_or_id).is_dir():
        raise ValueError(f"training a tagger needs the source model on disk, not {source.spec!r}")
    held = random_held_out(len(examples), opts.held_out, split_seed(opts))
    train = sorted(set(range(len(examples))) - set(held))
    log(
        f"{len(examples)} examples, {len(intents)} intents, {len(tags)} tags "
        f"({(len(tags) - 1) // 2} slots); training on {len(train)}, calibrating on "
        f"{len(held)} held out"
    )
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgeagent-joint-") as tmp:
        work = Path(tmp)
        log(f"fine-tuning {source.upstream} for tags + intent (one encoder pass) …")
        averages = [opts.average, *(a for a in dict.fromkeys(also_average) if a != opts.average)]
        tuned = {a: work / f"tuned-{a}" for a in averages}
        stats = finetune_joint(
            Path(source.path_or_id),
            [examples[i] for i in train],
            [intents_of[i] for i in train],
            tags,
            intents,
            tuned,
            opts,
            log,
        )
        out = [
            _joint_bundle(
                task if a == opts.average else f"{task}-{a}",
                tuned[a],
                work / f"export-{a}",
                _JointData(examples, intents_of, tags, intents, train, held, examples_path),
                source,
                opts,
                a,
                {**stats, "training_seconds_to_bundle": round(time.monotonic() - t0, 1)},
                out_root,
                command,
                log,
            )
            for a in averages
        ]
    return out[0]


@dataclass(frozen=True)
class _JointData:
    """What :func:`_joint_bundle` needs of the training file and its split."""

    examples: list[Tagged]
    intents_of: list[str]
    tags: list[str]
    intents: list[str]
    train: list[int]
    held: list[int]
    path: Path


def _joint_bundle(
    task: str,
    tuned: Path,
    work: Path,
    data: _JointData,
    source: Source,
    opts: JointOptions,
    average: str,
    stats: dict[str, Any],
    out_root: Path,
    command: str | None,
    log: Any,
) -> Path:
    """Export, quantize, calibrate and publish the fine-tuned model in ``tuned``."""
    from edgeagent.bundle import publish_bundle

    t0 = time.monotonic()
    examples, intents_of, tags, intents = data.examples, data.intents_of, data.tags, data.intents
    train, held = data.train, data.held
    work.mkdir()
    files_dir, _ = export_tagger(tuned, work, opts.opset, log)
    (files_dir / "labels.json").write_text(json.dumps(tags) + "\n", "utf-8")
    (files_dir / INTENTS_FILE).write_text(json.dumps(intents) + "\n", "utf-8")
    (files_dir / "calibration.json").write_text('{"temperature": 1.0}\n', "utf-8")

    # Calibrate on the held-out split through the INT8 model, one input at a time.
    model = JointTaggerModel(
        files_dir / "model.onnx",
        files_dir / "tokenizer.json",
        len(tags),
        max_length=max(opts.max_length, 512),
        intra_op_threads=opts.threads,
    )
    held_words = [examples[i][0] for i in held]
    held_tags = [examples[i][1] for i in held]
    held_intents = [intents_of[i] for i in held]
    outs = [model.joint_logits(w) for w in held_words]
    calibration, ev, printed = calibrate_joint(
        model,
        tags,
        [examples[i] for i in train],
        [intents_of[i] for i in train],
        (held_words, held_tags, held_intents, outs),
        opts.seed,
    )
    best = ev.best_mode(0.97)
    combine, slot_mode = best.split("/")
    used = calibration["threshold_calibration"]["frame_confidence"]
    temperature = calibration["temperature"]
    intent_temperature = calibration["intent_temperature"]
    metrics: dict[str, Any] = {
        **ev.summary(),
        "frame_calibrator": calibration["frame_calibrator"],
        "printed_threshold_97": None if math.isinf(printed.threshold) else printed.threshold,
        "printed_threshold_confidence": used,
        "printed_threshold_escalation": printed.escalation,
        "temperature": temperature,
        "intent_temperature": intent_temperature,
        "confidence_combine": combine,
        "best_slot_confidence": slot_mode,
        "train_examples": len(train),
        "held_out_examples": len(held),
        "average": average,
        **stats,
        "total_seconds": round(stats["training_seconds_to_bundle"] + time.monotonic() - t0, 1),
    }
    del metrics["training_seconds_to_bundle"]
    log(
        f"held-out ({len(held)}), weights {average!r}: intent accuracy "
        f"{ev.intent_accuracy:.2%}, slot F1 {ev.slot_f1:.2%}, frame accuracy "
        f"{ev.frame_accuracy:.2%}; escalation for 97% frames "
        f"{ev.escalation_for(0.97, best):.1%} with {combine} of intent and "
        f"{slot_mode!r} slot confidence; {ev.escalation_for(0.97, CALIBRATED):.1%} with "
        f"the frame calibrator (cross-fitted; "
        f"{'kept' if calibration['frame_calibrator'] else 'not kept: no better'}); "
        f"T={temperature:.3f}, intent T={intent_temperature:.3f}\n"
        f"{printed_line(printed, len(held), used)}"
    )

    with staging_dir(out_root, task) as staging:
        for name in ("model.onnx", "tokenizer.json", "labels.json", INTENTS_FILE):
            shutil.copyfile(files_dir / name, staging / name)
        write_json(staging / "calibration.json", calibration)
        write_json(staging / "metrics.json", metrics)
        manifest: dict[str, Any] = {
            **tagger_manifest(task, source, opts.opset, command),
            "tagger": {
                **tagger_section(
                    tags,
                    len(train),
                    data.path,
                    opts,
                    "BIO, first sub-word token; intent = token mean of the intent columns",
                ),
                "intents": len(intents),
                **_training_choices(opts, average),
            },
            "metrics": {
                k: metrics[k]
                for k in (
                    "intent_accuracy",
                    "slot_f1",
                    "frame_accuracy",
                    "confidence_combine",
                    "best_slot_confidence",
                    "train_seconds",
                )
            },
        }
    files = [
        "model.onnx",
        "tokenizer.json",
        "labels.json",
        INTENTS_FILE,
        "calibration.json",
        "metrics.json",
    ]
    return publish_bundle(staging, out_root / task, manifest, files, log)


def _training_choices(opts: JointOptions, average: str) -> dict[str, Any]:
    """The training options that differ from the original recipe (so the manifests of
    bundles trained before them stay as they were)."""
    out: dict[str, Any] = {}
    if average != "none":
        out["average"] = average
    if opts.layer_decay != 1.0:
        out["layer_decay"] = opts.layer_decay
    if split_seed(opts) != opts.seed:
        out["split_seed"] = split_seed(opts)
    return out


def split_seed(opts: JointOptions) -> int:
    """The seed of the held-out split: ``opts.split_seed``, else ``opts.seed``."""
    return opts.seed if opts.split_seed is None else opts.split_seed


def bundle_split_seed(tagger: dict[str, Any]) -> int:
    """The seed of a joint bundle's held-out split (``tagger``: its manifest's ``tagger``
    section; bundles trained before ``split_seed`` existed used ``seed``)."""
    return int(tagger.get("split_seed", tagger["seed"]))


def bundle_held_out(tagger: dict[str, Any], n: int) -> list[int]:
    """The rows of the ``n``-line training file that a joint bundle held out for its
    calibration (``tagger``: its manifest's ``tagger`` section)."""
    return random_held_out(n, float(tagger["held_out"]), bundle_split_seed(tagger))


def calibrate_joint(
    model: JointTaggerModel,
    tags: list[str],
    train_examples: list[Tagged],
    train_intents: list[str],
    held: tuple[
        list[list[str]], list[list[str]], list[str], list[tuple[FloatArray, FloatArray] | None]
    ],
    seed: int = 0,
) -> tuple[dict[str, Any], JointEvaluation, CurvePoint]:
    """The bundle's ``calibration.json`` from the held-out split (words, tags, intents and
    the INT8 model's joint logits): the tag and intent temperatures, the slots of each
    intent (:func:`intent_slots`), the frame confidence combination that needs the least
    escalation for 97 % frames, the :class:`FrameCalibrator`, and the threshold ``train``
    prints and stores (:func:`~edgeagent.modeltools.tagger.printed_threshold` on the frame
    confidence a task with ``tagger_confidence = 'words'`` gets: the calibrator's when kept,
    else the combination of the intent with ``words``); with the evaluation (its
    ``calibrated`` curve cross-fitted) and the threshold's point on the split's curve.
    Sets the model's temperature and slots."""
    import numpy as np

    words, gold_tags, gold_intents, outs = held
    intents = model.intents
    tag_index = {t: i for i, t in enumerate(tags)}
    word_rows = [o[0] for o in outs if o is not None]
    word_y = [tag_index[t] for o, gt in zip(outs, gold_tags, strict=True) if o for t in gt]
    temperature = fit_temperature(
        np.concatenate(word_rows, axis=0), np.array(word_y, dtype=np.int64)
    )
    int_rows = np.stack([o[1] for o in outs if o is not None])
    int_y = np.array(
        [intents.index(g) for o, g in zip(outs, gold_intents, strict=True) if o is not None],
        dtype=np.int64,
    )
    model.intent_temperature = fit_temperature(int_rows, int_y)
    model.intent_slots = intent_slots(train_examples, train_intents)
    decoder = Decoder(tags, temperature)
    tagged, probs = predict_joint(model, decoder, words, outs)
    calibrator, crossfit = fit_frame_calibrator(
        tagged,
        joint_correct(tagged, probs, gold_tags, gold_intents, intents),
        [None if p is None else float(p.max()) for p in probs],
        seed=seed,
    )
    ev = evaluate_joint(tagged, probs, gold_tags, gold_intents, intents, tags, crossfit)
    best = ev.best_mode(0.97)
    # kept only where it needs less escalation than the plain combination (SNIPS: it
    # needed 21.2 % vs 20.1 % on the held-out split, 20.9 % vs 17.9-18.6 % on validation)
    if ev.escalation_for(0.97, CALIBRATED) >= ev.escalation_for(0.97, best):
        calibrator = None
    used = CALIBRATED if calibrator is not None else f"{best.split('/')[0]}/words"
    printed = printed_threshold(ev.curves[used], len(words), PRINTED_TARGET)
    return (
        {
            "temperature": temperature,
            "intent_temperature": model.intent_temperature,
            "confidence_combine": best.split("/")[0],
            "intent_slots": {k: sorted(v) for k, v in sorted(model.intent_slots.items())},
            "frame_calibrator": calibrator and calibrator.to_json(),
            **stored_threshold(printed, len(words), used),
        },
        ev,
        printed,
    )


def calibrate_joint_bundle(
    bundle: Path,
    examples_path: Path,
    *,
    target_escalation: float | None = None,
    target_precision: float | None = None,
    confidence: str = "words",
    threads: int = 1,
    write: bool = True,
    log: Any = print,
) -> dict[str, Any]:
    """``edgeagent calibrate`` for a joint bundle: the threshold on the *frame* confidence
    the runtime uses (the bundle's combination of the intent probability and the slots'
    ``confidence`` mode) that meets the target on held-out tagged sentences with intents.
    The result's ``confidence`` is the slot mode, as for a tagger bundle, so the backend's
    check that the task's ``tagger_confidence`` matches the calibration still holds."""
    check_one_target(target_escalation, target_precision)
    examples = load_tagged_examples(examples_path)
    gold_intents = load_intents(examples_path)
    backend = calibration_backend(bundle, threads)
    try:
        model, decoder = backend.loaded()
        if not isinstance(model, JointTaggerModel):
            raise ValueError(f"{bundle}: not a joint bundle (no {INTENTS_FILE})")
        words = [w for w, _ in examples]
        tagged, probs = predict_joint(model, decoder, words)
        cal = backend.calibrator if backend.calibrator and confidence == "words" else None
        ev = evaluate_joint(
            tagged,
            probs,
            [t for _, t in examples],
            gold_intents,
            model.intents,
            decoder.tags,
            None if cal is None else calibrated_confidences(cal, tagged, probs),
        )
        mode = CALIBRATED if cal is not None else f"{model.combine}/{confidence}"
    finally:
        backend.close()
    return store_frame_threshold(
        bundle,
        ev.curves[mode],
        target_escalation,
        target_precision,
        {"confidence": confidence, "frame_confidence": mode},
        len(examples),
        ev.summary(),
        f"intent accuracy {ev.intent_accuracy:.2%}, slot F1 {ev.slot_f1:.2%}",
        write=write,
        log=log,
    )
