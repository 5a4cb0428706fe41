"""Config of the ``llamacpp`` backend (pure pydantic; no llama_cpp import here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgeagent.catalog import PULL_PREFIX, pulled_path


class FewShotExample(BaseModel):
    """One worked example shown to the model before the real input."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str = Field(description="Example input text.")
    output: dict[str, Any] | str = Field(
        description="Expected answer: the extracted object (extract), the label or "
        '`{"label": ...}` (classify), the text or `{"text": ...}` (generate).'
    )


class LlamaCppBackendConfig(BaseModel):
    """A GGUF model run by llama-cpp-python (`edgeagent models pull smollm2` fetches one)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["llamacpp"] = "llamacpp"
    model: Path = Field(
        description='GGUF file, or `"pull:NAME"` for the file `edgeagent models pull NAME` '
        "writes by default (in `$EDGEAGENT_MODEL_DIR`, else `/var/lib/edgeagent/models`)."
    )
    n_ctx: int = Field(
        2048,
        ge=128,
        le=131072,
        description="Context window (tokens).  Prompts longer than `n_ctx - max_tokens` are "
        "escalated, never cut.",
    )
    n_batch: int = Field(512, ge=8, le=8192, description="Prompt tokens decoded per batch.")
    n_threads: int = Field(2, ge=1, le=64, description="CPU threads.")
    max_tokens: int = Field(256, ge=1, le=8192, description="Generation cap (tokens).")
    temperature: float = Field(
        0.0, ge=0.0, le=2.0, description="Sampling temperature (0 = greedy, deterministic)."
    )
    seed: int = Field(0, ge=0, description="Sampling seed (used when temperature > 0).")
    prompt_format: Literal["auto", "chatml", "gemma", "completion"] = Field(
        "auto",
        description="How the prompt is laid out: `chatml` (SmolLM2 and other ChatML instruct "
        "models), `gemma` (Gemma instruct turns), `completion` (few-shot text for base models "
        "without a chat template, e.g. Gemma 3 270M).  `auto`: `chatml` when the GGUF chat "
        "template uses `<|im_start|>`, else `completion`.",
    )
    instruction: str | None = Field(
        None,
        description="Instruction placed before the examples.  Default: one written from the task "
        "kind, labels and schema.",
    )
    examples: list[FewShotExample] = Field(
        default_factory=list, description="Few-shot examples, shown in order before the input."
    )
    confidence: Literal["min", "mean", "joint"] = Field(
        "min",
        description="How token probabilities of the generated *value* tokens (not the syntax the "
        "grammar forces) become one confidence: `min` = the least likely token (default: one "
        "doubtful digit or name token sinks the answer), `mean` = exp(mean log-prob), `joint` = "
        "exp(sum log-prob), the probability of the whole answer.  Classify always uses `joint` "
        "over the label tokens.",
    )
    calibration: Path | None = Field(
        None,
        description="Extract/classify: calibration file written by `edgeagent calibrate TASK` "
        "(Platt scaling of the raw confidence, fitted on labelled examples).  Refused at load "
        "when it was fitted for another model file or prompt.  Unset: raw confidence.",
    )
    use_calibration_threshold: bool = Field(
        True,
        description="Mark answers below the threshold stored in `calibration` with reason "
        "`low_confidence` (on top of the task's own `threshold`).",
    )
    max_string_length: int = Field(
        64,
        ge=1,
        le=1024,
        description="Extract: length cap (characters) of schema strings without `maxLength`.",
    )
    max_array_items: int = Field(
        8, ge=0, le=64, description="Extract: item cap of schema arrays without `maxItems`."
    )
    max_integer_digits: int = Field(
        15, ge=1, le=30, description="Extract: digits allowed before the decimal point."
    )
    max_fraction_digits: int = Field(
        6, ge=1, le=30, description="Extract: digits allowed after the decimal point."
    )
    grounded: bool = Field(
        True,
        description="Extract: every string (without `enum`, `const` or `format`) and number "
        "value must occur in the input (strings as written, case included; numbers as "
        "numbers the input writes); an answer with a value that does not is "
        '`low_confidence` (confidence 0, `details.failure = "ungrounded"`), never returned.  '
        'Per schema node: `"x-grounded" = false` (or true) for it and everything below it.',
    )
    grammar_candidates: int = Field(
        64,
        ge=0,
        le=4096,
        description="Check the grammar against only the this-many most likely tokens (plus "
        "end-of-generation), falling back to the whole vocabulary when none fits.  Cuts the "
        "grammar cost on large vocabularies (Gemma: 262k).  0 = always the whole vocabulary.",
    )
    stop: list[str] = Field(
        default_factory=list,
        description="Generate: stop strings (the stop string is not returned).  The `completion` "
        "format always stops at a blank line followed by `Input:`.",
    )

    @field_validator("model", mode="before")
    @classmethod
    def _pulled(cls, value: Any) -> Any:
        """``pull:NAME`` -> the path ``models pull NAME`` writes to (one rule for both)."""
        if isinstance(value, str) and value.startswith(PULL_PREFIX):
            return pulled_path(value[len(PULL_PREFIX) :])
        return value

    @model_validator(mode="after")
    def _check(self) -> LlamaCppBackendConfig:
        if self.max_tokens >= self.n_ctx:
            raise ValueError("max_tokens must be smaller than n_ctx")
        return self
