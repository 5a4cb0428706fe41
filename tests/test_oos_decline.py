"""`out_of_scope = "decline"` through the task pipeline (fake backend: the unit seam).

A confidently out-of-scope job (the backend's ``oos_margin`` > 0) is answered
``unrecognized`` / ``out_of_scope`` on the device, even with a cloud configured; a
borderline one still escalates; the default (``escalate``) escalates both.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from edgeagent.backends.base import Prediction
from edgeagent.config import TaskConfig
from edgeagent.metrics import Metrics
from edgeagent.pipeline import PendingJob, TaskRuntime
from edgeagent.protocol import Job
from edgeagent.router import DECLINED_MESSAGE, OOS_MARGIN


class Flagging:
    model_id = "fake@1"
    fingerprint = "f1"

    def load(self) -> None: ...
    def warmup(self) -> None: ...
    def close(self) -> None: ...

    def infer_batch(self, inputs: list[Any]) -> list[Prediction]:
        raise AssertionError("not used")


def _task(out_of_scope: str | None) -> TaskConfig:
    raw: dict[str, Any] = {
        "kind": "classify",
        "backend": {"type": "rules", "rules": [{"label": "x", "keywords": ["x"]}]},
    }
    if out_of_scope is not None:
        raw["out_of_scope"] = out_of_scope
    return TaskConfig.model_validate(raw)


def _flagged(margin: float) -> Prediction:
    return Prediction({"label": "x"}, 0.93, "out_of_scope", {OOS_MARGIN: margin})


@pytest.mark.parametrize("cloud", [True, False])
def test_confident_out_of_scope_is_declined_on_the_device(cloud: bool) -> None:
    rt = TaskRuntime("t", _task("decline"), Flagging(), Metrics())  # type: ignore[arg-type]
    rt.cloud_available = cloud
    try:
        job = PendingJob(Job("j1", "t", "how tall is everest", {}, 10_000, "auto"), time.time())
        out = rt._route(job, _flagged(0.7))
        assert out.escalate is None and not out.cacheable
        res = out.result
        assert res.status == "unrecognized" and res.source == "local" and res.output is None
        assert res.error is not None and res.error.code == "out_of_scope"
        assert res.error.message == DECLINED_MESSAGE
        borderline = rt._route(job, _flagged(-0.2))
        assert borderline.escalate == ("out_of_scope" if cloud else None)
        assert borderline.result.error is not None
        assert borderline.result.error.message != DECLINED_MESSAGE
    finally:
        rt.close()


def test_the_default_escalates_even_confident_out_of_scope() -> None:
    task = _task(None)
    assert task.out_of_scope == "escalate"
    rt = TaskRuntime("t", task, Flagging(), Metrics())  # type: ignore[arg-type]
    rt.cloud_available = True
    try:
        job = PendingJob(Job("j1", "t", "how tall is everest", {}, 10_000, "auto"), time.time())
        assert rt._route(job, _flagged(5.0)).escalate == "out_of_scope"
    finally:
        rt.close()
