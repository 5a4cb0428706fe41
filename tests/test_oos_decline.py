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


# -- the benchmark's weighted escalation (bench_oos.py --proxy) ----------------------------


def _bench_oos() -> Any:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_oos.py"
    spec = importlib.util.spec_from_file_location("bench_oos", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_weighted_escalation_matches_the_unweighted_curve_and_reweights() -> None:
    """With unit weights the proxy's escalation equals calibrate's curve (declined jobs
    local, flagged ones first, ties together); a weight of 2 counts like a copied row."""
    np = pytest.importorskip("numpy")
    from edgeagent.heads.curves import escalation_curve, escalation_for

    bench = _bench_oos()
    rng = np.random.default_rng(0)
    n = 400
    conf = np.round(rng.uniform(size=n), 2)  # ties
    right = rng.uniform(size=n) < 0.3 + 0.7 * conf
    forced = rng.uniform(size=n) < 0.1
    declined = ~forced & (rng.uniform(size=n) < 0.05)
    for target in (0.9, 0.95, 0.98, 0.99):
        curve = escalation_curve(list(conf), list(right), list(forced), list(declined))
        want = escalation_for(curve, target).escalation
        got = bench.weighted_escalation(conf, right, forced, declined, np.ones(n), target)
        assert got == pytest.approx(want)
        twice = np.concatenate([np.arange(n), np.arange(50)])
        w = np.ones(n)
        w[:50] = 2.0
        curve2 = escalation_curve(
            list(conf[twice]), list(right[twice]), list(forced[twice]), list(declined[twice])
        )
        got2 = bench.weighted_escalation(conf, right, forced, declined, w, target)
        assert got2 == pytest.approx(escalation_for(curve2, target).escalation)
