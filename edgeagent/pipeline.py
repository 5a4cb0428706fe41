"""One task's jobs end to end: batch → infer (in a thread, with a deadline) → route → result.

Thread model: everything here runs on the event loop except ``Backend.infer_batch``,
which runs in a worker thread.  A stuck inference does not stall the loop:
the jobs of that batch get an ``error`` result at ``timeout_s`` while the thread
keeps its concurrency slot until it really returns (so stuck threads cannot pile up).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from edgeagent import router
from edgeagent.backends import Backend, Prediction, create
from edgeagent.config import TaskConfig
from edgeagent.inputs import NO_CONTENT as NO_CONTENT_FAILURE
from edgeagent.inputs import has_content, model_input
from edgeagent.logs import get_logger
from edgeagent.metrics import Metrics
from edgeagent.protocol import ErrorInfo, Job, ResultMessage

log = get_logger("edgeagent.pipeline")


@dataclass(slots=True)
class PendingJob:
    job: Job
    received_at: float
    """Wall-clock receipt time (seconds since the epoch), from the journal."""
    deadline_at: float = field(init=False)

    def __post_init__(self) -> None:
        self.deadline_at = self.received_at + self.job.deadline_ms / 1000.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """A job's local result.  ``escalate`` (a reason) asks the daemon to involve the cloud;
    ``result`` is then what the job gets if the cloud cannot be asked."""

    pending: PendingJob
    result: ResultMessage
    cacheable: bool = False
    prediction: Prediction | None = None
    escalate: str | None = None


class TaskRuntime:
    """A loaded backend for one task plus its micro-batching workers."""

    def __init__(self, name: str, config: TaskConfig, backend: Backend, metrics: Metrics) -> None:
        self.name = name
        self.config = config
        self.backend = backend
        self.metrics = metrics
        self.fingerprint = f"{config.fingerprint()}:{backend.fingerprint}"
        self.queue: asyncio.Queue[PendingJob] = asyncio.Queue()
        self._slots = asyncio.Semaphore(config.concurrency)
        # One more thread than slots, so a finished call can hand over while another is stuck.
        self._executor = ThreadPoolExecutor(
            max_workers=config.concurrency + 1, thread_name_prefix=f"infer-{name}"
        )
        self._workers: list[asyncio.Task[None]] = []
        self.cloud_available = False
        """Set by the daemon: the cloud is configured and this task may use it."""

    @classmethod
    def build(cls, name: str, config: TaskConfig, metrics: Metrics) -> TaskRuntime:
        """Create, load and warm up (blocking: call from a worker thread)."""
        backend = create(name, config)
        backend.load()
        backend.warmup()
        return cls(name, config, backend, metrics)

    @property
    def labels(self) -> list[str]:
        """The label set (classify): the task's, else the backend's rules or model labels."""
        if self.config.labels:
            return list(self.config.labels)
        rules = getattr(self.config.backend, "rules", None)
        if rules:
            return list(dict.fromkeys(r.label for r in rules))
        return list(getattr(self.backend, "labels", []) or [])

    def start(self, deliver: Callable[[list[Outcome]], None]) -> None:
        for i in range(self.config.concurrency):
            task = asyncio.get_running_loop().create_task(
                self._worker(deliver), name=f"task:{self.name}:worker{i}"
            )
            self._workers.append(task)

    async def stop(self) -> None:
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.backend.close()

    # -- workers ------------------------------------------------------------------

    async def _worker(self, deliver: Callable[[list[Outcome]], None]) -> None:
        max_wait = self.config.max_wait_ms / 1000.0
        while True:
            first = await self.queue.get()
            batch = [first]
            until = time.monotonic() + max_wait
            while len(batch) < self.config.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = until - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            deliver(await self._run_batch(batch))

    async def _run_batch(self, batch: list[PendingJob]) -> list[Outcome]:
        now = time.time()
        live = [p for p in batch if p.deadline_at > now]
        outcomes = [Outcome(p, expired(p, self.name)) for p in batch if p.deadline_at <= now]
        # Inputs with nothing in them are refused before any model runs (an answer would be
        # invented); the others are fed in the one normalised form the cache key hashes.
        outcomes += [self._route(p, NO_CONTENT) for p in live if not has_content(p.job.input)]
        live = [p for p in live if has_content(p.job.input)]
        if not live:
            return outcomes
        started = time.monotonic()
        try:
            predictions = await self._infer([model_input(p.job.input) for p in live])
        except TimeoutError:
            self.metrics.timeouts.labels(self.name).inc()
            log.error(
                "inference.timeout",
                task=self.name,
                batch=len(live),
                timeout_s=self.config.timeout_s,
            )
            err = ErrorInfo(
                code="inference_timeout", message="local inference timed out; retry later"
            )
            return outcomes + [Outcome(p, self._result(p, "error", error=err)) for p in live]
        except Exception as exc:  # a backend bug must not kill the worker
            log.exception("inference.failed", task=self.name, batch=len(live))
            err = ErrorInfo(
                code="inference_failed", message=f"local inference failed: {type(exc).__name__}"
            )
            return outcomes + [Outcome(p, self._result(p, "error", error=err)) for p in live]
        elapsed = time.monotonic() - started
        self.metrics.inference.labels(self.name).observe(elapsed)
        self.metrics.batch_size.labels(self.name).observe(len(live))
        for p, pred in zip(live, predictions, strict=True):
            outcomes.append(self._route(p, pred))
        return outcomes

    async def _infer(self, inputs: list[Any]) -> list[Prediction]:
        """Run one batch on the task's thread pool.

        The concurrency slot is released by the thread itself when the backend
        returns, not when the deadline fires: a stuck call keeps its slot.
        """
        loop = asyncio.get_running_loop()
        await self._slots.acquire()

        def run() -> list[Prediction]:
            try:
                res = self.backend.infer_batch(inputs)
            finally:
                with contextlib.suppress(RuntimeError):  # loop closed at shutdown
                    loop.call_soon_threadsafe(self._slots.release)
            if len(res) != len(inputs):
                raise RuntimeError(f"backend returned {len(res)} answers for {len(inputs)}")
            return res

        fut = loop.run_in_executor(self._executor, run)
        return await asyncio.wait_for(fut, self.config.timeout_s)

    def _route(self, p: PendingJob, pred: Prediction) -> Outcome:
        route = router.decide(
            pred,
            threshold=self.config.threshold,
            task_policy=self.config.policy,
            job_wish=p.job.escalate,
            cloud_available=self.cloud_available,
        )
        if route.action == "answer":
            res = self._result(p, "ok", output=pred.output, confidence=pred.confidence)
            return Outcome(p, res, cacheable=True, prediction=pred)
        reason = route.reason or "low_confidence"
        err = ErrorInfo(code=reason, message=unrecognized_message(reason, pred))
        res = self._result(p, "unrecognized", confidence=pred.confidence, error=err)
        if route.action == "escalate":
            return Outcome(p, res, prediction=pred, escalate=reason)
        self.metrics.unrecognized.labels(self.name, reason).inc()
        return Outcome(p, res, prediction=pred)

    def _result(
        self,
        p: PendingJob,
        status: str,
        *,
        output: Any = None,
        confidence: float | None = None,
        error: ErrorInfo | None = None,
    ) -> ResultMessage:
        return ResultMessage(
            id=p.job.id,
            task=self.name,
            status=status,
            output=output,
            confidence=None if confidence is None else round(float(confidence), 6),
            source="local",
            model=self.backend.model_id,
            error=error,
            latency_ms=round((time.time() - p.received_at) * 1000.0, 3),
        )


_UNRECOGNIZED = {
    "low_confidence": "the local model is not confident enough and no cloud agent is configured",
    "out_of_scope": "the input is outside what this task knows and no cloud agent is configured",
    "schema_invalid": "no schema-valid local answer and no cloud agent is configured",
    "forced": "the job or task asks for the cloud agent, and none is configured",
    "open_ended": "open-ended input needs the cloud agent, and none is configured",
}


NO_CONTENT = Prediction(None, 0.0, reason="out_of_scope", details={"failure": NO_CONTENT_FAILURE})
"""What an input without a letter or digit gets (:func:`edgeagent.inputs.has_content`)."""


def unrecognized_message(reason: str, pred: Prediction | None) -> str:
    """The ``error.message`` of an unrecognized result: the reason's text, made precise by
    the backend's ``details`` (an input too long for the model, the field that failed)."""
    base = _UNRECOGNIZED.get(reason, reason)
    details = pred.details if pred is not None else {}
    failure = details.get("failure")
    if failure == NO_CONTENT_FAILURE:
        return "the input has no letter or digit: there is nothing to answer from"
    if failure == "input_too_long":
        if "prompt_tokens" in details and "limit" in details:
            size = f" ({details['prompt_tokens']} prompt tokens, limit {details['limit']})"
        elif "limit_tokens" in details:
            size = f" (more than {details['limit_tokens']} tokens)"
        else:
            size = ""
        return f"the input is too long for the local model{size} and no cloud agent is configured"
    fields = details.get("fields")
    if failure == "ungrounded" and isinstance(fields, list) and fields:
        named = ", ".join(str(f) for f in fields[:5])
        return (
            f"the local answer holds a value that is not in the input ({named}) and no cloud "
            "agent is configured"
        )
    if reason == "schema_invalid" and isinstance(fields, list) and fields:
        why = details.get("message")
        named = ", ".join(str(f) for f in fields[:5])
        return f"{base}; field {named}" + (f": {str(why)[:200]}" if why else "")
    return base


def expired(p: PendingJob, task: str) -> ResultMessage:
    return ResultMessage(
        id=p.job.id,
        task=task,
        status="expired",
        error=ErrorInfo(
            code="deadline_exceeded", message=f"deadline of {p.job.deadline_ms} ms passed"
        ),
        latency_ms=round((time.time() - p.received_at) * 1000.0, 3),
    )
