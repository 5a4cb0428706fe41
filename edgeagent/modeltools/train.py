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
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeagent.backends.onnx import OnnxEncoder
from edgeagent.bundle import publish_bundle, read_manifest, sha256_file
from edgeagent.heads.fit import TrainOptions, stratified_split, train_head
from edgeagent.learning.refit_data import save_refit_data

if TYPE_CHECKING:
    from collections.abc import Iterator

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
        threads=opts.threads,
        log=log,
        # the training seed by default; a fine-tune option "seed" trains another encoder
        # on the same splits (benchmarks/README.md: two-model ensembles)
        **{"seed": opts.seed, **finetune},
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
