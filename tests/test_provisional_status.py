"""A provisional answer whose local label is the out-of-scope class is not an `ok` answer.

A consumer that reads only `status` must not act on the label `oos` as if it were a
command (PROTOCOL.md, "Provisional answers").  Unit test at the Escalator seam: a task
runtime reduced to the attributes the escalator reads; the escalator returns the job's
answer among its actions.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest

from edgeagent.backends.base import Prediction
from edgeagent.config import CloudConfig, TaskConfig
from edgeagent.escalation import Escalator
from edgeagent.metrics import Metrics
from edgeagent.pipeline import Outcome, PendingJob
from edgeagent.protocol import ErrorInfo, Job, ResultMessage, Topics

LABELS = ["lights_on", "lights_off", "oos"]


def _runtime() -> Any:
    cfg = TaskConfig.model_validate(
        {
            "kind": "classify",
            "labels": LABELS,
            "offline": "provisional",
            "backend": {"type": "rules", "rules": [{"label": "lights_on", "keywords": ["on"]}]},
        }
    )
    return SimpleNamespace(
        name="intent", config=cfg, labels=LABELS, backend=SimpleNamespace(model_id="m@1")
    )


def _escalate(label: str, reason: str) -> ResultMessage:
    rt = _runtime()
    esc = Escalator(CloudConfig(enabled=True), Topics("edgeagent", "dev"), "dev", Metrics())
    esc.configure({"intent": rt.config})
    job = Job(id="j1", task="intent", input="what is the capital of France", params={},
              deadline_ms=30000, escalate="auto")  # fmt: skip
    pending = PendingJob(job, time.time())
    local = ResultMessage(
        id="j1",
        task="intent",
        status="unrecognized",
        confidence=0.4,
        source="local",
        error=ErrorInfo(code=reason, message="x"),
    )
    outcome = Outcome(
        pending, local, prediction=Prediction({"label": label}, 0.4, reason), escalate=reason
    )
    acts = esc.escalate(outcome, rt, reachable=False)
    [row] = acts.opened  # recorded, with no request sent: the cloud is away
    assert row.provisional and acts.requests == []
    [answer] = acts.answers
    return answer.result


def test_provisional_out_of_scope_is_not_ok() -> None:
    res = _escalate("oos", "out_of_scope")
    assert res.provisional
    assert res.status == "unrecognized"  # not "ok": the label is no answer
    assert res.output == {"label": "oos"}  # the local view is still there to read
    assert res.error is not None and res.error.code == "out_of_scope"
    assert res.escalation is not None and res.escalation.reason == "out_of_scope"


@pytest.mark.parametrize("reason", ["low_confidence"])
def test_provisional_low_confidence_stays_ok(reason: str) -> None:
    res = _escalate("lights_on", reason)
    assert res.provisional
    assert res.status == "ok" and res.output == {"label": "lights_on"} and res.error is None
