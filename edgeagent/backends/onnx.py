"""The ``onnx`` backend: an INT8 ONNX sentence encoder plus a small numpy classification head.

Runtime dependencies are onnxruntime, tokenizers and numpy only, imported inside
:meth:`OnnxEncoder.__init__` / the head functions, never at module import and never torch
or transformers.  A bundle (see :mod:`edgeagent.bundle`) holds ``model.onnx``
(outputs ``last_hidden_state``), ``tokenizer.json``, ``head.npz`` (weights, bias, class
centroids), ``labels.json`` and ``calibration.json`` (temperature, out-of-scope cut-offs,
threshold).  Answers: the arg-max label, its temperature-scaled probability as confidence,
``reason="out_of_scope"`` when the out-of-scope class wins or the bundle's out-of-scope score
(see :class:`Head`) is above its calibrated cut-off, ``reason="low_confidence"`` below the
calibrated threshold.

Thread model: ``infer_batch`` may run on several worker threads at once; onnxruntime's
``InferenceSession.run`` and the tokenizer are thread-safe and the head is read-only, so
only load/close take the lock.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from edgeagent.backends.base import (
    OOS_MARGIN,
    Backend,
    BackendConfig,
    BackendError,
    BackendType,
    JSONValue,
    Prediction,
)
from edgeagent.bundle import BundleError, read_manifest
from edgeagent.lifecycle import release_free_memory

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from edgeagent.config import TaskConfig
    from edgeagent.learning.memory import InstantMemory

    FloatArray = npt.NDArray[np.float32]

TOP_K = 3
OOS_REASON = "out_of_scope"
LOW_CONFIDENCE = "low_confidence"
WARMUP_TEXT = "warm-up: what is the balance of my account?"
#: Out-of-scope score components a head can compute (each: higher = further out of scope).
OOS_COMPONENTS = ("centroid", "msp", "energy", "mahalanobis", "knn", "oos_class")


def cpu_session(model_path: Path, intra_op_threads: int = 1, inter_op_threads: int = 1) -> Any:
    """An onnxruntime CPU session (sequential execution, every graph optimisation): the
    one place the onnx backends create sessions."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = inter_op_threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(
        str(model_path), sess_options=opts, providers=["CPUExecutionProvider"]
    )


def bundle_manifest(task_name: str, bundle: Path, kind: str, *, verify: bool) -> dict[str, Any]:
    """A bundle's checked manifest, or :class:`BackendError` naming the task and bundle."""
    try:
        return read_manifest(bundle, kind=kind, verify=verify)
    except BundleError as exc:
        raise BackendError(f"task {task_name!r}, bundle {bundle}: {exc}") from None


def bundle_fingerprint(manifest: dict[str, Any], *settings: str) -> str:
    """The bundle's file fingerprint combined with the settings that change answers."""
    return hashlib.sha256("|".join([manifest["fingerprint"], *settings]).encode()).hexdigest()


@contextmanager
def loading_model(where: str) -> Iterator[None]:
    """Turn what onnxruntime, tokenizers or a bad bundle file raise at load into a
    :class:`BackendError` naming ``where``."""
    try:
        yield
    except BackendError:
        raise
    except ImportError as exc:
        raise BackendError(
            f"{where}: the onnx runtime is not installed (pip install 'edgeagent[onnx]'): {exc}"
        ) from None
    except Exception as exc:  # onnxruntime/tokenizers raise their own types
        raise BackendError(f"{where}: cannot load model: {exc}") from None


