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
