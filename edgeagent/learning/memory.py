"""Instant memory: between refits, a near-duplicate of a learned input gets the cloud's label.

The learner adds the INT8 embedding of each input the cloud answered; the ``onnx``
classifier consults the memory after its head: when the nearest remembered input has
cosine >= ``min_cos`` to a job, the job gets that input's label with confidence = the
cosine (an out-of-scope label gives ``reason="out_of_scope"``).  Exact repeats are served
by the result cache before inference; this covers rewordings.  A refit that is promoted
starts a new runtime with an empty memory (the head has learned those examples).

Thread model: ``add`` runs on a learner worker thread, ``apply`` on inference threads; a
lock guards the arrays (copy-on-write: ``apply`` reads one consistent snapshot).
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import TYPE_CHECKING

from edgeagent.backends.base import Prediction

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    FloatArray = npt.NDArray[np.float32]


class InstantMemory:
    """Bounded kNN memory of learned inputs (the oldest go first)."""

    def __init__(self, min_cos: float, max_items: int, oos_label: str | None) -> None:
        self.min_cos = min_cos
        self.max_items = max_items
        self.oos_label = oos_label
        self._emb: FloatArray | None = None
        self._labels: list[str] = []
        self._lock = threading.Lock()
        self.hits = 0

    def __len__(self) -> int:
        return len(self._labels)

    def add(self, emb: FloatArray, labels: list[str]) -> None:
        """Remember unit-length embeddings with their cloud labels."""
        import numpy as np

        with self._lock:
            new = np.asarray(emb, dtype=np.float32)
            merged = new if self._emb is None else np.concatenate([self._emb, new])
            names = self._labels + list(labels)
            if len(names) > self.max_items:
                merged, names = merged[-self.max_items :], names[-self.max_items :]
            self._emb, self._labels = merged, names

    def apply(self, emb: FloatArray, preds: list[Prediction]) -> list[Prediction]:
        """``preds`` with each job that has a near-duplicate in memory answered from it."""
        import numpy as np

        with self._lock:
            mem, labels = self._emb, self._labels
        if mem is None or not labels:
            return preds
        sims = emb @ mem.T
        best = sims.argmax(axis=1)
        out = list(preds)
        for row, j in enumerate(best):
            cos = float(sims[row, j])
            if cos < self.min_cos:
                continue
            label = labels[int(j)]
            self.hits += 1
            reason = "out_of_scope" if label == self.oos_label else None
            details = {**preds[row].details, "memory": {"label": label, "cos": round(cos, 4)}}
            out[row] = replace(
                preds[row],
                output={"label": label},
                confidence=float(np.clip(cos, 0.0, 1.0)),
                reason=reason,
                details=details,
            )
        return out
