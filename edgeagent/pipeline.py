"""One task's jobs end to end: batch → infer (in a thread, with a deadline) → route → result.

Thread model: everything here runs on the event loop except ``Backend.infer_batch``,
which runs in a worker thread.  A stuck inference does not stall the loop:
the jobs of that batch get an ``error`` result at ``timeout_s`` while the thread
keeps its concurrency slot until it really returns (so stuck threads cannot pile up).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
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
from edgeagent.redact import Redactor

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
    redacted: tuple[Any, dict[str, str], dict[str, int]] | None = None
    """``[input, local output]`` as they may leave the device, computed off the event loop
    (``Redactor.redact_value``); None: the escalator redacts when it needs to."""
    no_room: bool = False
    """The task's escalation budget was spent when this was routed: the escalator treats
    it as over budget (and nothing was redacted for it)."""


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
        self.redactor: Redactor | None = None
        """Set by the daemon: what this task's cloud requests are redacted with."""
        self.may_escalate: Callable[[], bool] = lambda: True
        """Set by the daemon: False when budget or in-flight cap would refuse escalations
        now (redacting for them would be wasted work)."""

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
                except (TimeoutError, asyncio.TimeoutError):  # distinct classes on 3.10
                    break
            try:
                outcomes = await self._redact_for_cloud(await self._run_batch(batch))
            except Exception:  # a bug on one batch must not end the worker (and the task)
                log.exception("task.batch_failed", task=self.name, batch=len(batch))
                err = ErrorInfo(code="internal_error", message="the daemon failed on this job")
                outcomes = [Outcome(p, self._result(p, "error", error=err)) for p in batch]
            deliver(outcomes)

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
        except (TimeoutError, asyncio.TimeoutError):  # distinct classes on 3.10
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
            try:
                outcomes.append(self._route(p, pred))
            except Exception:  # one odd prediction must not cost the batch its answers
                log.exception("task.route_failed", task=self.name, job_id=p.job.id)
                err = ErrorInfo(code="internal_error", message="the daemon failed on this job")
                outcomes.append(Outcome(p, self._result(p, "error", error=err)))
        return outcomes

    async def _redact_for_cloud(self, outcomes: list[Outcome]) -> list[Outcome]:
        """Redact, in a worker thread, what may leave the device: escalations and (with
        ``audit_rate``) confident answers.  Redaction is linear in the input but pure
        Python (phone numbers: up to ~0.5 s for a crafted 16 KiB input), so it must not
        run on the event loop, where every task would wait for it."""
        redactor = self.redactor
        if redactor is None or not self.cloud_available:
            return outcomes
        audits = self.config.audit_rate > 0
        todo = [i for i, o in enumerate(outcomes) if o.escalate or (audits and o.cacheable)]
        if not todo:
            return outcomes
        if not self.may_escalate():  # decided now, so nothing is redacted on the loop later
            return [
                dataclasses.replace(o, no_room=True) if i in todo else o
                for i, o in enumerate(outcomes)
            ]

        def run() -> list[tuple[Any, dict[str, str], dict[str, int]]]:
            return [
                redactor.redact_value(
                    [o.pending.job.input, o.prediction.output if o.prediction else None]
                )
                for o in (outcomes[i] for i in todo)
            ]

        try:
            done = await asyncio.to_thread(run)
        except Exception:  # the escalator redacts on the loop instead
            log.exception("redaction.failed", task=self.name)
            return outcomes
        out = list(outcomes)
        for i, red in zip(todo, done, strict=True):
            out[i] = dataclasses.replace(out[i], redacted=red)
        return out

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
            out_of_scope=self.config.out_of_scope,
        )
        if route.action == "answer":
            res = self._result(p, "ok", output=pred.output, confidence=pred.confidence)
            return Outcome(p, res, cacheable=True, prediction=pred)
        reason = route.reason or "low_confidence"
        declined = route.action == "decline"
        message = router.DECLINED_MESSAGE if declined else unrecognized_message(reason, pred)
        err = ErrorInfo(code=reason, message=message)
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
