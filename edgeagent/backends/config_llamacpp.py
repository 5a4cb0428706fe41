"""Config of the ``llamacpp`` backend (pure pydantic; no llama_cpp import here)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class LlamaCppBackendConfig(BaseModel):
    """A GGUF model run by llama-cpp-python."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["llamacpp"] = "llamacpp"
    model: Path = Field(description="GGUF file.")
    n_ctx: int = Field(2048, ge=128, le=131072, description="Context window (tokens).")
    n_threads: int = Field(2, ge=1, le=64, description="CPU threads.")
    max_tokens: int = Field(256, ge=1, le=8192, description="Generation cap (tokens).")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature.")
