"""What a classifier bundle carries so the device can refit its head: ``refit.npz``.

``emb`` (n, dim) float16 – the INT8 encoder's embeddings of the training examples;
``label`` (n,) int32 – index into ``labels`` (unicode array, no pickle);
``held_out`` (n,) bool – the stratified held-out split ``edgeagent train`` used (seeded).

About 0.8 KB per example at 384 dimensions (CLINC150's 15,100 examples: 11.6 MB).
Bundles built before this file existed load and serve as before; learning then uses only
the learned examples (and says so).  numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    FloatArray = npt.NDArray[np.float32]

REFIT_FILE = "refit.npz"


@dataclass(frozen=True)
class RefitData:
    """The bundle's training set: float32 embeddings, string labels, held-out mask."""

    emb: FloatArray
    labels: list[str]
    held_out: npt.NDArray[np.bool_]

    def __len__(self) -> int:
        return len(self.labels)


def save_refit_data(bundle: Path, emb: FloatArray, labels: list[str], held_out: list[int]) -> str:
    """Write ``refit.npz`` into ``bundle``; returns the file name (for the manifest)."""
    import numpy as np

    label_set = sorted(set(labels))
    index = {lb: i for i, lb in enumerate(label_set)}
    mask = np.zeros(len(labels), dtype=bool)
    mask[held_out] = True
    np.savez(
        bundle / REFIT_FILE,
        emb=np.asarray(emb, dtype=np.float16),
        label=np.array([index[lb] for lb in labels], dtype=np.int32),
        labels=np.array(label_set, dtype=np.str_),
        held_out=mask,
    )
    return REFIT_FILE


def load_refit_data(bundle: Path) -> RefitData | None:
    """The bundle's ``refit.npz``, or None when it has none (an older bundle).  Raises
    ``ValueError`` when the file is there but inconsistent."""
    import numpy as np

    path = bundle / REFIT_FILE
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as npz:
        emb = np.asarray(npz["emb"], dtype=np.float32)
        idx = np.asarray(npz["label"], dtype=np.int64)
        names = [str(x) for x in npz["labels"]]
        held = np.asarray(npz["held_out"], dtype=bool)
    if emb.ndim != 2 or len(idx) != len(emb) or len(held) != len(emb):
        raise ValueError(f"{path}: arrays of different lengths")
    if len(idx) and (idx.min() < 0 or idx.max() >= len(names)):
        raise ValueError(f"{path}: label index out of range")
    return RefitData(emb, [names[i] for i in idx], held)
