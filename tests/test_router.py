"""The router is pure: property tests over every combination."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edgeagent.backends.base import Prediction
from edgeagent.router import OOS_MARGIN, REASONS, confidently_out_of_scope, decide
from tests.strategies import predictions

policies = st.sampled_from(["auto", "never", "always"])
oos_policies = st.sampled_from(["escalate", "decline"])
margins = st.none() | st.floats(-5, 5) | st.booleans() | st.just("1.0")


@given(predictions, margins, st.floats(0, 1), policies, policies, st.booleans(), oos_policies)
def test_route_is_total_and_consistent(
    pred: Prediction,
    margin: object,
    threshold: float,
    task_policy: str,
    wish: str,
    cloud: bool,
    oos: str,
) -> None:
    if margin is not None:
        pred = Prediction(pred.output, pred.confidence, pred.reason, {OOS_MARGIN: margin})
    r = decide(
        pred,
        threshold=threshold,
        task_policy=task_policy,  # type: ignore[arg-type]
        job_wish=wish,
        cloud_available=cloud,
        out_of_scope=oos,  # type: ignore[arg-type]
    )  # type: ignore[arg-type]
    assert r.action in {"answer", "escalate", "unrecognized", "decline"}
    effective = task_policy if wish == "auto" else wish
    if r.action == "decline":  # only a confident out-of-scope flag, only when asked for
        assert oos == "decline" and pred.reason == "out_of_scope" and r.reason == "out_of_scope"
        assert isinstance(margin, float) and margin > 0
        assert effective != "always"
    if oos == "decline" and confidently_out_of_scope(pred) and effective != "always":
        assert r.action == "decline"
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


def _flagged(margin: float | None) -> Prediction:
    details = {} if margin is None else {OOS_MARGIN: margin}
    return Prediction({"label": "alarm"}, 0.97, "out_of_scope", details)


def test_confidently_out_of_scope_is_declined_only_when_the_task_says_so() -> None:
    """`out_of_scope = "decline"`: a job flagged out of scope with a positive margin over
    the decline cut-off is answered locally (`decline`), even with a cloud; a borderline
    one (margin <= 0, or none reported) still escalates; the default escalates all."""
    for cloud in (True, False):
        r = decide(
            _flagged(0.4),
            threshold=0.5,
            task_policy="auto",
            cloud_available=cloud,
            out_of_scope="decline",
        )
        assert (r.action, r.reason) == ("decline", "out_of_scope")
    for margin in (-0.1, 0.0, None):
        r = decide(
            _flagged(margin),
            threshold=0.5,
            task_policy="auto",
            cloud_available=True,
            out_of_scope="decline",
        )
        assert (r.action, r.reason) == ("escalate", "out_of_scope")
    r = decide(_flagged(0.4), threshold=0.5, task_policy="auto", cloud_available=True)
    assert (r.action, r.reason) == ("escalate", "out_of_scope")


def test_a_job_asking_for_the_cloud_is_never_declined() -> None:
    r = decide(
        _flagged(3.0),
        threshold=0.5,
        task_policy="auto",
        job_wish="always",
        cloud_available=True,
        out_of_scope="decline",
    )
    assert (r.action, r.reason) == ("escalate", "forced")


def test_a_margin_on_an_unflagged_prediction_is_ignored() -> None:
    low = Prediction({"label": "a"}, 0.1, None, {OOS_MARGIN: 2.0})
    r = decide(low, threshold=0.5, task_policy="auto", cloud_available=True, out_of_scope="decline")
    assert (r.action, r.reason) == ("escalate", "low_confidence")