class OnnxEncoder:
    """Tokenizer + ONNX transformer + masked mean pooling + L2 normalisation.

    ``embed`` pads each batch to its longest member (not to ``max_length``) and
    truncates at ``max_length`` tokens.  Shared by the runtime backend and the model tools.
    """

    def __init__(
        self,
        model_path: Path,
        tokenizer_path: Path,
        *,
        max_length: int = 128,
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        pad_token: str = "[PAD]",
    ) -> None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"{tokenizer_path}: pad token {pad_token!r} not in the vocabulary")
        # tokenizer.json may carry fixed-length padding (MiniLM ships Fixed(128)): override
        # both so a batch is padded to its longest input and cut at max_length.
        tokenizer.no_padding()
        tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token, length=None)
        tokenizer.enable_truncation(max_length=max_length)
        self.tokenizer = tokenizer
        self.max_length = max_length

        self.session = cpu_session(model_path, intra_op_threads, inter_op_threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        missing = {"input_ids", "attention_mask"} - set(self.input_names)
        if missing:
            raise ValueError(f"{model_path}: model lacks inputs {sorted(missing)}")
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = "last_hidden_state" if "last_hidden_state" in outputs else outputs[0]

    def embed(self, texts: list[str]) -> FloatArray:
        """Unit-length mean-pooled embeddings, shape ``(len(texts), dim)``, float32."""
        import numpy as np

        encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.array([e.type_ids for e in encodings], dtype=np.int64)
        (hidden,) = self.session.run([self.output_name], feeds)
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        out: FloatArray = (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)
        return out

    def embed_many(self, texts: list[str], batch_size: int = 64) -> FloatArray:
        """``embed`` over many texts, batched by similar length to keep padding small."""
        import numpy as np

        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            out[idx] = self.embed([texts[i] for i in idx])
        return out

    @property
    def dim(self) -> int:
        shape = self.session.get_outputs()[0].shape
        return int(shape[-1]) if isinstance(shape[-1], int) else int(self.embed(["x"]).shape[1])


class Head:
    """Classification head loaded from a bundle: a linear softmax layer, optionally blended
    with a k-nearest-neighbour vote over the training embeddings, then temperature scaling;
    plus the class centroids for the out-of-scope distance signal.

    ``head.npz``: ``weight`` (dim, k), ``bias`` (k,), ``centroids`` (in-scope k, dim) and,
    when ``blend`` < 1 or the out-of-scope score uses ``knn``, ``knn_emb`` (n, dim, float16)
    and ``knn_label`` (n,); when it uses ``mahalanobis``, ``maha_mean`` (in-scope k, dim)
    and ``maha_prec`` (dim, dim: the shrunk tied-covariance inverse).
    ``calibration.json``: ``temperature``, ``blend``, ``knn_k``, ``knn_temp``,
    ``knn_classes`` (the kNN vote only among the examples of the linear head's
    ``knn_classes`` best classes; 0 or absent: among all),
    ``oos_label``, ``threshold`` and the out-of-scope score: ``oos_score`` (components from
    :data:`OOS_COMPONENTS` joined by ``+``: their mean, or by ``|``: their maximum),
    ``oos_norm`` (per component ``[centre, scale]``, applied as ``(component - centre) /
    scale`` before combining), ``oos_cut`` (flag above it), ``oos_decline_cut`` (a higher cut
    on the same score: above it the input is *confidently* out of scope, reported as
    ``details["oos_margin"]`` for a task whose ``out_of_scope = "decline"``; absent when the
    head had no out-of-scope examples),
    ``oos_signal`` (the head was trained with out-of-scope examples, so the cut-off applies
    by default), ``oos_knn_k``.  Bundles written before these fields existed carry
    ``centroid_cos_min`` instead: read as ``oos_score = "centroid"``, ``oos_cut =
    -centroid_cos_min``, ``oos_signal`` = the bundle has an out-of-scope class.
    """

    def __init__(
        self, arrays: dict[str, Any], labels: list[str], calibration: dict[str, Any]
    ) -> None:
        import numpy as np

        self.weight: FloatArray = np.asarray(arrays["weight"], dtype=np.float32)
        self.bias: FloatArray = np.asarray(arrays["bias"], dtype=np.float32)
        self.centroids: FloatArray = np.asarray(arrays["centroids"], dtype=np.float32)
        knn_emb = arrays.get("knn_emb")
        knn_label = arrays.get("knn_label")
        knn_emb = None if knn_emb is None else np.asarray(knn_emb, dtype=np.float32)
        knn_label = None if knn_label is None else np.asarray(knn_label, dtype=np.int64)
        self.labels = list(labels)
        cal = calibration
        self.temperature = float(cal.get("temperature", 1.0))
        self.blend = float(cal.get("blend", 1.0))
        self.knn_k = int(cal.get("knn_k", 10))
        self.knn_temp = float(cal.get("knn_temp", 0.05))
        self.knn_classes = int(cal.get("knn_classes", 0))
        self.oos_label: str | None = cal.get("oos_label")
        self.centroid_cos_min: float | None = cal.get("centroid_cos_min")
        self.threshold: float | None = cal.get("threshold")
        self.oos_score: str = str(cal.get("oos_score") or "centroid")
        self.oos_norm: dict[str, list[float]] = dict(cal.get("oos_norm") or {})
        self.oos_cut: float | None = cal.get("oos_cut")
        self.oos_decline_cut: float | None = cal.get("oos_decline_cut")
        self.oos_signal = bool(cal.get("oos_signal", self.oos_label is not None))
        self.oos_knn_k = int(cal.get("oos_knn_k", 5))
        if "oos_score" not in cal and self.centroid_cos_min is not None:
            self.oos_cut = -float(self.centroid_cos_min)  # bundle from before oos_score
        known = {
            "temperature",
            "blend",
            "knn_k",
            "knn_temp",
            "knn_classes",
            "oos_label",
            "centroid_cos_min",
            "oos_score",
            "oos_norm",
            "oos_cut",
            "oos_decline_cut",
            "oos_signal",
            "oos_knn_k",
        }
        self.extra = {k: v for k, v in cal.items() if k not in known | {"threshold"}}
        # Training examples sorted by class (the order does not matter to any score), so
        # class c's are the view knn_emb[b[c]:b[c + 1]] with b = _knn_bounds.
        self._knn_bounds = np.zeros(len(self.labels) + 1, dtype=np.int64)
        if knn_emb is not None and knn_label is not None:
            order = np.argsort(knn_label, kind="stable")
            knn_emb, knn_label = knn_emb[order], knn_label[order]
            self._knn_bounds = np.searchsorted(knn_label, np.arange(len(self.labels) + 1))
        self.knn_emb: FloatArray | None = knn_emb
        self.knn_label: npt.NDArray[np.int64] | None = knn_label
        maha_mean, maha_prec = arrays.get("maha_mean"), arrays.get("maha_prec")
        self.maha_mean: FloatArray | None = (
            None if maha_mean is None else np.asarray(maha_mean, dtype=np.float32)
        )
        self.maha_prec: FloatArray | None = (
            None if maha_prec is None else np.asarray(maha_prec, dtype=np.float32)
        )
        # Precomputed so a distance costs one (dim x dim) and one (dim x k) product; the
        # head stays read-only after construction (worker threads share it).
        self._maha_proj: FloatArray | None = None
        self._maha_const: FloatArray | None = None
        if self.maha_mean is not None and self.maha_prec is not None:
            self._maha_proj = (self.maha_mean @ self.maha_prec).astype(np.float32)
            self._maha_const = (self._maha_proj * self.maha_mean).sum(axis=1)
        k = len(self.labels)
        if self.weight.ndim != 2 or self.weight.shape[1] != k or self.bias.shape != (k,):
            raise ValueError(
                f"head.npz: weight {self.weight.shape} / bias {self.bias.shape} do not match "
                f"{k} labels"
            )
        if self.temperature <= 0:
            raise ValueError("calibration.json: temperature must be > 0")
        if not 0.0 <= self.blend <= 1.0:
            raise ValueError("calibration.json: blend must be in [0, 1]")
        if self.blend < 1.0 and (knn_emb is None or knn_label is None):
            raise ValueError("head.npz: blend < 1 needs knn_emb and knn_label")
        if knn_emb is not None and knn_emb.shape[1] != self.weight.shape[0]:
            raise ValueError("head.npz: knn_emb dimension does not match the weights")
        in_scope = [lb for lb in self.labels if lb != self.oos_label]
        if self.centroids.shape != (len(in_scope), self.weight.shape[0]):
            raise ValueError(f"head.npz: centroids {self.centroids.shape} do not match labels")
        self.in_scope_idx = np.array(
            [i for i, lb in enumerate(self.labels) if lb != self.oos_label], dtype=np.int64
        )
        if self.oos_cut is not None or self.oos_decline_cut is not None:
            self.check_oos_score(self.oos_score)

    def oos_components(self) -> list[str]:
        """The components of :attr:`oos_score`, in order."""
        return split_oos_score(self.oos_score)[1]

    def check_oos_score(self, score: str) -> None:
        """``ValueError`` unless this head has what computing ``score`` needs."""
        for comp in split_oos_score(score)[1]:
            if comp not in OOS_COMPONENTS:
                raise ValueError(f"calibration.json: unknown oos_score component {comp!r}")
            if comp == "mahalanobis" and (self.maha_mean is None or self.maha_prec is None):
                raise ValueError("head.npz: oos_score 'mahalanobis' needs maha_mean, maha_prec")
            if comp == "knn" and (self.knn_emb is None or self.knn_label is None):
                raise ValueError("head.npz: oos_score 'knn' needs knn_emb and knn_label")
            if comp == "oos_class" and self.oos_label not in self.labels:
                raise ValueError("calibration.json: oos_score 'oos_class' needs an oos_label")

    @classmethod
    def from_bundle(cls, bundle: Path) -> Head:
        """Read ``head.npz``, ``labels.json`` and ``calibration.json``."""
        import numpy as np

        with np.load(bundle / "head.npz") as npz:
            arrays = {name: npz[name] for name in npz.files}
        labels = json.loads((bundle / "labels.json").read_text("utf-8"))
        calibration = json.loads((bundle / "calibration.json").read_text("utf-8"))
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ValueError("labels.json: expected a list of strings")
        if not isinstance(calibration, dict):
            raise ValueError("calibration.json: expected an object")
        return cls(arrays, labels, calibration)

    def save(self, bundle: Path) -> list[str]:
        """Write ``head.npz``, ``labels.json``, ``calibration.json``; returns their names."""
        import numpy as np

        arrays: dict[str, Any] = {
            "weight": self.weight,
            "bias": self.bias,
            "centroids": self.centroids,
        }
        scored = self.oos_cut is not None or self.oos_decline_cut is not None
        uses = set(self.oos_components()) if scored else set()
        wants_knn = self.blend < 1.0 or "knn" in uses
        if wants_knn and self.knn_emb is not None and self.knn_label is not None:
            arrays["knn_emb"] = self.knn_emb.astype(np.float16)
            arrays["knn_label"] = self.knn_label.astype(np.int32)
        if "mahalanobis" in uses and self.maha_mean is not None and self.maha_prec is not None:
            arrays["maha_mean"] = self.maha_mean
            arrays["maha_prec"] = self.maha_prec
        np.savez(bundle / "head.npz", **arrays)
        (bundle / "labels.json").write_text(
            json.dumps(self.labels, ensure_ascii=False) + "\n", "utf-8"
        )
        (bundle / "calibration.json").write_text(
            json.dumps(self.calibration, indent=2, sort_keys=True) + "\n", "utf-8"
        )
        return ["head.npz", "labels.json", "calibration.json"]

    @property
    def calibration(self) -> dict[str, Any]:
        return {
            **self.extra,
            "temperature": self.temperature,
            "blend": self.blend,
            "knn_k": self.knn_k,
            "knn_temp": self.knn_temp,
            "knn_classes": self.knn_classes,
            "oos_label": self.oos_label,
            "centroid_cos_min": self.centroid_cos_min,
            "threshold": self.threshold,
            "oos_score": self.oos_score,
            "oos_norm": self.oos_norm,
            "oos_cut": self.oos_cut,
            "oos_decline_cut": self.oos_decline_cut,
            "oos_signal": self.oos_signal,
            "oos_knn_k": self.oos_knn_k,
        }

    @property
    def dim(self) -> int:
        return int(self.weight.shape[0])

    def log_scores(self, emb: FloatArray) -> FloatArray:
        """Uncalibrated log-probabilities ``log(blend * p_linear + (1 - blend) * p_knn)``."""
        import numpy as np

        p = softmax(emb @ self.weight + self.bias)
        if self.blend < 1.0 and self.knn_emb is not None and self.knn_label is not None:
            m = self.knn_classes
            classes = None
            if 0 < m < len(self.labels):
                # Vote among the examples of the linear head's m best classes only (of any
                # input of the batch): one job compares with ~m * examples-per-class
                # embeddings instead of all of them; the others' vote share is ~0 anyway.
                top = np.unique(np.argpartition(-p, m - 1, axis=1)[:, :m])
                classes = top if len(top) < len(self.labels) else None
            p_knn = knn_probabilities(
                emb,
                self.knn_emb,
                self.knn_label,
                len(self.labels),
                self.knn_k,
                self.knn_temp,
                None
                if classes is None
                else [(int(self._knn_bounds[c]), int(self._knn_bounds[c + 1])) for c in classes],
            )
            p = self.blend * p + (1.0 - self.blend) * p_knn
        out: FloatArray = np.log(np.clip(p, 1e-12, None)).astype(np.float32)
        return out

    def probabilities(self, emb: FloatArray, temperature: float | None = None) -> FloatArray:
        """Calibrated probabilities over all labels, shape ``(n, k)``."""
        t = self.temperature if temperature is None else temperature
        return softmax(self.log_scores(emb) / t)

    def centroid_cos(self, emb: FloatArray) -> FloatArray:
        """Cosine to the nearest in-scope class centroid, shape ``(n,)``."""
        result: FloatArray = (emb @ self.centroids.T).max(axis=1)
        return result

    def mahalanobis(self, emb: FloatArray) -> FloatArray:
        """Squared Mahalanobis distance to the nearest in-scope class mean under the shared
        (tied, shrunk) covariance, shape ``(n,)``: ``min_k (x - m_k)' P (x - m_k)``."""
        import numpy as np

        if self.maha_prec is None or self._maha_proj is None or self._maha_const is None:
            raise ValueError("this head has no Mahalanobis statistics")
        quad = ((emb @ self.maha_prec) * emb).sum(axis=1)
        dist = quad[:, None] - 2.0 * (emb @ self._maha_proj.T) + self._maha_const[None, :]
        out: FloatArray = dist.min(axis=1).astype(np.float32)
        return out

    def knn_cos(self, emb: FloatArray, probs: FloatArray | None = None) -> FloatArray:
        """Cosine to the ``oos_knn_k``-th nearest in-scope training example, shape ``(n,)``.
        With ``probs`` and ``knn_classes`` > 0: among the examples of each input's own
        ``knn_classes`` most probable in-scope classes only (a few hundred comparisons per
        job instead of every example; per input, so the value never depends on the batch)."""
        import numpy as np

        if self.knn_emb is None or self.knn_label is None:
            raise ValueError("this head has no training embeddings")
        m = self.knn_classes
        n_in = len(self.in_scope_idx)
        if probs is not None and 0 < m < n_in:
            bounds = self._knn_bounds
            top = np.argpartition(-probs[:, self.in_scope_idx], m - 1, axis=1)[:, :m]
            out = np.empty(emb.shape[0], dtype=np.float32)
            for row in range(emb.shape[0]):
                spans = [(bounds[c], bounds[c + 1]) for c in self.in_scope_idx[top[row]]]
                sims = np.concatenate([self.knn_emb[a:b] @ emb[row] for a, b in spans])
                k = min(self.oos_knn_k, len(sims))
                out[row] = -np.partition(-sims, k - 1)[k - 1] if k else -1.0
            return out
        if self.oos_label in self.labels:
            keep = self.knn_label != self.labels.index(str(self.oos_label))
            ref = self.knn_emb[keep]
        else:
            ref = self.knn_emb
        k = min(self.oos_knn_k, ref.shape[0])
        sims = emb @ ref.T
        full: FloatArray = (-np.partition(-sims, k - 1, axis=1)[:, k - 1]).astype(np.float32)
        return full

    def component(self, name: str, emb: FloatArray, probs: FloatArray) -> FloatArray:
        """One raw out-of-scope score component (higher = further out of scope), ``(n,)``.
        ``probs`` are this head's calibrated probabilities for ``emb``."""
        import numpy as np

        out: FloatArray
        if name == "centroid":
            out = -self.centroid_cos(emb)
        elif name == "msp":
            out = -probs[:, self.in_scope_idx].max(axis=1)
        elif name == "energy":
            z = (emb @ self.weight + self.bias)[:, self.in_scope_idx] / self.temperature
            top = z.max(axis=1)
            lse = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
            out = (-lse * self.temperature).astype(np.float32)
        elif name == "mahalanobis":
            out = self.mahalanobis(emb)
        elif name == "knn":
            out = -self.knn_cos(emb, probs)
        elif name == "oos_class":
            # The linear head's log-odds of the out-of-scope class, not its probability: the
            # probability is ~0 for every in-scope input (no spread to normalise by), and
            # so would swamp any component it is combined with.
            z = (emb @ self.weight + self.bias) / self.temperature
            oos = self.labels.index(str(self.oos_label))
            rest = z[:, self.in_scope_idx]
            top = rest.max(axis=1)
            out = z[:, oos] - (top + np.log(np.exp(rest - top[:, None]).sum(axis=1)))
        else:
            raise ValueError(f"unknown out-of-scope score component {name!r}")
        return out.astype(np.float32)

    def oos_values(
        self, emb: FloatArray, probs: FloatArray, score: str | None = None
    ) -> FloatArray:
        """The out-of-scope score ``score`` (default: the head's own), shape ``(n,)``: the
        mean (``a+b``) or the maximum (``a|b``) of its components, each normalised by
        :attr:`oos_norm` (raw when absent)."""
        import numpy as np

        how, comps = split_oos_score(score or self.oos_score)
        parts = []
        for comp in comps:
            centre, scale = self.oos_norm.get(comp, (0.0, 1.0))
            parts.append((self.component(comp, emb, probs) - centre) / scale)
        stacked = np.stack(parts)
        combined = stacked.max(axis=0) if how == "max" else stacked.mean(axis=0)
        out: FloatArray = combined.astype(np.float32)
        return out


def split_oos_score(score: str) -> tuple[str, list[str]]:
    """``"a+b"`` -> ``("mean", ["a", "b"])``; ``"a|b"`` -> ``("max", ["a", "b"])`` (one kind
    of combination per score)."""
    if "|" in score:
        return "max", [c for c in score.split("|") if c]
    return "mean", [c for c in score.split("+") if c]


def knn_probabilities(
    emb: FloatArray,
    ref: FloatArray,
    ref_label: npt.NDArray[np.int64],
    n_classes: int,
    k: int,
    temp: float,
    spans: list[tuple[int, int]] | None = None,
) -> FloatArray:
    """Similarity-weighted vote of the ``k`` nearest reference embeddings (cosine; weights
    ``exp((cos - 1) / temp)``), normalised to a distribution over ``n_classes``.
    ``spans``: compare only with these row ranges ``[start, end)`` of ``ref`` (views, no
    copy of the references)."""
    import numpy as np

    if spans is not None:
        sims = np.concatenate([emb @ ref[a:b].T for a, b in spans], axis=1)
        ref_label = np.concatenate([ref_label[a:b] for a, b in spans])
    else:
        sims = emb @ ref.T
    k = min(k, sims.shape[1])
    idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    weights = np.exp((np.take_along_axis(sims, idx, axis=1) - 1.0) / temp)
    probs = np.full((emb.shape[0], n_classes), 1e-6, dtype=np.float64)
    rows = np.repeat(np.arange(emb.shape[0]), k)
    np.add.at(probs, (rows, ref_label[idx].ravel()), weights.ravel())
    out: FloatArray = (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)
    return out


def softmax(logits: FloatArray) -> FloatArray:
    import numpy as np

    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    out: FloatArray = (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
    return out


def predict(
    head: Head,
    emb: FloatArray,
    *,
    oos_distance: bool | None = None,
    use_threshold: bool = True,
) -> list[Prediction]:
    """Turn embeddings into :class:`Prediction` objects (pure numpy; used by the backend,
    ``edgeagent calibrate`` and the benchmark, so all three see the same decisions).

    ``oos_distance``: apply the head's out-of-scope score cut-off (``True``), never
    (``False``), or only when the head was trained with an out-of-scope signal (``None``,
    the default: a task given no out-of-scope examples is never flagged by distance).  An
    input whose arg-max is the out-of-scope class is flagged in every case.  A flagged
    input's ``details["oos_margin"]`` (:data:`edgeagent.backends.base.OOS_MARGIN`) is its score
    minus the head's decline cut-off, when the head has one (> 0: confidently out of
    scope; the router declines it for a task with ``out_of_scope = "decline"``)."""
    import numpy as np

    probs = head.probabilities(emb)
    cos = head.centroid_cos(emb)
    apply_cut = head.oos_signal if oos_distance is None else oos_distance
    cut = head.oos_cut if apply_cut else None
    decline = head.oos_decline_cut if apply_cut else None
    score = head.oos_values(emb, probs) if cut is not None or decline is not None else None
    top = np.argsort(-probs, axis=1)[:, :TOP_K]
    oos_idx = head.labels.index(head.oos_label) if head.oos_label in head.labels else None
    out: list[Prediction] = []
    for row in range(emb.shape[0]):
        best = int(top[row, 0])
        label = head.labels[best]
        conf = float(np.clip(probs[row, best], 0.0, 1.0))
        details: dict[str, JSONValue] = {
            "top": [
                {"label": head.labels[int(j)], "p": round(float(probs[row, j]), 4)}
                for j in top[row]
            ],
            "centroid_cos": round(float(cos[row]), 4),
        }
        if oos_idx is not None:
            details["oos_p"] = round(float(probs[row, oos_idx]), 4)
        if score is not None:
            details["oos_score"] = round(float(score[row]), 4)
        reason: str | None = None
        if best == oos_idx or (cut is not None and score is not None and score[row] > cut):
            reason = OOS_REASON
            if score is not None and decline is not None:
                details[OOS_MARGIN] = round(float(score[row]) - decline, 4)
        elif use_threshold and head.threshold is not None and conf < head.threshold:
            reason = LOW_CONFIDENCE
        out.append(
            Prediction(output={"label": label}, confidence=conf, reason=reason, details=details)
        )
    return out


class OnnxBackend:
    """Classification backend over a classifier bundle (see module docstring)."""

    def __init__(self, task_name: str, task: TaskConfig) -> None:
        if not isinstance(task.backend, OnnxBackendConfig):
            raise BackendError(f"task {task_name!r}: backend is not of type 'onnx'")
        if task.kind != "classify":
            raise BackendError(
                f"task {task_name!r}: the onnx classifier does kind='classify' "
                "(extract tasks use a tagger bundle; generate is not supported)"
            )
        self.task_name = task_name
        self.task = task
        self.config: OnnxBackendConfig = task.backend
        self._lock = threading.Lock()
        self._encoder: OnnxEncoder | None = None
        self._head: Head | None = None
        self._manifest: dict[str, Any] | None = None
        self.memory: InstantMemory | None = None
        """Set by the daemon's learner when the task learns (edgeagent.learning.memory)."""

    # -- identity ---------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        name = self._manifest.get("name", "onnx") if self._manifest else "onnx"
        return f"{name}@{self.fingerprint[:6]}"

    @property
    def fingerprint(self) -> str:
        """Bundle fingerprint (all file hashes) combined with the settings that change
        answers (max_length, OOS distance, bundle threshold)."""
        manifest = self._manifest or bundle_manifest(  # before load(): unverified claim
            self.task_name, self.config.bundle, "classifier", verify=False
        )
        return bundle_fingerprint(
            manifest,
            f"max_length={self.config.max_length}",
            f"oos_distance={self.config.oos_distance}",
            f"use_bundle_threshold={self.config.use_bundle_threshold}",
        )

    @property
    def labels(self) -> list[str]:
        """Labels the model can answer (including the out-of-scope label, if trained)."""
        if self._head is None:
            raise BackendError(f"task {self.task_name!r}: labels asked before load()")
        return list(self._head.labels)

    @property
    def oos_label(self) -> str | None:
        """The model's out-of-scope label, if it was trained with one."""
        return self._head.oos_label if self._head is not None else None

    # -- lifecycle --------------------------------------------------------------------

    def load(self) -> None:
        bundle = self.config.bundle
        where = f"task {self.task_name!r}, bundle {bundle}"
        with self._lock:
            manifest = bundle_manifest(
                self.task_name, bundle, "classifier", verify=self.config.verify_sha256
            )
            with loading_model(where):
                tok = manifest.get("tokenizer", {})
                encoder = OnnxEncoder(
                    bundle / "model.onnx",
                    bundle / tok.get("file", "tokenizer.json"),
                    max_length=self.config.max_length,
                    intra_op_threads=self.config.intra_op_threads,
                    inter_op_threads=self.config.inter_op_threads,
                    pad_token=tok.get("pad_token", "[PAD]"),
                )
                head = Head.from_bundle(bundle)
            if head.dim != encoder.dim:
                raise BackendError(
                    f"{where}: head expects {head.dim}-d embeddings, encoder gives {encoder.dim}"
                )
            unknown = sorted(set(self.task.labels) - set(head.labels))
            if unknown and not self.task.learn.enabled:  # a learning task learns them
                raise BackendError(
                    f"{where}: task labels {unknown} are not labels of the model "
                    f"(it knows {len(head.labels)}: see {bundle / 'labels.json'})"
                )
            self._manifest, self._encoder, self._head = manifest, encoder, head
        self.warmup()
        release_free_memory()  # the loader's temporaries (file buffers, conversions)

    def warmup(self) -> None:
        self.infer_batch([WARMUP_TEXT])

    def infer_batch(self, inputs: list[JSONValue]) -> list[Prediction]:
        encoder, head = self._encoder, self._head
        if encoder is None or head is None:
            raise BackendError(f"task {self.task_name!r}: infer_batch before load()")
        if not inputs:
            return []
        texts = [x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in inputs]
        emb = encoder.embed(texts)
        preds = predict(
            head,
            emb,
            oos_distance=self.config.oos_distance,
            use_threshold=self.config.use_bundle_threshold,
        )
        memory = self.memory
        return preds if memory is None else memory.apply(emb, preds)

    def embed(self, texts: list[str]) -> FloatArray:
        """The encoder's unit-length embeddings (worker thread; for the learner)."""
        encoder = self._encoder
        if encoder is None:
            raise BackendError(f"task {self.task_name!r}: embed before load()")
        return encoder.embed_many(texts)

    def close(self) -> None:
        with self._lock:
            self._encoder = None
            self._head = None


# -- config and registration (edgeagent.backends) -------------------------------------------


class OnnxBackendConfig(BackendConfig):
    """A bundle built by `edgeagent train`: a classifier (INT8 ONNX encoder + head) for a
    classify task, or a token tagger (INT8 ONNX, BIO tags) for an extract task."""

    type: Literal["onnx"] = "onnx"
    bundle: Path = Field(description="Model bundle directory (contains manifest.json).")
    intra_op_threads: int = Field(1, ge=1, le=64, description="onnxruntime intra-op threads.")
    inter_op_threads: int = Field(1, ge=1, le=64, description="onnxruntime inter-op threads.")
    max_length: int = Field(128, ge=8, le=512, description="Tokens per input (truncation).")
    verify_sha256: bool = Field(
        True,
        description="Check every bundle file against the sha256 in its manifest at load "
        "(about 0.1 s for the default model).",
    )
    use_bundle_threshold: bool = Field(
        True,
        description="Mark answers below the threshold stored in the bundle (by `edgeagent "
        "calibrate`, or for a tagger by `edgeagent train`) with reason `low_confidence` (on "
        "top of the task's own `threshold`).",
    )
    oos_distance: bool | None = Field(
        None,
        description="Classifier: flag inputs whose out-of-scope score (chosen and calibrated by "
        "`edgeagent train`) is above the bundle's cut-off as `out_of_scope`, in addition to "
        "inputs the trained out-of-scope class wins. Unset: only when the "
        "bundle was trained with out-of-scope examples (`oos` label or `--oos-examples`); "
        "`true` also for a task given none; `false` never.",
    )
    tagger_confidence: Literal["words", "spans", "frame"] = Field(
        "words",
        description="Tagger: the job's confidence is the least probable tag of any word, `O` "
        "included (`words`: a slot the model nearly found lowers it too), the weakest extracted "
        "span (`spans`), or the probability of the whole tag sequence (`frame`).",
    )

    def learns(self, kind: str) -> bool:
        return kind == "classify"

    def missing_model_hint(self, task_name: str) -> str | None:
        if (self.bundle / "manifest.json").is_file():
            return None
        return (
            f"the model bundle {self.bundle} does not exist yet.  Build the INT8 encoder and "
            f"train the task from a checkout: models/build_default.sh && edgeagent train "
            f"{task_name} --examples EXAMPLES.jsonl --out DIR (./install.sh --demo does both "
            "for the example intent task, into models/)"
        )


def _build(task_name: str, task: TaskConfig) -> Backend:
    """A classify task gets the encoder + head, an extract task the token tagger
    (:mod:`edgeagent.backends.tagger`, imported only then)."""
    if task.kind == "extract":
        from edgeagent.backends.tagger import OnnxTaggerBackend

        return OnnxTaggerBackend(task_name, task)
    return OnnxBackend(task_name, task)


BACKEND = BackendType(OnnxBackendConfig, _build)
