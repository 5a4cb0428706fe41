"""Config of the ``onnx`` backend (pure pydantic; no onnxruntime import here)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class OnnxBackendConfig(BaseModel):
    """A classifier bundle built by `edgeagent train` (INT8 ONNX encoder + head)."""

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
    oos_distance: bool = Field(
        True,
        description="Flag inputs far from every class centroid (cosine below the bundle's "
        "calibrated cut-off) as `out_of_scope`, in addition to a trained out-of-scope class.",
    )
