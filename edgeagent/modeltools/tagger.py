"""``edgeagent train`` on BIO-tagged examples: fine-tune a token tagger and bundle it as INT8 ONNX.

Build time only for training (``build`` extra: torch on CPU, transformers, optimum); the
evaluation helpers (:func:`evaluate`, :func:`gold_spans`) are numpy only and shared with
``edgeagent calibrate`` and ``benchmarks/bench_tagger.py``.

Steps of :func:`train_tagger_bundle`:

1. read ``{"tokens": [...], "tags": [...]}`` lines (the format of the SNIPS and ATIS files),
   hold out a seeded fraction for calibration;
2. fine-tune the encoder bundle's source model (MiniLM by default) with a token-classification
   layer: each word is labelled on its first sub-word token, the others are ignored; AdamW
   with a faster rate for the new layer, linear warm-up and decay;
3. export with optimum (task ``token-classification``, output ``logits``), quantize to INT8
   per channel, and check the INT8 tags against fp32 on the held-out words;
4. on the held-out split, through the INT8 model and the runtime's own decoder: fit the
   temperature, measure slot F1, whole-frame accuracy and the escalation rate a perfect
   cloud needs for 95/97/99 % frame accuracy under each confidence mode;
5. write a versioned ``tagger`` bundle ``OUT/TASK/STAMP-FP`` and point ``OUT/TASK/latest`` at it.
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeagent.backends.tagger import (
    FRAME_FEATURES,
    Decoder,
    FrameCalibrator,
    OnnxTaggerBackend,
    TaggedText,
    TaggerModel,
    job_confidence,
    spans,
)
from edgeagent.bundle import sha256_file
from edgeagent.heads.curves import (
    CurvePoint,
    ece,
    escalation_curve,
    escalation_for,
    fit_temperature,
)
from edgeagent.modeltools.build import Source, provenance
from edgeagent.modeltools.train import ExamplesError, json_lines

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    FloatArray = npt.NDArray[np.float32]

Tagged = tuple[list[str], list[str]]
CONFIDENCE_MODES = ("words", "spans", "frame")
CALIBRATED = "calibrated"
"""The curve of the bundle's :class:`FrameCalibrator` confidence in an :class:`Evaluation`."""
PRINTED_BOUND_Z = 1.28
"""``train`` prints the threshold that meets 97 % frames with 90 % one-sided confidence on
its calibration split (:func:`bounded_threshold`)."""


@dataclass(frozen=True)
class TaggerOptions:
    """Defaults measured on SNIPS (11.8k sentences): 6 epochs at 1.5e-4 gave slot F1 95.8 %
    and frame accuracy 89.7 % on validation, vs 95.0 % / 88.0 % for 3 epochs at 1e-4."""

    epochs: int = 6
    batch_size: int = 32
    lr: float = 1.5e-4
    head_lr: float = 1e-3
    held_out: float = 0.1
    seed: int = 0
    threads: int = 2
    max_length: int = 128
    opset: int = 18
    held_out_by: str = "values"
    """``sentences`` (a random fraction), ``values`` (:func:`value_held_out`: sentences
    with slot values the model then never sees, so the printed threshold is chosen on
    unseen values; issue 14) or ``mixed`` (half of each: :func:`calibration_split`)."""


def is_tagged_file(path: Path) -> bool:
    """Whether the first non-blank line of a JSON-lines file is ``{"tokens", "tags"}``."""
    try:
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    row = json.loads(line)
                    return isinstance(row, dict) and "tokens" in row and "tags" in row
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return False


def load_tagged_examples(path: Path) -> list[Tagged]:
    """``{"tokens": [str], "tags": [str]}`` lines (other keys ignored) -> ``[(tokens, tags)]``.

    Tags must be ``O``, ``B-slot`` or ``I-slot``, one per token; the error names the line."""
    out: list[Tagged] = []
    for no, row in json_lines(path):
        tokens = row.get("tokens") if isinstance(row, dict) else None
        tags = row.get("tags") if isinstance(row, dict) else None
        if (
            not isinstance(tokens, list)
            or not isinstance(tags, list)
            or not tokens
            or not all(isinstance(t, str) and t and not t.isspace() for t in tokens)
            or not all(isinstance(t, str) for t in tags)
        ):
            raise ExamplesError(
                f'{path}:{no}: expected {{"tokens": [non-empty str], "tags": [str]}}'
            )
        if len(tokens) != len(tags):
            raise ExamplesError(f"{path}:{no}: {len(tokens)} tokens but {len(tags)} tags")
        for t in tags:
            if t != "O" and (t[:2] not in ("B-", "I-") or not t[2:]):
                raise ExamplesError(f"{path}:{no}: {t!r} is not a BIO tag (O, B-slot, I-slot)")
        out.append((tokens, tags))
    if not out:
        raise ExamplesError(f"{path}: no examples")
    return out


def tag_set(examples: list[Tagged]) -> list[str]:
    """``O`` first, then every ``B-x``/``I-x`` pair of the slots seen, sorted by slot (an
    ``I-x`` is added even when only ``B-x`` occurs, so any span length can be decoded)."""
    slots = sorted({t[2:] for _, tags in examples for t in tags if t != "O"})
    return ["O"] + [f"{p}-{s}" for s in slots for p in ("B", "I")]


def gold_spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """``{(slot, first word, last word)}`` of a BIO sequence (a stray ``I-x`` opens a span,
    as conlleval counts it)."""
    found = spans(tags, list(range(len(tags))), [1.0] * len(tags))
    return {(s.slot, s.first, s.last) for s in found}


