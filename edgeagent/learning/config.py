"""``[tasks.NAME.learn]``: how a task learns from its cloud agent (pure pydantic)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

LearnSource = Literal["escalations", "audits", "bundle"]
DEFAULT_SOURCES: tuple[LearnSource, ...] = ("escalations", "audits", "bundle")


class LearnConfig(BaseModel):
    """On-device learning from the cloud agent's answers (classify tasks on an `onnx`
    classifier bundle).  Off by default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        False,
        description="Learn from validated cloud answers: refit the classifier head on the "
        "device in a low-priority process and promote it only if it is no worse.",
    )
    sources: list[LearnSource] = Field(
        default_factory=lambda: list(DEFAULT_SOURCES),
        description="What a refit learns from: cloud answers to escalated jobs "
        "(`escalations`), confident local answers the cloud re-checked (`audits`, see "
        "`audit_rate`), the bundle's own training examples (`bundle`; needs a bundle built "
        "by this version of `edgeagent train`, older ones carry none).",
    )
    min_cloud_confidence: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="A cloud answer whose `confidence` is below this is treated as unsure "
        "and never learned (it still answers its job).  Answers without a confidence count "
        "as sure.",
    )
    every_examples: int = Field(
        200,
        ge=1,
        description="Start a refit after this many new learned examples ...",
    )
    every_s: float = Field(
        3600.0,
        gt=0,
        description="... or this long after the last round when at least "
        "`min_new_examples` arrived (seconds).",
    )
    min_new_examples: int = Field(
        20, ge=1, description="New examples a time-triggered refit needs at least."
    )
    holdout: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="Share of learned examples held out (never trained on) to judge a "
        "candidate; the split is a hash of the normalised input, so it never changes.",
    )
    min_examples_per_label: int = Field(
        3,
        ge=1,
        description="A label the serving model does not know is trained only once it has "
        "this many learned training examples.",
    )
    balance_max: float = Field(
        2.0,
        ge=1.0,
        le=20.0,
        description="A label with fewer training examples than the median label (a new "
        "intent) has its learned examples repeated up to this many times in a refit.  1: off.",
    )
    oos_weight: float = Field(
        6.0,
        ge=0.1,
        le=50.0,
        description="Weight of the out-of-scope class in a refit (outlier exposure: the "
        "cloud's out-of-scope answers and the bundle's own out-of-scope examples count this "
        "many times).",
    )
    oos_target_loss: float = Field(
        0.05,
        ge=0.0,
        le=0.5,
        description="Largest share of held-out in-scope examples the refitted head's "
        "out-of-scope cut-off may flag (`edgeagent train` uses 0.01).  Used only when the "
        "traffic's out-of-scope odds (learned examples, audits weighted 1 / `audit_rate`) "
        "are at least `oos_target_loss` / 1 % times the training set's, and only if that "
        "candidate passes the promotion rule; otherwise the 1 % cut-off.",
    )
    prior_correction: float = Field(
        1.0,
        ge=0.0,
        le=3.0,
        description="Logit adjustment for labels with fewer training examples than the "
        "median label (new intents): their bias is raised by tau times ln(median / count), "
        "undoing the low prior a refit learns from their scarcity; a round takes the "
        "strongest of tau, tau/2 and 0 that is no worse.  0: off.",
    )
    reuse_hyperparameters: bool = Field(
        True,
        description="A refit keeps the L2 penalty and kNN blend that `edgeagent train` chose "
        "for the bundle (its manifest) instead of searching them again: one fit instead of "
        "several, a few times faster on a busy device.",
    )
    max_examples: int = Field(
        20000,
        ge=1,
        description="Learned examples kept per task; past it the label with the most "
        "examples loses its oldest ones first.",
    )
    max_per_label: int = Field(
        500,
        ge=1,
        description="Learned examples kept per label (the oldest go first); repeated inputs "
        "keep only their newest answer.",
    )
    target_accuracy: float = Field(
        0.98,
        gt=0.0,
        le=1.0,
        description="Overall accuracy the task aims for with a perfect cloud: a candidate must "
        "not need more escalation to reach it than the serving model.",
    )
    tolerance: float = Field(
        0.0,
        ge=0.0,
        le=0.2,
        description="Slack when comparing candidate and serving model (absolute, on "
        "accuracy and escalation).",
    )
    noise_se: float = Field(
        2.0,
        ge=0.0,
        le=5.0,
        description="A candidate counts as worse only when it is worse by more than this many "
        "binomial standard errors of the serving model's figure on that evaluation set (and "
        "by more than `tolerance`): a few examples flipping on a small split is noise.  0: "
        "any difference counts.",
    )
    split_margin: float = Field(
        0.01,
        ge=0.0,
        le=0.2,
        description="Forgetting budget on the bundle's own held-out split: a learned version "
        "may need at most this much more escalation (absolute) for `target_accuracy` there "
        "than the configured bundle (beyond the `noise_se` bound), the price of adapting to "
        "traffic unlike the training set; it must still be no worse than the serving model on "
        "the traffic-weighted learned holdout, and its local accuracy on the split no worse "
        "than the serving model's.",
    )
    keep_versions: int = Field(
        5, ge=1, le=100, description="Learned bundle versions kept (older ones are deleted)."
    )
    memory: bool = Field(
        True,
        description="Instant memory: between refits, a near-duplicate of a learned input is "
        "answered with the cloud's label (cosine of INT8 embeddings >= `memory_min_cos`).",
    )
    memory_min_cos: float = Field(
        0.95,
        gt=0.0,
        le=1.0,
        description="Cosine similarity a job needs to a remembered input to take its label.",
    )
    memory_max: int = Field(
        5000, ge=1, description="Inputs held in the instant memory (the oldest go first)."
    )
    few_shot: int = Field(
        0,
        ge=0,
        le=16,
        description="GGUF (`llamacpp`) extract/classify tasks: add this many learned cloud "
        "answers to each job's prompt, the ones whose inputs are nearest to the job (cosine "
        "of `few_shot_encoder` embeddings), after the fixed examples.  Works without "
        "`enabled` (these tasks are not refitted).  0: off.",
    )
    few_shot_encoder: Path | None = Field(
        None,
        description="Sentence-encoder bundle for `few_shot` (e.g. the INT8 MiniLM of "
        "`edgeagent models build`, or any onnx classifier bundle); relative to the config file.",
    )
    few_shot_min_cos: float = Field(
        0.3,
        ge=-1.0,
        le=1.0,
        description="A learned answer is shown only when its input has at least this cosine "
        "similarity to the job.",
    )
    few_shot_max: int = Field(
        2000, ge=1, description="Learned answers kept for `few_shot` (the oldest go first)."
    )
    refit_timeout_s: float = Field(
        1800.0, gt=0, description="A refit running longer is killed and counted `failed`."
    )
    refit_max_memory_mb: int = Field(
        1536,
        ge=256,
        description="Address-space limit of the refit process (MiB; RLIMIT_AS).",
    )
    refit_nice: int = Field(
        10, ge=0, le=19, description="Niceness added to the refit process (0-19)."
    )

    refit_idle: bool = Field(
        True,
        description="Run the refit process under the SCHED_IDLE CPU policy (Linux): it only "
        "gets a core nothing else wants, so jobs keep their latency.",
    )
    refit_yield_ms: float = Field(
        20.0,
        ge=0,
        description="Pause the refit process (SIGSTOP) while the daemon has jobs in flight "
        "and for this many milliseconds after; 0: never pause it (POSIX only).",
    )
    refit_min_share: float = Field(
        0.2,
        gt=0,
        le=1,
        description="Share of the time the refit runs even under continuous traffic (so a "
        "busy device still learns; jobs that arrive meanwhile share the CPU with it).",
    )

    @model_validator(mode="after")
    def _check(self) -> LearnConfig:
        if not self.sources:
            raise ValueError("sources: name at least one of escalations, audits, bundle")
        if self.few_shot and self.few_shot_encoder is None:
            raise ValueError("few_shot: name the sentence encoder bundle (few_shot_encoder)")
        return self
