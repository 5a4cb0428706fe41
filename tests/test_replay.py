"""`edgeagent replay`'s report: what counts as right and what counts as local."""

from __future__ import annotations

from typing import Any

from edgeagent.replay import report
from edgeagent.router import DECLINED_MESSAGE


def _res(
    job: str,
    status: str,
    source: str,
    *,
    label: str | None = None,
    code: str | None = None,
    message: str | None = None,
    reason: str | None = None,
    supersedes: str | None = None,
) -> dict[str, Any]:
    return {
        "id": job,
        "status": status,
        "source": source,
        "output": None if label is None else {"label": label},
        "error": None if code is None else {"code": code, "message": message or code},
        "escalation": None if reason is None else {"reason": reason, "id": "e-" + job},
        "supersedes": supersedes,
    }


def _run(
    rows: list[tuple[str, str, dict[str, Any], dict[str, Any] | None]],
) -> dict[str, Any]:
    jobs = [{"id": job} for job, *_ in rows]
    gold = {job: {"label": g} for job, g, *_ in rows}
    first = {job: f for job, _, f, _ in rows}
    final = {job: (fin or f) for job, _, f, fin in rows}
    return report(jobs, gold, first, final, {job: 1.0 for job in first})


def test_declining_an_out_of_scope_job_counts_as_right() -> None:
    rep = _run(
        [
            ("1", "alarm", _res("1", "ok", "local", label="alarm"), None),
            # Flagged out of scope, no cloud: declined -> right for a gold `oos`.
            ("2", "oos", _res("2", "unrecognized", "local", code="out_of_scope"), None),
            # Escalated; the cloud said it is out of scope.
            (
                "3",
                "oos",
                _res("3", "unrecognized", "local", code="out_of_scope", reason="out_of_scope"),
                _res(
                    "3", "ok", "cloud", label="out_of_scope", reason="out_of_scope", supersedes="3"
                ),
            ),
            # Answered with an intent: wrong.
            ("4", "oos", _res("4", "ok", "local", label="alarm"), None),
            # Declined an in-scope job: wrong.
            ("5", "timer", _res("5", "unrecognized", "local", code="low_confidence"), None),
            # Gave up for another reason (budget): not a right out-of-scope answer.
            ("6", "oos", _res("6", "unrecognized", "local", code="budget_exceeded"), None),
        ]
    )
    assert rep["accuracy_overall"] == round(3 / 6, 4)
    assert rep["out_of_scope_jobs"] == 4
    assert rep["accuracy_out_of_scope"] == 0.5
    assert rep["accuracy_local"] == 0.5  # jobs 1 and 4 were answered locally


def test_cache_hits_are_local_answers() -> None:
    rows = [(str(i), "alarm", _res(str(i), "ok", "cache", label="alarm"), None) for i in range(8)]
    rows += [("8", "timer", _res("8", "ok", "local", label="timer"), None)]
    rows += [
        (
            "9",
            "timer",
            _res("9", "unrecognized", "local", code="low_confidence", reason="low_confidence"),
            _res("9", "ok", "cloud", label="timer", reason="low_confidence", supersedes="9"),
        )
    ]
    rep = _run(rows)
    assert rep["answered_locally"] == 0.9
    assert rep["answered_from_cache"] == 0.8
    assert rep["accuracy_local"] == 1.0 and rep["accuracy_overall"] == 1.0
    assert rep["escalation_rate"] == 0.1


def test_oos_label_option_extends_the_out_of_scope_labels() -> None:
    rows = [("1", "none_of_these", _res("1", "unrecognized", "local", code="out_of_scope"), None)]
    jobs = [{"id": "1"}]
    gold = {"1": {"label": "none_of_these"}}
    first = {"1": rows[0][2]}
    assert report(jobs, gold, first, first, {})["accuracy_overall"] == 0.0
    rep = report(jobs, gold, first, first, {}, frozenset({"oos", "none_of_these"}))
    assert rep["accuracy_overall"] == 1.0


def _declined(job: str) -> dict[str, Any]:
    return _res(job, "unrecognized", "local", code="out_of_scope", message=DECLINED_MESSAGE)


def test_declined_out_of_scope_jobs_are_right_and_counted() -> None:
    """A task with `out_of_scope = "decline"` answers a confidently out-of-scope job
    `unrecognized`/`out_of_scope` locally, without escalating: right for a gold `oos`,
    wrong for an in-scope one, and counted as declined (not escalated)."""
    rep = _run(
        [
            ("1", "oos", _declined("1"), None),
            ("2", "oos", _declined("2"), None),
            ("3", "alarm", _declined("3"), None),
            ("4", "alarm", _res("4", "ok", "local", label="alarm"), None),
        ]
    )
    assert rep["declined_locally"] == 0.75
    assert rep["accuracy_declined"] == round(2 / 3, 4)
    assert rep["accuracy_out_of_scope"] == 1.0
    assert rep["accuracy_overall"] == 0.75
    assert rep["escalation_rate"] == 0.0


def test_flagged_out_of_scope_without_a_cloud_is_not_counted_as_declined() -> None:
    """Without a cloud, a job only flagged out of scope (below the decline cut-off) is
    `unrecognized`/`out_of_scope` too, but not declined: PROTOCOL.md tells them apart by
    the `declined:` message."""
    rep = _run(
        [
            ("1", "oos", _declined("1"), None),
            ("2", "oos", _res("2", "unrecognized", "local", code="out_of_scope"), None),
        ]
    )
    assert rep["declined_locally"] == 0.5
    assert rep["accuracy_declined"] == 1.0
    assert rep["accuracy_out_of_scope"] == 1.0