@dataclass(frozen=True)
class Evaluation:
    examples: int
    slot_precision: float
    slot_recall: float
    slot_f1: float
    frame_accuracy: float
    too_long: int
    curves: dict[str, list[CurvePoint]]
    ece: dict[str, float]

    def escalation_for(self, target: float, mode: str = "words") -> float:
        return escalation_for(self.curves[mode], target).escalation

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "examples": self.examples,
            "slot_precision": round(self.slot_precision, 5),
            "slot_recall": round(self.slot_recall, 5),
            "slot_f1": round(self.slot_f1, 5),
            "frame_accuracy": round(self.frame_accuracy, 5),
            "too_long": self.too_long,
        }
        for mode in self.curves:
            out[f"ece_{mode}"] = round(self.ece[mode], 5)
            for target in (0.95, 0.97, 0.99):
                point = escalation_for(self.curves[mode], target)
                suffix = f"{round(target * 100)}_{mode}"
                out[f"escalation_for_{suffix}"] = round(point.escalation, 5)
                out[f"threshold_for_{suffix}"] = (
                    None if math.isinf(point.threshold) else round(point.threshold, 5)
                )
        return out


def evaluate(
    predictions: list[TaggedText | None],
    gold: list[list[str]],
    tags: list[str],
    calibrated: list[float] | None = None,
) -> Evaluation:
    """Slot precision/recall/F1 (exact spans), whole-frame accuracy (every span right and
    nothing extra) and, per confidence mode, the escalation curve with a perfect cloud.
    ``None`` predictions (too long) count as wrong and are always escalated.
    ``calibrated``: each prediction's :class:`FrameCalibrator` confidence, evaluated as
    one more mode (``calibrated``)."""
    import numpy as np

    tp = n_pred = n_gold = 0
    correct: list[bool] = []
    conf: dict[str, list[float]] = {m: [] for m in CONFIDENCE_MODES}
    forced: list[bool] = []
    for pred, gold_tags in zip(predictions, gold, strict=True):
        want = gold_spans(gold_tags)
        n_gold += len(want)
        if pred is None:
            correct.append(False)
            forced.append(True)
            for m in CONFIDENCE_MODES:
                conf[m].append(0.0)
            continue
        got = {(s.slot, s.first, s.last) for s in pred.spans}
        n_pred += len(got)
        tp += len(got & want)
        correct.append(got == want)
        forced.append(False)
        for m in CONFIDENCE_MODES:
            conf[m].append(job_confidence(pred, m))
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    ok = np.array(correct, dtype=bool)
    if calibrated is not None:
        conf[CALIBRATED] = [0.0 if f else c for c, f in zip(calibrated, forced, strict=True)]
    return Evaluation(
        examples=len(gold),
        slot_precision=precision,
        slot_recall=recall,
        slot_f1=f1,
        frame_accuracy=float(ok.mean()) if len(ok) else 0.0,
        too_long=sum(forced),
        curves={m: escalation_curve(c, correct, forced) for m, c in conf.items()},
        ece={m: ece(np.array(c, dtype=np.float32), ok) for m, c in conf.items()},
    )


def frame_correct(predictions: list[TaggedText | None], gold: list[list[str]]) -> list[bool]:
    """Whether each predicted frame has exactly the gold spans (``None``: wrong)."""
    return [
        p is not None and {(s.slot, s.first, s.last) for s in p.spans} == gold_spans(g)
        for p, g in zip(predictions, gold, strict=True)
    ]


def offsets_of(words: list[str]) -> list[tuple[int, int]]:
    """Character offsets of pre-split words in ``" ".join(words)``."""
    out: list[tuple[int, int]] = []
    pos = 0
    for w in words:
        out.append((pos, pos + len(w)))
        pos += len(w) + 1
    return out


def tag_examples(
    model: TaggerModel,
    decoder: Decoder,
    words: list[list[str]],
    logits: list[FloatArray | None] | None = None,
) -> list[TaggedText | None]:
    """Tag pre-split sentences one at a time, as the runtime does (offsets refer to
    ``" ".join``); ``None`` for a sentence longer than the model's ``max_length``.
    ``logits``: the model's outputs for ``words`` when already computed."""
    if logits is None:
        logits = [model.word_logits(ws) for ws in words]
    return [
        None if lg is None else decoder.tag(lg, offsets_of(ws))
        for ws, lg in zip(words, logits, strict=True)
    ]


# -- steps shared with the joint model (modeltools/joint.py) ---------------------------------


def first_subword_labels(
    word_ids: list[int | None], row_tags: list[str], index: dict[str, int]
) -> list[int]:
    """Label ids for one tokenized sentence: each word's tag on its first sub-word token,
    ``-100`` (ignored by the loss) on the others and on special tokens."""
    seen: set[int] = set()
    lab: list[int] = []
    for wid in word_ids:
        if wid is None or wid in seen:
            lab.append(-100)
        else:
            seen.add(wid)
            lab.append(index[row_tags[wid]])
    return lab


def token_classifier(
    source_dir: Path, columns: list[str], seed: int, threads: int
) -> tuple[Any, Any, Any]:
    """``(torch, tokenizer, model)``: torch seeded with ``seed`` on ``threads`` threads, and
    ``source_dir``'s tokenizer and encoder with a new token-classification layer of one
    output column per ``columns`` entry."""
    # Typed as Any on purpose: torch/transformers stubs differ between installs.
    torch: Any = importlib.import_module("torch")
    transformers: Any = importlib.import_module("transformers")
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(source_dir))
    model = transformers.AutoModelForTokenClassification.from_pretrained(
        str(source_dir),
        num_labels=len(columns),
        id2label=dict(enumerate(columns)),
        label2id={c: i for i, c in enumerate(columns)},
    )
    return torch, tokenizer, model


