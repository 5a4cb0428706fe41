"""Few-shot examples for a GGUF task, chosen per job from the nearest learned cloud answers.

A small GGUF model extracts better when its prompt shows answers to inputs like the job
(a log line of the same shape, the same unit).  :class:`NearestAnswers` keeps the task's
validated cloud answers with their INT8 sentence embeddings (the same MiniLM encoder the
``onnx`` classifiers use, a separate bundle named by ``learn.few_shot_encoder``) and, for
each job, returns the ``k`` nearest with cosine >= ``min_cos``, least similar first (the
nearest sits right before the job).  The ``llamacpp`` backend adds them after its fixed
instruction and examples, so the KV cache still holds that common prefix.

Thread model: ``add`` runs on a learner worker thread, ``select`` on the inference thread;
a lock guards the arrays (``select`` reads one consistent snapshot).  The encoder session
is thread-safe (onnxruntime).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    FloatArray = npt.NDArray[np.float32]


class NearestAnswers:
    """Bounded store of (input, cloud output) pairs; the oldest go first."""

    def __init__(self, encoder: Any, k: int, min_cos: float, max_items: int) -> None:
        self.encoder = encoder
        self.k = k
        self.min_cos = min_cos
        self.max_items = max_items
        self._emb: FloatArray | None = None
        self._items: list[tuple[str, Any]] = []
        self._lock = threading.Lock()

    @classmethod
    def from_bundle(
        cls, bundle: Path, k: int, min_cos: float, max_items: int, max_length: int = 128
    ) -> NearestAnswers:
        """With the encoder of an ``edgeagent models build`` bundle (or a classifier bundle)."""
        from edgeagent.backends.onnx import OnnxEncoder
        from edgeagent.bundle import read_manifest

        manifest = read_manifest(bundle, verify=True)
        tok = manifest.get("tokenizer", {})
        encoder = OnnxEncoder(
            bundle / "model.onnx",
            bundle / tok.get("file", "tokenizer.json"),
            max_length=max_length,
            intra_op_threads=1,
            pad_token=tok.get("pad_token", "[PAD]"),
        )
        return cls(encoder, k, min_cos, max_items)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, items: list[tuple[str, Any]]) -> None:
        """Remember cloud answers (embeds the inputs: call it off the event loop).  A
        repeated input keeps only its newest answer."""
        import numpy as np

        if not items:
            return
        new = self.encoder.embed_many([t for t, _ in items])
        with self._lock:
            emb = new if self._emb is None else np.concatenate([self._emb, new])
            names = self._items + list(items)
            last = {t: i for i, (t, _) in enumerate(names)}
            keep = [i for i, (t, _) in enumerate(names) if last[t] == i][-self.max_items :]
            self._emb, self._items = emb[keep], [names[i] for i in keep]

    def select(self, text: str) -> list[tuple[str, Any]]:
        """The ``k`` remembered answers nearest to ``text`` (cosine >= ``min_cos``, not
        ``text`` itself), least similar first."""
        import numpy as np

        with self._lock:
            mem, items = self._emb, self._items
        if mem is None or not items or self.k <= 0:
            return []
        sims = mem @ self.encoder.embed([text])[0]
        order = np.argsort(-sims)
        out: list[tuple[str, Any]] = []
        for j in order:
            if sims[j] < self.min_cos or len(out) == self.k:
                break
            if items[int(j)][0] != text:
                out.append(items[int(j)])
        return out[::-1]
