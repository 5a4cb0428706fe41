"""Config of the ``onnx`` backend (pure pydantic; no onnxruntime import here)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class OnnxBackendConfig(BaseModel):
    """A bundle built by `edgeagent train`: a classifier (INT8 ONNX encoder + head) for a
    classify task, or a token tagger (INT8 ONNX, BIO tags) for an extract task."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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
        description="Mark answers below the threshold stored by `edgeagent calibrate` with "
        "reason `low_confidence` (on top of the task's own `threshold`).",
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