def head_body_optimizer(
    torch: Any, model: Any, lr: float, head_lr: float, layer_decay: float = 1.0
) -> Any:
    """AdamW with ``lr`` (weight decay 0.01) for the encoder and ``head_lr`` (no decay) for
    the new ``classifier.`` layer.  ``layer_decay`` < 1: layer-wise learning-rate decay, the
    top encoder layer at ``lr``, each layer below it (then the embeddings) at
    ``layer_decay`` times the rate above (parameters outside the layers and embeddings,
    e.g. a pooler, at ``lr``)."""
    head = [p for n, p in model.named_parameters() if n.startswith("classifier.")]
    body = [(n, p) for n, p in model.named_parameters() if not n.startswith("classifier.")]
    groups: dict[int, list[Any]] = {}
    depth = encoder_depth(n for n, _ in body) if layer_decay != 1.0 else 0
    for name, param in body:
        groups.setdefault(_layers_below_top(name, depth), []).append(param)
    return torch.optim.AdamW(
        [
            *(
                {"params": ps, "lr": lr * layer_decay**below, "weight_decay": 0.01}
                for below, ps in sorted(groups.items())
            ),
            {"params": head, "lr": head_lr, "weight_decay": 0.0},
        ]
    )


def encoder_depth(names: Iterable[str]) -> int:
    """The number of ``….layer.<i>.…`` transformer layers among parameter ``names``."""
    found = [_layer_number(n) for n in names]
    return 1 + max((i for i in found if i is not None), default=-1)


def _layer_number(name: str) -> int | None:
    parts = name.split(".")
    for a, b in itertools.pairwise(parts):
        if a == "layer" and b.isdigit():
            return int(b)
    return None


def _layers_below_top(name: str, depth: int) -> int:
    """How many layers ``name`` sits below the top one (the embeddings: ``depth``; 0 for
    anything else, and for every name when ``depth`` is 0)."""
    if depth == 0:
        return 0
    i = _layer_number(name)
    if i is not None:
        return depth - 1 - i
    return depth if ".embeddings." in f".{name}" else 0


def random_held_out(n: int, fraction: float, seed: int) -> list[int]:
    """Sorted indices of a seeded random ``fraction`` of ``n`` examples (at least one, and
    at least one left to train on)."""
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    n_held = min(n - 1, max(1, round(n * fraction)))
    return sorted(order[:n_held])


def export_tagger(tuned: Path, work: Path, opset: int, log: Any) -> tuple[Path, Path]:
    """Export the fine-tuned ``tuned`` model to ONNX and quantize it to INT8 per channel:
    returns ``(int8_dir, fp32_dir)``; ``int8_dir`` (under ``work``) holds ``model.onnx`` and
    ``tokenizer.json``."""
    from edgeagent.modeltools.build import export_int8

    int8_dir = work / "int8"
    int8_dir.mkdir()
    log(f"exporting to ONNX (opset {opset}) …")
    fp32_dir = export_int8(str(tuned), work, int8_dir, "token-classification", opset, True, log)
    tokenizer_file = fp32_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        tokenizer_file = tuned / "tokenizer.json"
    shutil.copyfile(tokenizer_file, int8_dir / "tokenizer.json")
    return int8_dir, fp32_dir


def write_json(path: Path, value: Any) -> None:
    """``value`` as indented, key-sorted JSON with a final newline."""
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", "utf-8")


def tagger_manifest(task: str, source: Source, opset: int, command: str | None) -> dict[str, Any]:
    """The part of a ``tagger`` bundle's manifest that does not depend on the head:
    provenance (:func:`edgeagent.modeltools.build.provenance`), quantization
    and tokenizer; the caller adds ``tagger`` and ``metrics``."""
    return {
        "kind": "tagger",
        "name": task,
        **provenance(source, command),
        "quantization": {
            "method": "onnxruntime.quantization.quantize_dynamic",
            "weight_type": "QInt8",
            "per_channel": True,
            "opset": opset,
        },
        "tokenizer": {"file": "tokenizer.json", "pad_token": "[PAD]"},
    }


def tagger_section(
    tags: list[str],
    trained_on: int,
    examples_path: Path,
    opts: Any,
    scheme: str = "BIO, first sub-word token",
) -> dict[str, Any]:
    """The manifest's ``tagger`` entries every tagger bundle has (``opts``: the training
    options, with ``epochs``, ``lr``, ``seed``, ``held_out`` and ``max_length``); the
    caller adds what its kind of bundle has besides."""
    return {
        "output": "logits",
        "tags": len(tags),
        "slots": (len(tags) - 1) // 2,
        "scheme": scheme,
        "trained_on_examples": trained_on,
        "examples_sha256": sha256_file(examples_path),
        "epochs": opts.epochs,
        "lr": opts.lr,
        "seed": opts.seed,
        "held_out": opts.held_out,
        "max_length_trained": opts.max_length,
    }


@contextmanager
def staging_dir(out_root: Path, task: str) -> Iterator[Path]:
    """A fresh hidden directory in ``out_root`` to assemble a bundle in (for
    :func:`edgeagent.bundle.publish_bundle`); removed if the block raises."""
    out_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{task}-", dir=out_root))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def calibration_backend(bundle: Path, threads: int) -> OnnxTaggerBackend:
    """The bundle loaded (and its files verified) exactly as the daemon loads it, without
    applying its own threshold (which calibration replaces); the caller closes it."""
    from edgeagent.config import TaskConfig

    backend = OnnxTaggerBackend(
        "calibrate",
        TaskConfig.model_validate(
            {
                "kind": "extract",
                "backend": {
                    "type": "onnx",
                    "bundle": str(bundle),
                    "intra_op_threads": threads,
                    "use_bundle_threshold": False,
                },
            }
        ),
    )
    backend.load()
    return backend


