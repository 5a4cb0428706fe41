"""Optional fine-tuning of the sentence encoder on a task's examples (torch, CPU).

Build time only (``build`` extra).  The encoder is trained with a cosine-softmax
classifier on top of its mean-pooled, L2-normalised embeddings (cross-entropy, scale
``s``: a proxy-based contrastive loss that pulls each label's examples together and
pushes the labels apart); the classifier layer is thrown away and the tuned encoder goes
through the normal export + INT8 path (:func:`edgeagent.modeltools.build.build_encoder`).
The frozen-embedding head of :mod:`edgeagent.modeltools.train` is then trained on the
tuned encoder.

What makes it cheap enough for a 2-core device (measured on Banking77, see
``benchmarks/README.md``):

- **lower layers frozen and cached**: the embeddings and the lowest ``freeze_layers``
  transformer layers are run once over every example (no gradient) and their output is
  kept in memory; each step then runs and back-propagates only the upper layers;
- **length-bucketed batches with dynamic padding**: examples of similar token length are
  batched together (batch order still shuffled), so almost no compute goes to padding;
- **a short ``max_length``**: intent utterances are short; the token-length
  distribution is logged and the number of truncated examples reported;
- few epochs at a higher learning rate, and the classifier starting at the class
  centroids of the untuned embeddings.

Only the training split is used here: the held-out split that later fits the temperature
and the out-of-scope cut-off is excluded, so calibration stays honest.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import random
import resource
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from edgeagent.modeltools.progress import Progress

#: Libraries whose warnings and info logs are build-time noise for the user (deprecations,
#: tracer warnings, "some weights were not initialised"); their errors still show.
NOISY = ("torch", "transformers", "optimum", "onnx", "onnxruntime", "huggingface_hub")


@contextmanager
def quiet_ml_libraries() -> Iterator[None]:
    """Silence warnings and info/warning logs of torch, transformers, optimum and
    onnx(runtime) inside the block; errors (exceptions, ERROR logs) still show."""
    for configures_itself in ("transformers.utils.logging", "optimum.utils.logging"):
        # These set their root logger's level on their first get_logger(): make that
        # happen now, before we set it, not inside the block when the exporter is imported.
        try:
            mod: Any = importlib.import_module(configures_itself)
            mod.get_logger()
        except ImportError:
            continue
    saved: dict[str, int] = {}
    with warnings.catch_warnings():
        for mod in NOISY:
            warnings.filterwarnings("ignore", module=rf"{mod}(\.|$)")
        # The tracer and deprecation warnings are raised from user-facing call sites too.
        for cat in (DeprecationWarning, FutureWarning, UserWarning):
            warnings.filterwarnings("ignore", category=cat)
        # onnxruntime.quantization warns through the root logger ("WARNING:root:...").
        for name in (*NOISY, ""):
            lg = logging.getLogger(name or None)
            saved[name] = lg.level
            lg.setLevel(logging.ERROR)
        verbosity = _set_transformers_verbosity(logging.ERROR)
        try:
            yield
        finally:
            for name, level in saved.items():
                logging.getLogger(name or None).setLevel(level)
            if verbosity is not None:
                _set_transformers_verbosity(verbosity)


def _set_transformers_verbosity(level: int) -> int | None:
    """Set transformers' own logger verbosity (it does not follow ``logging``); returns
    the previous one, ``None`` when transformers is not installed."""
    try:
        tlog: Any = importlib.import_module("transformers.utils.logging")
    except ImportError:
        return None
    before = int(tlog.get_verbosity())
    tlog.set_verbosity(level)
    return before


#: ``train --finetune``: the smallest held-out NLL gain (relative) for which the head takes
#: the kNN blend (``TrainOptions.knn_min_gain``, 5 % otherwise).  Measured on Banking77:
#: on three encoders (frozen, 2 and 4 epochs) the kNN vote lowered the escalation needed
#: for 99 % by 3.5-5 points; on the 4-epoch encoder it gains only 3 % NLL (one split,
#: seed 42: see benchmarks/README.md).
KNN_MIN_GAIN = 0.02


@dataclass(frozen=True)
class FinetuneOptions:
    """Knobs of the encoder fine-tune (defaults: the best measured on Banking77 within
    15 minutes of one CPU thread; see ``benchmarks/README.md``)."""

    epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-4
    head_lr: float = 5e-3
    scale: float = 20.0
    label_smoothing: float = 0.0
    pairs: float = 0.0
    """SetFit-style contrastive term: with ``pairs`` > 0 each batch is half anchors, half a
    same-label partner of each, and ``pairs`` times a supervised contrastive loss over the
    batch (temperature ``1 / scale``) is added to the classifier's cross-entropy."""
    swa: float = 0.0
    """Weight averaging (SWA): with ``swa`` > 0 the learning rate stops decaying for the
    last ``swa`` fraction of the steps and the encoder saved is the uniform average of
    the weights after each of those steps (:class:`WeightAverages`; one model, no run-time
    cost)."""
    max_length: int = 64
    freeze_layers: int = 2
    bucket: bool = True
    seed: int = 0
    threads: int = 1
    progress_every: float = 30.0

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> FinetuneOptions:
        """Options from keyword arguments (unknown names are a ValueError)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown fine-tuning options {unknown} (known: {sorted(known)})")
        opts = cls(**kwargs)
        if opts.epochs < 1 or opts.batch_size < 1 or opts.max_length < 8:
            raise ValueError("fine-tuning needs epochs >= 1, batch_size >= 1, max_length >= 8")
        if not 0.0 <= opts.swa < 1.0:
            raise ValueError("fine-tuning needs 0 <= swa < 1")
        return opts


def length_stats(lengths: list[int], max_length: int) -> dict[str, Any]:
    """Token-length distribution of the examples (with special tokens), before truncation."""
    ordered = sorted(lengths)

    def q(p: float) -> int:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {
        "examples": len(ordered),
        "p50": q(0.5),
        "p90": q(0.9),
        "p99": q(0.99),
        "max": ordered[-1],
        "mean": round(sum(ordered) / len(ordered), 1),
        "truncated": sum(n > max_length for n in ordered),
        "max_length": max_length,
    }


def pair_batches(
    targets: list[int], lengths: list[int], batch_size: int, rng: random.Random
) -> list[list[int]]:
    """Batches for the contrastive term: ``batch_size // 2`` anchors (each example once
    every two epochs' worth of rows, in length-bucketed order) each followed by a random
    other example of its label (itself if it is the label's only one)."""
    by_label: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_label.setdefault(t, []).append(i)
    half = max(1, batch_size // 2)
    anchors = [i for b in length_buckets(lengths, half, rng) for i in b]
    anchors = anchors[: max(half, len(anchors) // 2)]
    batches: list[list[int]] = []
    for start in range(0, len(anchors), half):
        batch: list[int] = []
        for i in anchors[start : start + half]:
            mates = by_label[targets[i]]
            j = rng.choice(mates) if len(mates) > 1 else i
            while j == i and len(mates) > 1:
                j = rng.choice(mates)
            batch += [i, j]
        batches.append(batch)
    return batches


def supcon_loss(torch: Any, emb: Any, target: Any, temperature: float) -> Any:
    """Supervised contrastive loss (Khosla et al. 2020) of unit-length ``emb``: each row's
    same-label rows are its positives, every other row the denominator."""
    sim = emb @ emb.T / temperature
    eye = torch.eye(len(target), dtype=torch.bool)
    sim = sim.masked_fill(eye, -1e9)
    pos = (target[:, None] == target[None, :]) & ~eye
    logp = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    has = pos.any(dim=1)
    per_row = -(logp * pos).sum(dim=1)[has] / pos.sum(dim=1)[has]
    return per_row.mean() if bool(has.any()) else sim.sum() * 0.0


def length_buckets(
    lengths: list[int], batch_size: int, rng: random.Random, *, bucket: bool = True
) -> list[list[int]]:
    """Batches of example indices for one epoch.  With ``bucket``: the examples are
    shuffled, cut into pools of 50 batches, each pool sorted by length and cut into
    batches, and the batches shuffled, so a batch holds similar lengths (little padding)
    while the order and the company of each example still change every epoch."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not bucket:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    pool = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


class _Encoder:
    """The transformers encoder split at ``freeze`` layers: ``lower`` (run once per example,
    no gradient) and ``upper`` (trained).  Works on BERT-style models
    (``model.embeddings``, ``model.encoder.layer``); for any other layout, or if the split
    forward does not reproduce the whole model's output, everything is trained through the
    model's own forward (``freeze`` then only stops gradients)."""

    def __init__(self, model: Any, freeze: int, log: Any) -> None:
        self.torch: Any = importlib.import_module("torch")
        self.model = model
        layers = getattr(getattr(model, "encoder", None), "layer", None)
        self.layers = list(layers) if layers is not None else None
        n = len(self.layers) if self.layers is not None else 0
        self.freeze = max(0, min(freeze, n - 1)) if self.layers is not None else 0
        self.split = self.layers is not None and hasattr(model, "embeddings")
        frozen = [getattr(model, "embeddings", None)]
        if self.layers is not None:
            frozen += self.layers[: self.freeze]
        for mod in frozen:
            if mod is not None:
                for p in mod.parameters():
                    p.requires_grad_(False)
        if self.split and not self._check():
            log("  (split forward differs from the model's: training through its own forward)")
            self.split = False

    def trainable(self) -> list[Any]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def lower(self, ids: Any, mask: Any) -> Any:
        """Hidden states after the frozen layers, ``(batch, tokens, dim)``, no gradient."""
        torch = self.torch
        with torch.no_grad():
            h = self.model.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
            ext = self._mask(mask, h)
            for layer in (self.layers or [])[: self.freeze]:
                h = _first(layer(h, attention_mask=ext))
        return h

    def upper(self, h: Any, mask: Any) -> Any:
        ext = self._mask(mask, h)
        for layer in (self.layers or [])[self.freeze :]:
            h = _first(layer(h, attention_mask=ext))
        return h

    def _mask(self, mask: Any, h: Any) -> Any:
        """Additive attention mask ``(batch, 1, 1, tokens)``: 0 to attend, a large negative
        number for padding."""
        torch = self.torch
        return (1.0 - mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min

    def _check(self) -> bool:
        """The split forward reproduces the model's (eval mode, padded batch)."""
        torch = self.torch
        ids = torch.tensor([[101, 7592, 2088, 2000, 1996, 2924, 102], [101, 7592, 102, 0, 0, 0, 0]])
        mask = (ids != 0).long()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                ref = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
                got = self.upper(self.lower(ids, mask), mask)
            ok = bool(
                torch.allclose(ref[0], got[0], atol=1e-4)
                and torch.allclose(ref[1, :3], got[1, :3], atol=1e-4)
            )
        except Exception:  # any signature mismatch: fall back to the model's own forward
            ok = False
        finally:
            self.model.train(was_training)
        return ok


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, tuple) else out


def finetune_encoder(
    source_dir: Path,
    examples: list[tuple[str, str]],
    out_dir: Path,
    *,
    log: Any = print,
    **options: Any,
) -> Path:
    """Fine-tune the transformers model in ``source_dir`` on ``(text, label)`` examples
    and save it (weights + tokenizer + config, and ``finetune.json``: options, token
    lengths, seconds, peak RSS) to ``out_dir``.  ``options``: fields of
    :class:`FinetuneOptions`.  Returns ``out_dir``."""
    opts = FinetuneOptions.from_kwargs(options)
    with quiet_ml_libraries():
        stats = _finetune(source_dir, examples, out_dir, opts, log)
    (out_dir / "finetune.json").write_text(json.dumps(stats, indent=2) + "\n", "utf-8")
    return out_dir


def _finetune(
    source_dir: Path,
    examples: list[tuple[str, str]],
    out_dir: Path,
    opts: FinetuneOptions,
    log: Any,
) -> dict[str, Any]:
    # Typed as Any on purpose: torch/transformers stubs differ between installs.
    torch: Any = importlib.import_module("torch")
    transformers: Any = importlib.import_module("transformers")

    t0, cpu0 = time.monotonic(), time.process_time()
    torch.manual_seed(opts.seed)
    rng = random.Random(opts.seed)
    torch.set_num_threads(opts.threads)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(source_dir))
    model = transformers.AutoModel.from_pretrained(str(source_dir))
    labels = sorted({lb for _, lb in examples})
    index = {lb: i for i, lb in enumerate(labels)}
    target_all = [index[lb] for _, lb in examples]

    full = tokenizer([t for t, _ in examples], truncation=False)["input_ids"]
    lens = length_stats([len(x) for x in full], opts.max_length)
    log(
        f"  token lengths: median {lens['p50']}, p90 {lens['p90']}, p99 {lens['p99']}, "
        f"max {lens['max']}; {lens['truncated']} of {lens['examples']} cut at "
        f"max_length {opts.max_length}"
    )
    ids = [x if len(x) <= opts.max_length else x[: opts.max_length - 1] + x[-1:] for x in full]
    lengths = [len(x) for x in ids]
    enc = _Encoder(model, opts.freeze_layers, log)
    dim = int(model.config.hidden_size)

    pad_id = int(tokenizer.pad_token_id or 0)

    def pad(rows: list[list[int]]) -> tuple[Any, Any]:
        """Dynamic padding: ids and attention mask ``(len(rows), longest row)``."""
        width = max(len(r) for r in rows)
        t = torch.full((len(rows), width), pad_id, dtype=torch.long)
        m = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            t[i, : len(r)] = torch.tensor(r)
            m[i, : len(r)] = 1
        return t, m

    # 1. The frozen part, once: per-example hidden states after the lower layers.
    cache: list[Any] | None = None
    model.eval()
    sorted_idx = sorted(range(len(ids)), key=lambda i: lengths[i])
    if enc.split and enc.freeze > 0:
        cache = [None] * len(ids)
        prog = Progress(
            math.ceil(len(ids) / 64), "caching frozen layers", log=log, every=opts.progress_every
        )
        for start in range(0, len(sorted_idx), 64):
            chunk = sorted_idx[start : start + 64]
            t, m = pad([ids[i] for i in chunk])
            h = enc.lower(t, m)
            for row, i in enumerate(chunk):
                cache[i] = h[row, : lengths[i]].clone()
            prog.update()
        prog.close()

    def embed(batch: list[int]) -> Any:
        """Mean-pooled, L2-normalised embeddings of examples ``batch`` (with grad)."""
        t, m = pad([ids[i] for i in batch])
        if cache is not None:
            width = t.shape[1]
            h = torch.zeros(len(batch), width, dim)
            for row, i in enumerate(batch):
                h[row, : lengths[i]] = cache[i]
            out = enc.upper(h, m)
        else:
            out = model(input_ids=t, attention_mask=m).last_hidden_state
        w = m.unsqueeze(-1).to(out.dtype)
        pooled = (out * w).sum(dim=1) / w.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=1)

    # 2. The classifier starts at the class centroids of the untuned embeddings.
    classifier = torch.nn.Parameter(torch.zeros(len(labels), dim))
    with torch.no_grad():
        sums = torch.zeros(len(labels), dim)
        for start in range(0, len(sorted_idx), 128):
            chunk = sorted_idx[start : start + 128]
            sums.index_add_(0, torch.tensor([target_all[i] for i in chunk]), embed(chunk))
        classifier.copy_(torch.nn.functional.normalize(sums, dim=1))

    # 3. Train the upper layers.
    model.train()
    if enc.layers is not None and cache is not None:
        for layer in enc.layers[: enc.freeze]:
            layer.eval()
    steps_per_epoch = math.ceil(len(examples) / opts.batch_size)
    if opts.pairs > 0:  # pair_batches: half the examples as anchors, each with a partner
        half = max(1, opts.batch_size // 2)
        steps_per_epoch = math.ceil(max(half, len(examples) // 2) / half)
    total = steps_per_epoch * opts.epochs
    optim = torch.optim.AdamW(
        [
            {"params": enc.trainable(), "lr": opts.lr, "weight_decay": 0.01},
            {"params": [classifier], "lr": opts.head_lr, "weight_decay": 0.0},
        ]
    )
    swa_from = total - round(total * opts.swa) if opts.swa > 0 else total
    sched = warmup_decay(optim, total, hold_from=swa_from)
    averages = WeightAverages(
        model, ["swa"] if opts.swa > 0 else [], opts.epochs, swa_start=swa_from
    )
    prog = Progress(total, "fine-tuning", log=log, every=opts.progress_every)
    losses: list[float] = []
    for epoch in range(opts.epochs):
        running = 0.0
        if opts.pairs > 0:
            batches = pair_batches(target_all, lengths, opts.batch_size, rng)
        else:
            batches = length_buckets(lengths, opts.batch_size, rng, bucket=opts.bucket)
        for batch in batches:
            emb = embed(batch)
            weights = torch.nn.functional.normalize(classifier, dim=1)
            logits = opts.scale * emb @ weights.T
            target = torch.tensor([target_all[i] for i in batch])
            loss = torch.nn.functional.cross_entropy(
                logits, target, label_smoothing=opts.label_smoothing
            )
            if opts.pairs > 0:
                loss = loss + opts.pairs * supcon_loss(torch, emb, target, 1.0 / opts.scale)
            value = train_step(model, optim, sched, loss)
            averages.step(epoch)
            running += value
            prog.update(extra=f"epoch {epoch + 1}/{opts.epochs}, loss {value:.3f}")
        losses.append(running / steps_per_epoch)
    seconds = prog.close(extra="loss by epoch " + ", ".join(f"{x:.3f}" for x in losses))
    if averages.count("swa"):
        log(f"  encoder weights: the average of the last {averages.count('swa')} steps (swa)")
        model.load_state_dict(averages.state("swa"))
    save_tuned(model, tokenizer, out_dir)
    for extra in ("README.md",):  # keeps the licence line for the manifest
        if (source_dir / extra).is_file():
            shutil.copyfile(source_dir / extra, out_dir / extra)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stats = {
        "options": asdict(opts),
        "token_lengths": lens,
        "cached_frozen_layers": cache is not None,
        "train_seconds": round(seconds, 1),
        "total_seconds": round(time.monotonic() - t0, 1),
        "cpu_seconds": round(time.process_time() - cpu0, 1),
        "peak_rss_mb": round(peak, 1),
        "loss_by_epoch": [round(x, 4) for x in losses],
    }
    log(
        f"  fine-tuned in {stats['total_seconds']:.0f} s (CPU {stats['cpu_seconds']:.0f} s), "
        f"peak RSS {peak:.0f} MB"
    )
    return stats


def save_tuned(model: Any, tokenizer: Any, out_dir: Path) -> None:
    """Replace ``out_dir`` with the fine-tuned model (in eval mode) and its tokenizer."""
    model.eval()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def warmup_decay(optim: Any, total: int, hold_from: int | None = None) -> Any:
    """Learning rate: linear warm-up over the first 10 % of ``total`` steps, then linear
    decay to 0; from step ``hold_from`` on (SWA) it stays at that step's value."""
    torch: Any = importlib.import_module("torch")
    warmup = max(1, total // 10)

    def factor(step: int) -> float:
        step = step if hold_from is None else min(step, hold_from)
        return min((step + 1) / warmup, max(0.0, (total - step) / (total - warmup + 1)))

    return torch.optim.lr_scheduler.LambdaLR(optim, factor)


def train_step(model: Any, optim: Any, sched: Any, loss: Any) -> float:
    """One optimiser step on ``loss`` (gradients clipped to norm 1); returns the loss."""
    torch: Any = importlib.import_module("torch")
    optim.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optim.step()
    sched.step()
    return float(loss.detach())


#: Weight averages :class:`WeightAverages` keeps (``none``: the last step's weights).
AVERAGES = ("none", "ema", "swa", "epochs")


class WeightAverages:
    """Running averages of a model's weights during training, one per ``modes`` entry:

    - ``ema``: exponential moving average (decay ``ema_decay`` per step, about
      ``1 / (1 - ema_decay)`` steps of memory) from the start of the second epoch;
    - ``swa``: uniform mean of the weights after every step of the last epoch (or, with
      ``swa_start``, after every step from that 0-based step on);
    - ``epochs``: uniform mean of the weights at the end of every epoch from the second on.

    Call :meth:`step` after every optimiser step and :meth:`epoch_end` after every epoch;
    :meth:`state` gives a ``state_dict`` to load (non-float entries as the model's)."""

    def __init__(
        self,
        model: Any,
        modes: list[str],
        epochs: int,
        ema_decay: float = 0.995,
        swa_start: int | None = None,
    ) -> None:
        unknown = sorted(set(modes) - set(AVERAGES))
        if unknown:
            raise ValueError(f"unknown weight averages {unknown}; expected some of {AVERAGES}")
        self.model = model
        self.modes = sorted(set(modes) - {"none"})
        self.epochs = epochs
        self.ema_decay = ema_decay
        self.swa_start = swa_start
        self._steps = 0
        self._sums: dict[str, dict[str, Any]] = {}
        self._counts: dict[str, int] = dict.fromkeys(self.modes, 0)

    def count(self, mode: str) -> int:
        """How many weight sets ``mode``'s average holds (0: none yet)."""
        return self._counts.get(mode, 0)

    def _floats(self) -> dict[str, Any]:
        return {k: v.detach() for k, v in self.model.state_dict().items() if v.is_floating_point()}

    def _mean_in(self, mode: str) -> None:
        """Add the current weights to ``mode``'s uniform mean."""
        self._counts[mode] += 1
        n = self._counts[mode]
        current = self._floats()
        if n == 1:
            self._sums[mode] = {k: v.clone() for k, v in current.items()}
            return
        for k, avg in self._sums[mode].items():
            avg.add_(current[k] - avg, alpha=1.0 / n)

    def step(self, epoch: int) -> None:
        """After an optimiser step of 0-based ``epoch``."""
        if "ema" in self.modes and (epoch >= 1 or self.epochs == 1):
            if "ema" not in self._sums:
                self._mean_in("ema")
            else:
                current = self._floats()
                for k, avg in self._sums["ema"].items():
                    avg.mul_(self.ema_decay).add_(current[k], alpha=1.0 - self.ema_decay)
        self._steps += 1
        if "swa" in self.modes and (
            epoch == self.epochs - 1 if self.swa_start is None else self._steps > self.swa_start
        ):
            self._mean_in("swa")

    def epoch_end(self, epoch: int) -> None:
        """After 0-based ``epoch``."""
        if "epochs" in self.modes and (epoch >= 1 or self.epochs == 1):
            self._mean_in("epochs")

    def state(self, mode: str) -> dict[str, Any]:
        """The model's ``state_dict`` with ``mode``'s averaged float weights."""
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if mode != "none":
            state.update({k: v.clone() for k, v in self._sums[mode].items()})
        return state
