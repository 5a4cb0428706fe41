"""Pure escalation policy: decide what to do with a local answer.  No I/O, no clock.

Without a cloud agent configured (the daemon as of now), anything that would
escalate is answered ``unrecognized`` with the reason as its error code, so a
producer never gets a low-confidence guess dressed up as an answer.

Out of scope: a task's ``out_of_scope`` policy says what happens to a job the backend
flags ``out_of_scope``.  ``escalate`` (the default): like any other uncertain job.
``decline``: a job the backend is *confidently* out of scope for (its prediction's
``details["oos_margin"]``, :data:`OOS_MARGIN`, is above 0: the out-of-scope score lies
above the bundle's calibrated decline cut-off) is answered ``unrecognized`` /
``out_of_scope`` locally, without the cloud (action ``decline``); a borderline one (flagged,
margin <= 0 or none reported) still escalates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edgeagent.backends.base import OOS_MARGIN as OOS_MARGIN  # re-exported: the policy's key
from edgeagent.backends.base import Prediction

Policy = Literal["auto", "never", "always"]
OosPolicy = Literal["escalate", "decline"]
Action = Literal["answer", "escalate", "unrecognized", "decline"]

REASONS = ("low_confidence", "out_of_scope", "schema_invalid", "open_ended", "forced", "audit")
#: ``error.message`` of a declined job.
DECLINED_MESSAGE = (
    "declined: the input is confidently outside what this task knows "
    "(out-of-scope score above the model's decline cut-off)"
)


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
    out_of_scope: OosPolicy = "escalate",
) -> Route:
    """Route one job.  ``prediction`` is None when the job was not run locally.
    ``out_of_scope``: the task's out-of-scope policy (module docstring)."""
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
    if out_of_scope == "decline" and confidently_out_of_scope(prediction):
        return Route("decline", "out_of_scope")
    if policy == "never" or not cloud_available:
        return Route("unrecognized", reason)
    return Route("escalate", reason)


def confidently_out_of_scope(prediction: Prediction | None) -> bool:
    """The backend flagged ``prediction`` out of scope with a margin above 0 over its
    decline cut-off (:data:`OOS_MARGIN`)."""
    if prediction is None or prediction.reason != "out_of_scope":
        return False
    margin = prediction.details.get(OOS_MARGIN)
    return isinstance(margin, (int, float)) and not isinstance(margin, bool) and margin > 0