def store_frame_threshold(
    bundle: Path,
    points: list[CurvePoint],
    target_escalation: float | None,
    target_precision: float | None,
    confidence: dict[str, str],
    examples: int,
    summary: dict[str, Any],
    quality: str,
    *,
    write: bool,
    log: Any,
) -> dict[str, Any]:
    """Choose the threshold on the escalation curve ``points`` (of the confidence named by
    the last value of ``confidence``, the result's confidence fields) that meets the target
    on ``examples`` sentences; log it (``quality``: the model's figures, for the log line)
    and, with ``write``, store it in the bundle.  Returns the calibration result."""
    from edgeagent.bundle import read_manifest
    from edgeagent.heads.curves import choose_threshold, format_curve
    from edgeagent.modeltools.calibrate import store_threshold

    point, threshold, goal = choose_threshold(
        points, target_escalation, target_precision, "local frame accuracy"
    )
    result: dict[str, Any] = {
        "goal": goal,
        **confidence,
        "threshold": threshold,
        "examples": examples,
        "escalation": point.escalation,
        "overall_frame_accuracy": point.accuracy,
        "local_frame_accuracy": point.local_accuracy,
        **summary,
    }
    mode = list(confidence.values())[-1]
    log(format_curve(points))
    log(
        f"{goal}: threshold {threshold:.4f} ({mode}) -> escalate {point.escalation:.1%}, "
        f"overall frame accuracy {point.accuracy:.2%}, local {point.local_accuracy:.2%} on "
        f"{examples} sentences ({quality})"
    )
    if write:
        manifest = read_manifest(bundle, kind="tagger", verify=False)  # verified at load
        result["fingerprint"] = store_threshold(bundle, manifest, threshold, result, log)
    return result


def check_one_target(target_escalation: float | None, target_precision: float | None) -> None:
    """Calibration takes exactly one goal."""
    if (target_escalation is None) == (target_precision is None):
        raise ValueError("give exactly one of target_escalation or target_precision")


# -- training (torch) -----------------------------------------------------------------------


def finetune_tagger(
    source_dir: Path,
    examples: list[Tagged],
    tags: list[str],
    out_dir: Path,
    opts: TaggerOptions,
    log: Any = print,
) -> Path:
    """Fine-tune ``source_dir`` (a transformers encoder) for token classification on the
    examples and save model + tokenizer to ``out_dir``."""
    from edgeagent.modeltools.finetune import save_tuned, train_step, warmup_decay

    torch, tokenizer, model = token_classifier(source_dir, tags, opts.seed, opts.threads)
    rng = random.Random(opts.seed)
    index = {t: i for i, t in enumerate(tags)}
    model.train()
    optim = head_body_optimizer(torch, model, opts.lr, opts.head_lr)
    steps_per_epoch = math.ceil(len(examples) / opts.batch_size)
    total = steps_per_epoch * opts.epochs
    sched = warmup_decay(optim, total)
    order = list(range(len(examples)))
    step = 0
    t0 = time.monotonic()
    for epoch in range(opts.epochs):
        rng.shuffle(order)
        running = 0.0
        for start in range(0, len(order), opts.batch_size):
            batch = [examples[i] for i in order[start : start + opts.batch_size]]
            enc = tokenizer(
                [toks for toks, _ in batch],
                is_split_into_words=True,
                padding=True,
                truncation=True,
                max_length=opts.max_length,
                return_tensors="pt",
            )
            labels = [
                first_subword_labels(enc.word_ids(row), row_tags, index)
                for row, (_, row_tags) in enumerate(batch)
            ]
            loss = model(**enc, labels=torch.tensor(labels)).loss
            running += train_step(model, optim, sched, loss)
            step += 1
            if step % 100 == 0:
                log(f"    step {step}/{total}: loss {float(loss.detach()):.4f}")
        log(
            f"  epoch {epoch + 1}/{opts.epochs}: loss {running / steps_per_epoch:.4f} "
            f"({time.monotonic() - t0:.0f} s)"
        )
    save_tuned(model, tokenizer, out_dir)
    return out_dir


