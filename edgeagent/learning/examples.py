"""Which cloud answers a task learns from, their train/holdout split, and storage bounds.

Pure functions over the rows of the store's ``examples`` table (every validated cloud
answer the agent did not mark unsure, see :mod:`edgeagent.escalation`).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

from edgeagent.learning.config import LearnConfig
from edgeagent.store import normalise_input

TRAIN = "train"
HOLDOUT = "holdout"


@dataclass(frozen=True, slots=True)
class Learned:
    """One learned classification example."""

    seq: int
    text: str
    label: str
    split: str  # TRAIN | HOLDOUT
    audit: bool
    created_at: float


def split_of(task: str, text: str, holdout: float) -> str:
    """Deterministic split: a hash of task and normalised input below ``holdout`` is held
    out.  Repeats of an input always land on the same side (no leak from train to holdout)
    and an example never changes side when others come and go."""
    digest = hashlib.sha256(f"{task}\x00{normalise_input(text)}".encode()).digest()
    return HOLDOUT if int.from_bytes(digest[:8], "big") / 2**64 < holdout else TRAIN


def is_unsure(confidence: Any, cfg: LearnConfig) -> bool:
    """The agent's own confidence is below ``min_cloud_confidence`` (no confidence: sure)."""
    return isinstance(confidence, (int, float)) and float(confidence) < cfg.min_cloud_confidence


def learnable(
    task: str,
    rows: list[tuple[int, Any, Any, str, float]],
    cfg: LearnConfig,
    labels: set[str] | None = None,
) -> tuple[list[Learned], list[int]]:
    """Apply sources and storage bounds to a task's stored examples (oldest first).

    Returns ``(kept examples, seqs to delete)``.  Only text inputs with a label (in
    ``labels`` when given) are kept.  Bounds, in order: a repeated input keeps only its
    newest answer; each label keeps its newest ``max_per_label``; then, while over
    ``max_examples``, the label with the most examples loses its oldest one.  Examples of a
    source not in ``cfg.sources`` are kept in the store but not returned.
    """
    newest: dict[str, tuple[int, Any, Any, str, float]] = {}
    drop: list[int] = []
    for row in rows:
        seq, inp, out, _reason, _t = row
        label = out.get("label") if isinstance(out, dict) else None
        if not isinstance(inp, str) or not isinstance(label, str):
            drop.append(seq)
            continue
        key = normalise_input(inp)
        if key in newest:
            drop.append(newest[key][0])
        newest[key] = row
    by_label: dict[str, list[tuple[int, Any, Any, str, float]]] = {}
    for row in sorted(newest.values()):
        by_label.setdefault(row[2]["label"], []).append(row)
    for lb, items in by_label.items():
        if len(items) > cfg.max_per_label:
            cut = len(items) - cfg.max_per_label
            drop.extend(r[0] for r in items[:cut])
            by_label[lb] = items[cut:]
    total = sum(len(v) for v in by_label.values())
    while total > cfg.max_examples:
        lb = max(by_label, key=lambda k: (len(by_label[k]), k))
        drop.append(by_label[lb].pop(0)[0])
        total -= 1
    kept: list[Learned] = []
    for items in by_label.values():
        for seq, inp, out, reason, t in items:
            audit = reason == "audit"
            if ("audits" if audit else "escalations") not in cfg.sources:
                continue
            if labels is not None and out["label"] not in labels:
                continue
            kept.append(Learned(seq, inp, out["label"], split_of(task, inp, cfg.holdout), audit, t))
    kept.sort(key=lambda e: e.seq)
    return kept, sorted(drop)


def per_label(examples: list[Learned]) -> dict[str, dict[str, int]]:
    """``{label: {"train": n, "holdout": m}}`` for ``edgeagent learn status``."""
    out: dict[str, Counter[str]] = {}
    for e in examples:
        out.setdefault(e.label, Counter())[e.split] += 1
    return {lb: {TRAIN: c[TRAIN], HOLDOUT: c[HOLDOUT]} for lb, c in sorted(out.items())}
