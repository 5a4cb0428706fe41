"""TaskRuntime with a fake backend (the unit-test seam): batching, deadlines, timeouts, crashes."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

from edgeagent.backends.base import Prediction
from edgeagent.config import TaskConfig
from edgeagent.metrics import Metrics
from edgeagent.pipeline import REDACT_INLINE_CHARS, Outcome, PendingJob, TaskRuntime
from edgeagent.protocol import Job
from edgeagent.redact import Redactor

TASK = TaskConfig.model_validate(
    {
        "kind": "classify",
        "timeout_s": 0.5,
        "max_batch": 8,
        "backend": {"type": "rules", "rules": [{"label": "x", "keywords": ["x"]}]},
    }
)


class FakeBackend:
    model_id = "fake@1"
    fingerprint = "f1"

    def __init__(self, behaviour: str = "echo") -> None:
        self.behaviour = behaviour
        self.batches: list[list[Any]] = []
        self.release = threading.Event()

    def load(self) -> None: ...
    def warmup(self) -> None: ...
    def close(self) -> None: ...

    def infer_batch(self, inputs: list[Any]) -> list[Prediction]:
        self.batches.append(list(inputs))
        if self.behaviour == "hang":
            self.release.wait(5)
        if self.behaviour == "crash":
            raise RuntimeError("boom")
        if self.behaviour == "short":
            return []
        time.sleep(0.01)  # let more jobs queue up behind this batch
        return [Prediction({"label": str(x)}, 0.9) for x in inputs]


def run(
    backend: FakeBackend,
    jobs: list[PendingJob],
    setup: Callable[[TaskRuntime], None] | None = None,
) -> list[Outcome]:
    async def main() -> list[Outcome]:
        rt = TaskRuntime("t", TASK, backend, Metrics())  # type: ignore[arg-type]
        if setup is not None:
            setup(rt)
        got: list[Outcome] = []
        done = asyncio.Event()

        def deliver(outcomes: list[Outcome]) -> None:
            got.extend(outcomes)
            if len(got) >= len(jobs):
                done.set()

        rt.start(deliver)
        for p in jobs:
            rt.queue.put_nowait(p)
        await asyncio.wait_for(done.wait(), 10)
        await rt.stop()
        backend.release.set()
        rt.close()
        return got

    return asyncio.run(main())


def pending(i: int, deadline_ms: int = 10_000, received: float | None = None) -> PendingJob:
    job = Job(f"j{i}", "t", f"in-{i}", {}, deadline_ms, "auto")
    return PendingJob(job, time.time() if received is None else received)


def test_each_job_gets_its_own_answer_under_concurrent_batching() -> None:
    backend = FakeBackend()
    out = run(backend, [pending(i) for i in range(50)])
    assert {o.result.id: o.result.output["label"] for o in out} == {
        f"j{i}": f"in-{i}" for i in range(50)
    }
    assert all(o.result.status == "ok" and o.cacheable for o in out)
    assert max(len(b) for b in backend.batches) > 1  # jobs were batched
    assert max(len(b) for b in backend.batches) <= TASK.max_batch


def test_expired_jobs_are_not_run() -> None:
    backend = FakeBackend()
    out = run(backend, [pending(1, deadline_ms=10, received=time.time() - 1)])
    assert out[0].result.status == "expired"
    assert out[0].result.error is not None and out[0].result.error.code == "deadline_exceeded"
    assert backend.batches == []


def test_stuck_inference_times_out_with_a_retryable_error() -> None:
    out = run(FakeBackend("hang"), [pending(1)])
    assert out[0].result.status == "error"
    assert out[0].result.error is not None and out[0].result.error.code == "inference_timeout"


def test_backend_crash_and_wrong_answer_count_are_errors_not_crashes() -> None:
    for behaviour in ("crash", "short"):
        out = run(FakeBackend(behaviour), [pending(1), pending(2)])
        assert {o.result.status for o in out} == {"error"}
        assert {o.result.error.code for o in out if o.result.error} == {"inference_failed"}


def test_low_confidence_without_cloud_is_unrecognized() -> None:
    class Unsure(FakeBackend):
        def infer_batch(self, inputs: list[Any]) -> list[Prediction]:
            return [Prediction({"label": "x"}, 0.1) for _ in inputs]

    out = run(Unsure(), [pending(1)])
    res = out[0].result
    assert res.status == "unrecognized" and res.output is None
    assert res.error is not None and res.error.code == "low_confidence"
    assert not out[0].cacheable


def test_escalations_are_redacted_off_the_event_loop() -> None:
    """Redaction is pure Python (phone numbers take up to ~0.5 s on a crafted 16 KiB
    input): the pipeline runs it in a worker thread, never on the event loop, unless the
    batch is tiny (at most ``REDACT_INLINE_CHARS``: cheaper than the hand-off)."""

    class Unsure(FakeBackend):
        def infer_batch(self, inputs: list[Any]) -> list[Prediction]:
            return [Prediction({"label": "x"}, 0.1) for _ in inputs]

    threads: list[int] = []

    class Recording(Redactor):
        def redact_value(self, value: Any) -> Any:
            threads.append(threading.get_ident())
            return super().redact_value(value)

    def setup(rt: TaskRuntime) -> None:
        rt.cloud_available = True
        rt.redactor = Recording()

    tail = " please" + " and thanks" * (REDACT_INLINE_CHARS // 10)
    job = Job("j1", "t", "call +49 30 1234567" + tail, {}, 10_000, "auto")
    [out] = run(Unsure(), [PendingJob(job, time.time())], setup)
    assert out.escalate == "low_confidence" and out.redacted is not None
    (red_input, _local), mapping, counts = out.redacted
    assert mapping == {"<PHONE_1>": "+49 30 1234567"}
    assert red_input == "call <PHONE_1>" + tail and counts == {"phone": 1}
    assert threads and threading.main_thread().ident not in threads