def train_tagger_bundle(
    task: str,
    examples_path: Path,
    source_spec: str,
    out_root: Path,
    opts: TaggerOptions,
    *,
    command: str | None = None,
    log: Any = print,
) -> Path:
    """Fine-tune ``source_spec`` (see :func:`edgeagent.modeltools.build.resolve_source`),
    export, quantize, calibrate and write a ``tagger`` bundle; returns it."""

    from edgeagent.bundle import publish_bundle
    from edgeagent.modeltools.build import resolve_source

    examples = load_tagged_examples(examples_path)
    tags = tag_set(examples)
    source = resolve_source(source_spec)
    if not Path(source.path_or_id).is_dir():
        raise ValueError(f"training a tagger needs the source model on disk, not {source.spec!r}")
    held = calibration_split(examples, opts.held_out, opts.held_out_by, opts.seed, log)
    train = sorted(set(range(len(examples))) - set(held))
    log(
        f"{len(examples)} examples, {len(tags)} tags ({(len(tags) - 1) // 2} slots); training "
        f"on {len(train)}, calibrating on {len(held)} held out"
    )
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgeagent-tagger-") as tmp:
        work = Path(tmp)
        log(f"fine-tuning {source.upstream} for token classification …")
        tuned = finetune_tagger(
            Path(source.path_or_id), [examples[i] for i in train], tags, work / "tuned", opts, log
        )
        staging_files, fp32_dir = export_tagger(tuned, work, opts.opset, log)

        held_words = [examples[i][0] for i in held]
        held_tags = [examples[i][1] for i in held]
        int8, fp32 = (
            TaggerModel(
                folder / "model.onnx",
                staging_files / "tokenizer.json",
                len(tags),
                max_length=max(opts.max_length, 512),
                intra_op_threads=opts.threads,
            )
            for folder in (staging_files, fp32_dir)
        )
        lq = [int8.word_logits(w) for w in held_words]
        lf = [fp32.word_logits(w) for w in held_words]
        agree = total = 0
        for q, f, gt in zip(lq, lf, held_tags, strict=True):
            if q is not None and f is not None:
                agree += int((q.argmax(axis=1) == f.argmax(axis=1)).sum())
                total += len(gt)
        log(f"INT8 vs fp32: same best tag on {agree / max(total, 1):.2%} of held-out words")
        held_cal = calibrate_held_out(tags, held_words, held_tags, lq, seed=opts.seed)
        temperature, calibrator, ev, printed = (
            held_cal.temperature,
            held_cal.calibrator,
            held_cal.evaluation,
            held_cal.printed,
        )
        raw = evaluate(tag_examples(int8, Decoder(tags, 1.0), held_words, lq), held_tags, tags)
        metrics: dict[str, Any] = {
            **ev.summary(),
            "frame_calibrator": calibrator and calibrator.to_json(),
            "printed_threshold_97": None if math.isinf(printed.threshold) else printed.threshold,
            "printed_threshold_escalation": printed.escalation,
            "temperature": temperature,
            "ece_words_uncalibrated": round(raw.ece["words"], 5),
            "int8_fp32_word_agreement": round(agree / max(total, 1), 5),
            "train_examples": len(train),
            "held_out_examples": len(held),
            "train_seconds": round(time.monotonic() - t0, 1),
        }
        log(
            f"held-out ({len(held)}): slot F1 {ev.slot_f1:.2%}, frame accuracy "
            f"{ev.frame_accuracy:.2%}, T={temperature:.3f}; escalation for 97% frame accuracy "
            f"{ev.escalation_for(0.97):.1%} (words) / {ev.escalation_for(0.97, 'spans'):.1%} "
            f"(spans) / {ev.escalation_for(0.97, 'frame'):.1%} (frame) / "
            f"{ev.escalation_for(0.97, CALIBRATED):.1%} (frame calibrator, cross-fitted)\n"
            f"{printed_line(printed, len(held), 'the frame calibrator')}"
        )
        if opts.held_out_by == "sentences":
            log(
                "  (chosen on random held-out sentences: traffic with values the model never "
                "saw may need more escalation; --held-out-by values calibrates on such "
                "sentences)"
            )

        with staging_dir(out_root, task) as staging:
            for name in ("model.onnx", "tokenizer.json"):
                shutil.copyfile(staging_files / name, staging / name)
            (staging / "labels.json").write_text(json.dumps(tags) + "\n", "utf-8")
            write_json(
                staging / "calibration.json",
                {
                    "temperature": temperature,
                    "frame_calibrator": calibrator and calibrator.to_json(),
                    **stored_threshold(printed, len(held), CALIBRATED),
                },
            )
            write_json(staging / "metrics.json", metrics)
            manifest: dict[str, Any] = {
                **tagger_manifest(task, source, opts.opset, command),
                "tagger": {
                    **tagger_section(tags, len(train), examples_path, opts),
                    "held_out_by": opts.held_out_by,
                },
                "metrics": {
                    k: metrics[k]
                    for k in (
                        "slot_f1",
                        "frame_accuracy",
                        "temperature",
                        "escalation_for_97_words",
                        f"escalation_for_97_{CALIBRATED}",
                        "printed_threshold_97",
                        "int8_fp32_word_agreement",
                    )
                },
            }
    files = ["model.onnx", "tokenizer.json", "labels.json", "calibration.json", "metrics.json"]
    return publish_bundle(staging, out_root / task, manifest, files, log)


def repeated_slots(examples: list[Tagged]) -> dict[str, int]:
    """slot -> the most distinct values (case-folded) one training sentence gives it, for
    the slots some sentence gives two or more: the slots the runtime must collect as
    arrays (it accepts the same value twice for a single-valued slot, not two values)."""
    most: dict[str, int] = {}
    for words, tags in examples:
        values: dict[str, set[str]] = {}
        for slot, first, last in gold_spans(tags):
            values.setdefault(slot, set()).add(" ".join(words[first : last + 1]).casefold())
        for slot, found in values.items():
            if len(found) > 1:
                most[slot] = max(most.get(slot, 0), len(found))
    return most


def schema_toml(
    task: str, tags: list[str], max_length: int = 64, examples: list[Tagged] | None = None
) -> str:
    """A ``[tasks.TASK.schema]`` block naming every slot as an optional string (printed by
    ``edgeagent train`` for the operator to trim and type).  With the training
    ``examples``, a slot that some sentence fills with two different values is an
    ``array`` of strings (:func:`repeated_slots`): a single string would make every such
    input ``schema_invalid``."""
    slots = sorted({t[2:] for t in tags if t != "O"})
    repeats = repeated_slots(examples) if examples else {}
    lines = [f"[tasks.{task}.schema]", 'type = "object"']
    for s in slots:
        key = s if s.replace("_", "").isalnum() else json.dumps(s)
        item = f'type = "string", maxLength = {max_length}'
        if s in repeats:
            lines.append(f'properties.{key} = {{ type = "array", items = {{ {item} }} }}')
        else:
            lines.append(f"properties.{key} = {{ {item} }}")
    return "\n".join(lines)


def calibrate_tagger_bundle(
    bundle: Path,
    examples: list[Tagged],
    *,
    target_escalation: float | None = None,
    target_precision: float | None = None,
    confidence: str = "words",
    threads: int = 1,
    write: bool = True,
    log: Any = print,
) -> dict[str, Any]:
    """``edgeagent calibrate`` for a tagger: on held-out tagged sentences, choose the
    threshold on the job confidence (``confidence`` mode) that meets a target escalation
    rate or a target *frame* precision of the local answers; store it in the bundle."""
    check_one_target(target_escalation, target_precision)
    backend = calibration_backend(bundle, threads)
    try:
        model, decoder = backend.loaded()
        words = [w for w, _ in examples]
        tagged = tag_examples(model, decoder, words)
        cal = backend.calibrator if confidence == "words" else None
        ev = evaluate(
            tagged,
            [t for _, t in examples],
            decoder.tags,
            None if cal is None else [0.0 if t is None else cal.confidence(t) for t in tagged],
        )
    finally:
        backend.close()
    return store_frame_threshold(
        bundle,
        ev.curves[CALIBRATED if cal is not None else confidence],
        target_escalation,
        target_precision,
        {"confidence": confidence, **({"frame_confidence": CALIBRATED} if cal else {})},
        len(examples),
        ev.summary(),
        f"slot F1 {ev.slot_f1:.2%}",
        write=write,
        log=log,
    )


