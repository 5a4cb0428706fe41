"""Pure escalation policy: decide what to do with a local answer.  No I/O, no clock.

Without a cloud agent configured (the daemon as of now), anything that would
escalate is answered ``unrecognized`` with the reason as its error code, so a
producer never gets a low-confidence guess dressed up as an answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edgeagent.backends.base import Prediction

Policy = Literal["auto", "never", "always"]
Action = Literal["answer", "escalate", "unrecognized"]

REASONS = ("low_confidence", "out_of_scope", "schema_invalid", "open_ended", "forced", "audit")


@dataclass(frozen=True, slots=True)
class Route:
    action: Action
    reason: str | None = None


def effective_policy(task_policy: Policy, job_wish: Policy) -> Policy:
    """A job may ask for ``never`` or ``always``; ``auto`` defers to the task."""
    return task_policy if job_wish == "auto" else job_wish


def decide(
    prediction: Prediction | None,
    *,
    threshold: float,
    task_policy: Policy,
    job_wish: Policy = "auto",
    cloud_available: bool = False,
) -> Route:
    """Route one job.  ``prediction`` is None when the job was not run locally."""
    policy = effective_policy(task_policy, job_wish)
    if policy == "always":
        return Route("escalate", "forced") if cloud_available else Route("unrecognized", "forced")
    confident = (
        prediction is not None
        and prediction.output is not None
        and prediction.reason is None
        and prediction.confidence >= threshold
    )
    if confident:
        return Route("answer")
    if prediction is None or prediction.output is None:
        reason = (prediction.reason if prediction else None) or "low_confidence"
    else:
        reason = prediction.reason or "low_confidence"
    if policy == "never" or not cloud_available:
        return Route("unrecognized", reason)
    return Route("escalate", reason)
