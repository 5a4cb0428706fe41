"""The router is pure: property tests over every combination."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edgeagent.backends.base import Prediction
from edgeagent.router import REASONS, decide
from tests.strategies import predictions

policies = st.sampled_from(["auto", "never", "always"])


@given(predictions, st.floats(0, 1), policies, policies, st.booleans())
def test_route_is_total_and_consistent(
    pred: Prediction, threshold: float, task_policy: str, wish: str, cloud: bool
) -> None:
    r = decide(
        pred,
        threshold=threshold,
        task_policy=task_policy,  # type: ignore[arg-type]
        job_wish=wish,
        cloud_available=cloud,
    )  # type: ignore[arg-type]
    assert r.action in {"answer", "escalate", "unrecognized"}
    if r.action == "answer":
        assert pred.output is not None and pred.reason is None and pred.confidence >= threshold
        assert r.reason is None
    else:
        assert r.reason in REASONS
    if r.action == "escalate":
        assert cloud
    if not cloud:
        assert r.action != "escalate"


def test_confident_answer_is_local() -> None:
    r = decide(Prediction({"label": "a"}, 0.9), threshold=0.5, task_policy="auto")
    assert r.action == "answer"


def test_low_confidence_without_cloud_is_unrecognized() -> None:
    r = decide(Prediction({"label": "a"}, 0.2), threshold=0.5, task_policy="auto")
    assert (r.action, r.reason) == ("unrecognized", "low_confidence")


def test_backend_reason_wins() -> None:
    r = decide(
        Prediction(None, 0.0, "out_of_scope"),
        threshold=0.5,
        task_policy="auto",
        cloud_available=True,
    )
    assert (r.action, r.reason) == ("escalate", "out_of_scope")


def test_job_may_force_or_forbid_escalation() -> None:
    p = Prediction({"label": "a"}, 0.99)
    assert (
        decide(p, threshold=0.5, task_policy="auto", job_wish="always", cloud_available=True).reason
        == "forced"
    )
    low = Prediction({"label": "a"}, 0.1)
    assert (
        decide(
            low, threshold=0.5, task_policy="auto", job_wish="never", cloud_available=True
        ).action
        == "unrecognized"
    )