# -- per-slot-type calibration (issue 14: why confidence does not transfer) -----------------


def slot_values(examples: list[Tagged]) -> dict[str, set[str]]:
    """slot -> the case-folded values the examples give it (what "seen in training" means)."""
    out: dict[str, set[str]] = {}
    for words, tags in examples:
        for slot, first, last in gold_spans(tags):
            out.setdefault(slot, set()).add(" ".join(words[first : last + 1]).casefold())
    return out


@dataclass(frozen=True)
class SlotStats:
    """One slot type's predicted spans (confidence vs exact correctness) and gold spans."""

    slot: str
    predicted: int
    correct: int
    gold: int
    found: int
    mean_confidence: float
    ece: float
    unseen_predicted: int
    unseen_correct: int
    unseen_gold: int
    unseen_found: int


def slot_report(
    predictions: list[TaggedText | None],
    gold: list[list[str]],
    words: list[list[str]],
    seen: dict[str, set[str]],
) -> tuple[list[SlotStats], dict[str, Any]]:
    """Per slot type: precision of the predicted spans, recall of the gold ones, the ECE of
    the span confidence against exact correctness, and the same counts restricted to values
    never seen in training (``seen``: :func:`slot_values` of the training examples).  Also,
    per frame, whether it holds an unseen gold value: frame accuracy, mean job confidence
    (``words``) and ECE in each group — where confidence stops meaning what it says."""
    import numpy as np

    rows: dict[str, dict[str, Any]] = {}

    def row(slot: str) -> dict[str, Any]:
        return rows.setdefault(
            slot, {"conf": [], "ok": [], "gold": 0, "found": 0, "u_pred": 0, "u_ok": 0,
                   "u_gold": 0, "u_found": 0},
        )  # fmt: skip

    frames: dict[bool, dict[str, list[Any]]] = {
        flag: {"conf": [], "ok": []} for flag in (False, True)
    }
    for pred, gold_tags, ws in zip(predictions, gold, words, strict=True):
        want = gold_spans(gold_tags)

        def unseen(slot: str, first: int, last: int, ws: list[str] = ws) -> bool:
            return " ".join(ws[first : last + 1]).casefold() not in seen.get(slot, set())

        has_unseen = any(unseen(*g) for g in want)
        got: set[tuple[str, int, int]] = set()
        if pred is not None:
            for s in pred.spans:
                key = (s.slot, s.first, s.last)
                got.add(key)
                r = row(s.slot)
                r["conf"].append(s.confidence)
                r["ok"].append(key in want)
                if unseen(*key):
                    r["u_pred"] += 1
                    r["u_ok"] += int(key in want)
        for g in want:
            r = row(g[0])
            r["gold"] += 1
            r["found"] += int(g in got)
            if unseen(*g):
                r["u_gold"] += 1
                r["u_found"] += int(g in got)
        frames[has_unseen]["conf"].append(0.0 if pred is None else job_confidence(pred, "words"))
        frames[has_unseen]["ok"].append(pred is not None and got == want)
    stats = []
    for slot, r in sorted(rows.items()):
        conf = np.array(r["conf"], dtype=np.float32)
        ok = np.array(r["ok"], dtype=bool)
        stats.append(
            SlotStats(
                slot,
                len(conf),
                int(ok.sum()),
                r["gold"],
                r["found"],
                float(conf.mean()) if len(conf) else 0.0,
                ece(conf, ok) if len(conf) else 0.0,
                r["u_pred"],
                r["u_ok"],
                r["u_gold"],
                r["u_found"],
            )
        )
    by_frame: dict[str, Any] = {}
    for flag, f in frames.items():
        conf = np.array(f["conf"], dtype=np.float32)
        ok = np.array(f["ok"], dtype=bool)
        by_frame["unseen_value" if flag else "seen_values_only"] = {
            "frames": len(conf),
            "frame_accuracy": float(ok.mean()) if len(ok) else 0.0,
            "mean_confidence": float(conf.mean()) if len(conf) else 0.0,
            "ece": ece(conf, ok) if len(conf) else 0.0,
        }
    return stats, by_frame


def calibration_split(
    examples: list[Tagged], fraction: float, by: str, seed: int = 0, log: Any = print
) -> list[int]:
    """Sorted indices of the calibration split (``by``: see :attr:`TaggerOptions.held_out_by`):
    ``sentences`` = a random ``fraction``; ``values`` = :func:`value_held_out`; ``mixed`` =
    half of each (sentences with unseen values *and* ordinary ones, so the frame calibrator
    can learn what an unseen value costs).  Falls back to random sentences when no slot is
    open-class."""
    if by == "sentences":
        return random_held_out(len(examples), fraction, seed)
    share = fraction / 2 if by == "mixed" else fraction
    by_value = value_held_out(examples, share, seed)
    if not by_value:
        log("no open-class slot to hold values out of: holding out random sentences")
        return random_held_out(len(examples), fraction, seed)
    if by == "values":
        return by_value
    rest = sorted(set(range(len(examples))) - set(by_value))
    extra = random_held_out(len(rest), share, seed)
    return sorted(set(by_value) | {rest[i] for i in extra})


