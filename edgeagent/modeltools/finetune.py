"""Optional full fine-tuning of the sentence encoder on a task's examples (torch, CPU).

Build time only (``build`` extra).  The encoder is trained with a cosine-softmax
classifier on top of its mean-pooled, L2-normalised embeddings (cross-entropy, scale
``s``), which pulls each label's examples together; the classifier layer is thrown away
and the tuned encoder goes through the normal export + INT8 path
(:func:`edgeagent.modeltools.build.build_encoder`).  The frozen-embedding head of
:mod:`edgeagent.modeltools.train` is then trained on the tuned encoder.

Only the training split is used here: the held-out split that later fits the temperature
and the out-of-scope cut-off is excluded, so calibration stays honest.
"""

from __future__ import annotations

import importlib
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any


def finetune_encoder(
    source_dir: Path,
    examples: list[tuple[str, str]],
    out_dir: Path,
    *,
    epochs: int = 3,
    batch_size: int = 32,
    lr: float = 5e-5,
    head_lr: float = 5e-3,
    scale: float = 20.0,
    max_length: int = 64,
    seed: int = 0,
    threads: int = 2,
    log: Any = print,
) -> Path:
    """Fine-tune the transformers model in ``source_dir`` on ``(text, label)`` examples
    and save it (weights + tokenizer + config) to ``out_dir``.  Returns ``out_dir``."""
    # Typed as Any on purpose: torch/transformers stubs differ between installs.
    torch: Any = importlib.import_module("torch")
    transformers: Any = importlib.import_module("transformers")
    AutoModel, AutoTokenizer = transformers.AutoModel, transformers.AutoTokenizer

    torch.manual_seed(seed)
    random.seed(seed)
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(str(source_dir))
    model = AutoModel.from_pretrained(str(source_dir))
    model.train()
    labels = sorted({lb for _, lb in examples})
    index = {lb: i for i, lb in enumerate(labels)}
    dim = int(model.config.hidden_size)
    classifier = torch.nn.Parameter(torch.randn(len(labels), dim) * 0.02)

    # Initialise the classifier at the class centroids of the untuned embeddings.
    with torch.no_grad():
        model.eval()
        sums = torch.zeros(len(labels), dim)
        for start in range(0, len(examples), 128):
            chunk = examples[start : start + 128]
            emb = _embed(model, tokenizer, [t for t, _ in chunk], max_length)
            for row, (_, lb) in zip(emb, chunk, strict=True):
                sums[index[lb]] += row
        classifier.copy_(torch.nn.functional.normalize(sums, dim=1))
        model.train()

    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total = steps_per_epoch * epochs
    optim = torch.optim.AdamW(
        [
            {"params": model.parameters(), "lr": lr, "weight_decay": 0.01},
            {"params": [classifier], "lr": head_lr, "weight_decay": 0.0},
        ]
    )
    sched = warmup_decay(optim, total)
    order = list(range(len(examples)))
    step = 0
    t0 = time.monotonic()
    for epoch in range(epochs):
        random.shuffle(order)
        running = 0.0
        for start in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[start : start + batch_size]]
            emb = _embed(model, tokenizer, [t for t, _ in batch], max_length)
            weights = torch.nn.functional.normalize(classifier, dim=1)
            logits = scale * emb @ weights.T
            target = torch.tensor([index[lb] for _, lb in batch])
            loss = torch.nn.functional.cross_entropy(logits, target)
            running += train_step(model, optim, sched, loss)
            step += 1
            if step % 50 == 0:
                log(f"    step {step}/{total}: loss {float(loss.detach()):.4f}")
        log(
            f"  epoch {epoch + 1}/{epochs}: loss {running / steps_per_epoch:.4f} "
            f"({time.monotonic() - t0:.0f} s)"
        )
    model.eval()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    for extra in ("README.md",):  # keeps the licence line for the manifest
        if (source_dir / extra).is_file():
            shutil.copyfile(source_dir / extra, out_dir / extra)
    return out_dir


def warmup_decay(optim: Any, total: int) -> Any:
    """Learning rate: linear warm-up over the first 10 % of ``total`` steps, then linear
    decay to 0."""
    torch: Any = importlib.import_module("torch")
    warmup = max(1, total // 10)
    return torch.optim.lr_scheduler.LambdaLR(
        optim,
        lambda step: min((step + 1) / warmup, max(0.0, (total - step) / (total - warmup + 1))),
    )


def train_step(model: Any, optim: Any, sched: Any, loss: Any) -> float:
    """One optimiser step on ``loss`` (gradients clipped to norm 1); returns the loss."""
    torch: Any = importlib.import_module("torch")
    optim.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optim.step()
    sched.step()
    return float(loss.detach())


def _embed(model: Any, tokenizer: Any, texts: list[str], max_length: int) -> Any:
    """Mean-pooled, L2-normalised embeddings (torch tensor, with grad if training)."""
    torch: Any = importlib.import_module("torch")

    enc = tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    out = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
    pooled = (out * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=1)