def value_held_out(
    examples: list[Tagged], fraction: float, seed: int = 0, min_distinct: int = 20
) -> list[int]:
    """Indices of a calibration split that holds out whole *values*: a seeded random set of
    the values (case-folded text) of the open-class slots (``min_distinct`` or more
    distinct values in the examples: names, cities — not ``round_trip``), taken until
    about ``fraction`` of the sentences mention one; every sentence that mentions a chosen
    value in any open slot is held out, so the model never sees it in training.  A value
    that alone would overshoot the target by half (a hub city) is skipped.  Empty when no
    slot is open-class (the caller then falls back to random sentences)."""
    seen = slot_values(examples)
    open_slots = {slot for slot, vals in seen.items() if len(vals) >= min_distinct}
    mentions: list[set[str]] = []
    for words, tags in examples:
        mentions.append(
            {
                " ".join(words[a : b + 1]).casefold()
                for slot, a, b in gold_spans(tags)
                if slot in open_slots
            }
        )
    values = sorted({v for m in mentions for v in m})
    random.Random(seed).shuffle(values)
    target = max(1, round(len(examples) * fraction))
    held: set[int] = set()
    for value in values:
        if len(held) >= target:
            break
        add = {i for i, m in enumerate(mentions) if value in m} - held
        if len(held) + len(add) > target * 1.5:
            continue
        held |= add
    return sorted(held) if len(held) < len(examples) else []


# -- frame calibrator (issue 14): a logistic regression on what the tags do not know -------


def fit_logistic(x: FloatArray, y: npt.NDArray[np.bool_], l2: float = 1.0) -> tuple[Any, float]:
    """``(weights, bias)`` of an L2-regularised logistic regression (Newton's method on
    standardised columns; a constant column gets weight 0)."""
    import numpy as np

    mu = x.mean(axis=0)
    sd = x.std(axis=0)
    live = sd > 1e-9
    z = np.zeros_like(x, dtype=np.float64)
    z[:, live] = (x[:, live] - mu[live]) / sd[live]
    a = np.hstack([z, np.ones((len(z), 1))])
    t = y.astype(np.float64)
    w = np.zeros(a.shape[1])
    reg = np.full(a.shape[1], l2)
    reg[-1] = 0.0
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ w, -50, 50)))
        grad = a.T @ (p - t) + reg * w
        hess = (a * (p * (1 - p))[:, None]).T @ a + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if float(np.abs(step).max()) < 1e-8:
            break
    weights = np.zeros(x.shape[1])
    weights[live] = w[:-1][live] / sd[live]
    bias = float(w[-1] - (weights[live] * mu[live]).sum())
    return weights, bias


def fit_frame_calibrator(
    tagged: list[TaggedText | None],
    correct: list[bool],
    p_intents: list[float | None] | None = None,
    *,
    base: str = "words",
    folds: int = 5,
    seed: int = 0,
) -> tuple[FrameCalibrator | None, list[float]]:
    """Fit a :class:`FrameCalibrator` on the calibration split (``tagged``: its
    predictions; ``correct``: whether each frame was right; ``p_intents``: the intent
    probabilities of a joint model).  Returns it and its *cross-fitted* confidence on
    each split sentence (each from a model fitted on the other ``folds - 1`` folds; 0.0
    for a ``None`` prediction), so a threshold chosen on them is not chosen in-sample.
    Where the frames are all right (or all wrong) there is nothing to learn: no
    calibrator, and the ``base`` confidence (times the intent probability)."""
    import numpy as np

    names = tuple(n for n in FRAME_FEATURES if p_intents is not None or n != "log_intent")
    intents = p_intents if p_intents is not None else [None] * len(tagged)
    rows = [i for i, t in enumerate(tagged) if t is not None]
    x = np.array(
        [
            [f[n] for n in names]
            for f in (
                FrameCalibrator.features(t, pi)
                for t, pi in zip(tagged, intents, strict=True)
                if t is not None
            )
        ],
        dtype=np.float64,
    ).reshape(len(rows), len(names))
    y = np.array([correct[i] for i in rows], dtype=bool)

    def fitted(sel: Any) -> FrameCalibrator | None:
        if len(set(y[sel].tolist())) < 2:  # one class only: no signal
            return None
        w, b = fit_logistic(x[sel], y[sel])
        return FrameCalibrator(base, names, tuple(float(v) for v in w), b)

    def confidence(model: FrameCalibrator | None, t: TaggedText, pi: float | None) -> float:
        if model is not None:
            return model.confidence(t, pi)
        return job_confidence(t, base) * (1.0 if pi is None else pi)

    out = [0.0] * len(tagged)
    k_folds = max(2, folds)
    order = np.random.default_rng(seed).permutation(len(rows))
    fold_of = np.empty(len(rows), dtype=np.int64)
    fold_of[order] = np.arange(len(rows)) % k_folds
    for k in range(k_folds):
        model = fitted(fold_of != k)
        for j in np.flatnonzero(fold_of == k):
            i = rows[int(j)]
            t = tagged[i]
            assert t is not None
            out[i] = confidence(model, t, intents[i])
    return fitted(np.ones(len(rows), dtype=bool)), out


def wilson_lower(right: float, n: int, z: float) -> float:
    """One-sided Wilson lower bound of a proportion ``right / n`` (``z`` = 1.28: 90 %)."""
    if n <= 0:
        return 0.0
    p = right / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(max(0.0, p * (1 - p)) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


def wilson_interval(right: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Two-sided Wilson score interval of a proportion (``z`` = 1.96: 95 %)."""
    if n <= 0:
        return 0.0, 1.0
    return wilson_lower(right, n, z), 1.0 - wilson_lower(n - right, n, z)


def bounded_threshold(
    points: list[CurvePoint], n: int, target: float, z: float = PRINTED_BOUND_Z
) -> CurvePoint:
    """The cheapest point of an escalation curve over ``n`` calibration sentences whose
    overall accuracy meets ``target`` with one-sided confidence (``z`` = 1.28: 90 %): the
    Wilson upper bound of its error rate is at most ``1 - target``.  The plain cheapest
    point only just meets the target on a few hundred sentences (a winner's curse: on
    ATIS it gave 94.6-96.6 % on unseen sentences)."""
    for p in points:
        if wilson_lower(p.accuracy * n, n, z) >= target - 1e-12:
            return p
    return points[-1]


def local_bounded_threshold(
    points: list[CurvePoint], target: float, z: float = PRINTED_BOUND_Z
) -> CurvePoint:
    """The cheapest point whose *answered* frames are right with a Wilson lower bound
    (one-sided, ``z``) of at least ``target``: escalate everything when none is.

    Unlike :func:`bounded_threshold` (errors per calibration sentence), this does not
    depend on how many sentences the calibration split escalates: traffic easier than
    the split is answered more often, at the same precision, so its overall accuracy is
    at least ``target`` too (issue 14: an overall target chosen on a split with 77 % of
    frames right gave 96.1 % on test sentences with 86 % right)."""
    for p in points:
        if p.local == 0:
            return p
        if wilson_lower(p.local_accuracy * p.local, p.local, z) >= target - 1e-12:
            return p
    return points[-1]


PRINTED_RULE = "local"
PRINTED_TARGET = 0.97


def stored_threshold(point: CurvePoint, examples: int, frame_confidence: str) -> dict[str, Any]:
    """``calibration.json``'s ``threshold`` and ``threshold_calibration`` for the threshold
    ``train`` printed (``point``, chosen on ``examples`` calibration sentences): the bundle
    applies it by default (``use_bundle_threshold``) to the ``words`` job confidence (which
    the bundle's frame calibrator replaces: ``frame_confidence``).  A point that escalates
    everything stores 1.0 (an answer needs confidence 1.0)."""
    return {
        "threshold": 1.0 if math.isinf(point.threshold) else point.threshold,
        "threshold_calibration": {
            "goal": (
                f"answered frames right >= {PRINTED_TARGET:.0%} with 90 % one-sided "
                f"confidence, else overall frames >= {PRINTED_TARGET:.0%} (edgeagent train)"
            ),
            "confidence": "words",
            "frame_confidence": frame_confidence,
            "examples": examples,
            "escalation": point.escalation,
            "overall_frame_accuracy": point.accuracy,
            "local_frame_accuracy": point.local_accuracy,
        },
    }


def printed_line(point: CurvePoint, examples: int, confidence: str) -> str:
    """What ``train`` prints about the threshold it stored (:func:`stored_threshold`)."""
    threshold = 1.0 if math.isinf(point.threshold) else point.threshold
    return (
        f"threshold {threshold:.4f} on {confidence} (the confidence of a task with "
        f"tagger_confidence = 'words'): answered frames right {point.local_accuracy:.2%} on "
        f"{examples} calibration sentences ({PRINTED_TARGET:.0%} with 90% one-sided "
        f"confidence), {point.escalation:.1%} escalated there; stored in the bundle and "
        "applied by default (use_bundle_threshold = true)"
    )


def printed_threshold(
    points: list[CurvePoint],
    n: int,
    target: float,
    rule: str = PRINTED_RULE,
    z: float = PRINTED_BOUND_Z,
) -> CurvePoint:
    """The threshold ``train`` prints and stores: ``local`` (:func:`local_bounded_threshold`)
    or ``overall`` (:func:`bounded_threshold`).  Where no point of the split shows the
    local bound (the most confident frames still hold errors: ATIS, a 2-epoch tagger, its
    answered frames at best 98.1 % right on 311), ``local`` falls back to ``overall``
    rather than escalating everything."""
    overall = bounded_threshold(points, n, target, z)
    if rule == "overall":
        return overall
    local = local_bounded_threshold(points, target, z)
    return overall if local.local == 0 else local


@dataclass(frozen=True)
class HeldOutCalibration:
    """What ``train`` learns on its calibration split (:func:`calibrate_held_out`)."""

    temperature: float
    decoder: Decoder
    tagged: list[TaggedText | None]
    calibrator: FrameCalibrator | None
    crossfit: list[float]
    evaluation: Evaluation
    printed: CurvePoint


def calibrate_held_out(
    tags: list[str],
    words: list[list[str]],
    gold: list[list[str]],
    logits: list[FloatArray | None],
    *,
    seed: int = 0,
    target: float = PRINTED_TARGET,
    rule: str = PRINTED_RULE,
    z: float = PRINTED_BOUND_Z,
) -> HeldOutCalibration:
    """The calibration steps of :func:`train_tagger_bundle` after the INT8 model ran on the
    calibration split (``logits``, one per sentence, ``None`` when too long): the
    temperature, the cross-fitted :class:`FrameCalibrator` and the threshold ``train``
    prints and stores for ``target`` frames (:func:`printed_threshold`).  Shared with
    ``benchmarks/tagger_threshold_seeds.py``, which reruns it on cached logits."""
    import numpy as np

    index = {t: i for i, t in enumerate(tags)}
    rows = [lg for lg in logits if lg is not None]
    ys = [index[t] for lg, gt in zip(logits, gold, strict=True) if lg is not None for t in gt]
    temperature = fit_temperature(np.concatenate(rows, axis=0), np.array(ys, dtype=np.int64))
    decoder = Decoder(tags, temperature)
    tagged = [
        None if lg is None else decoder.tag(lg, offsets_of(ws))
        for ws, lg in zip(words, logits, strict=True)
    ]
    calibrator, crossfit = fit_frame_calibrator(tagged, frame_correct(tagged, gold), seed=seed)
    ev = evaluate(tagged, gold, tags, crossfit)
    printed = printed_threshold(ev.curves[CALIBRATED], len(gold), target, rule, z)
    return HeldOutCalibration(temperature, decoder, tagged, calibrator, crossfit, ev, printed)
