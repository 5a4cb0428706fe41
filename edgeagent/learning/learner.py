"""The daemon's learner: counts learned examples, runs refit rounds, swaps promotions in.

Thread model: everything here runs on the event loop except the embedding of inputs for
the instant memory (``asyncio.to_thread``) and the refit itself, which runs in a child
process (``python -m edgeagent.learning.refit``: one thread, niced, address space capped),
so a round never stalls jobs.  One round runs at a time, all tasks together.

Life of a round::

    examples stored (escalation.on_reply → on_example) → every_examples new, or every_s
    → bounds applied to the store → job file → child: fit, judge, maybe publish a version
    → rounds.jsonl + metrics → promoted: the daemon reloads that task on the new version
      (new fingerprint: cached answers of the old model are never served)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeagent.learning.examples import learnable
from edgeagent.learning.gate import CAN_PAUSE, GateStats, yield_to_jobs
from edgeagent.learning.refit import FAILED, PARENT_ENV, PROMOTED
from edgeagent.learning.versions import (
    current,
    prune,
    serving_bundle,
    task_dir,
    versions_dir,
)
from edgeagent.logs import get_logger

if TYPE_CHECKING:
    from edgeagent.config import TaskConfig
    from edgeagent.metrics import Metrics
    from edgeagent.pipeline import TaskRuntime
    from edgeagent.store import Store

log = get_logger("edgeagent.learning")

ROUNDS_FILE = "rounds.jsonl"
MAX_ROUNDS_KEPT = 500
POLL_S = 0.5
ROLLBACK_CHECK_S = 2.0
MEMORY_CHUNK = 64
THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
}


def read_rounds(state_dir: Path, task: str) -> list[dict[str, Any]]:
    """The task's round records, oldest first (unreadable lines skipped)."""
    path = task_dir(state_dir, task) / ROUNDS_FILE
    out: list[dict[str, Any]] = []
    if not path.exists():
        return out
    for line in path.read_text("utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if isinstance(rec, dict):
                out.append(rec)
    return out


def append_round(state_dir: Path, task: str, record: dict[str, Any]) -> None:
    """Append a record to ``rounds.jsonl`` (rewritten, bounded, when it grows too long)."""
    path = task_dir(state_dir, task) / ROUNDS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
    rounds = read_rounds(state_dir, task)
    if len(rounds) > MAX_ROUNDS_KEPT:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            "".join(json.dumps(r, sort_keys=True) + "\n" for r in rounds[-MAX_ROUNDS_KEPT:]),
            "utf-8",
        )
        tmp.replace(path)


class Learner:
    """Owned by the daemon; see the module docstring."""

    def __init__(
        self, state_dir: Path, metrics: Metrics, busy: Callable[[], bool] | None = None
    ) -> None:
        self.state_dir = state_dir
        self.metrics = metrics
        self.busy = busy
        """True while the daemon has jobs in flight: the refit is paused then
        (``learn.refit_yield_ms``; None: never paused)."""
        self._new: dict[str, int] = {}
        self._last_round_at: dict[str, float] = {}
        self._round_no: dict[str, int] = {}
        self._memory_queue: dict[str, list[tuple[str, str]]] = {}
        self._backfill: weakref.WeakSet[Any] = weakref.WeakSet()  # backends to fill
        self._learning: set[str] = set()
        self._few_shot: set[str] = set()  # GGUF tasks whose prompts get learned examples
        self._shot_queue: dict[str, list[tuple[str, Any]]] = {}
        self._shot_new: weakref.WeakSet[Any] = weakref.WeakSet()  # backends to equip
        self._configured: dict[str, Path] = {}  # task -> bundle its config names
        self._checked_at = 0.0
        self._seen_link: dict[str, Path | None] = {}  # task -> `latest` target last seen
        self._round: asyncio.Task[None] | None = None

    # -- hooks the daemon calls -------------------------------------------------------

    def serving_config(self, name: str, cfg: TaskConfig) -> TaskConfig:
        """The task's config with its bundle replaced by the current learned version (when
        the task learns and a version descends from the configured bundle)."""
        from edgeagent.backends.onnx import OnnxBackendConfig

        b = cfg.backend
        if not cfg.learn.enabled or not isinstance(b, OnnxBackendConfig):
            return cfg
        self._configured[name] = b.bundle
        bundle = serving_bundle(b.bundle, versions_dir(self.state_dir, name))
        if bundle == b.bundle:
            return cfg
        log.info("learn.serving_version", task=name, bundle=str(bundle))
        return cfg.model_copy(update={"backend": b.model_copy(update={"bundle": bundle})})

    def attach(self, name: str, rt: TaskRuntime) -> None:
        """A runtime of a learning task was built (loop thread): give its classifier an
        instant memory, filled first with the examples its head has not learned yet."""
        cfg = rt.config.learn
        if cfg.few_shot and hasattr(rt.backend, "few_shot"):
            self._few_shot.add(name)
            self._shot_new.add(rt.backend)  # its selector is built off the loop (run)
        if not cfg.enabled:
            return
        self._learning.add(name)
        if cfg.memory and hasattr(rt.backend, "memory"):
            from edgeagent.learning.memory import InstantMemory

            oos = getattr(rt.backend, "oos_label", None)
            rt.backend.memory = InstantMemory(cfg.memory_min_cos, cfg.memory_max, oos)
            self._backfill.add(rt.backend)

    def on_example(self, task: str, input: Any, output: Any, reason: str) -> None:
        """A cloud answer was kept as a labelled example (loop thread, inside its
        transaction): count it towards the next round and remember it at once."""
        if task in self._few_shot and isinstance(input, str):
            self._shot_queue.setdefault(task, []).append((input, output))
        if task not in self._learning:
            return
        self._new[task] = self._new.get(task, 0) + 1
        label = output.get("label") if isinstance(output, dict) else None
        if isinstance(input, str) and isinstance(label, str):
            self._memory_queue.setdefault(task, []).append((input, label))

    # -- the learner's own task ------------------------------------------------------

    async def run(
        self,
        store: Store,
        runtimes: Callable[[], dict[str, TaskRuntime]],
        swap: Callable[[str], Awaitable[bool]],
    ) -> None:
        """Until cancelled: feed the instant memories, start rounds when they are due."""
        try:
            self._recover(store, runtimes())
            while True:
                learning = {n: rt for n, rt in runtimes().items() if rt.config.learn.enabled}
                self._learning = set(learning)
                for name, rt in learning.items():
                    await self._feed_memory(store, name, rt)
                for name, rt in runtimes().items():
                    if rt.config.learn.few_shot and hasattr(rt.backend, "few_shot"):
                        await self._feed_few_shot(store, name, rt)
                if self._round is None or self._round.done():
                    await self._follow_rollback(learning, swap)
                    for name, rt in learning.items():
                        if self._due(name, rt):
                            self._round = asyncio.get_running_loop().create_task(
                                self._run_round(name, rt, store, swap),
                                name=f"learn:round:{name}",
                            )
                            break
                await asyncio.sleep(POLL_S)
        finally:
            if self._round is not None and not self._round.done():
                self._round.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._round

    def _recover(self, store: Store, runtimes: dict[str, TaskRuntime]) -> None:
        """Round numbers and examples not yet seen by a round, from the rounds log."""
        for name, rt in runtimes.items():
            if not rt.config.learn.enabled:
                continue
            rounds = [r for r in read_rounds(self.state_dir, name) if "round" in r]
            last = rounds[-1] if rounds else {}
            self._round_no[name] = int(last.get("round", 0))
            self._last_round_at[name] = float(last.get("at", time.time()))
            after = int(last.get("max_seq", 0))
            rows = store.learn_examples(name)
            self._new[name] = self._new.get(name, 0) + sum(1 for r in rows if r[0] > after)
            self.metrics.learn_examples.labels(name).set(len(rows))
            log.info("learn.ready", task=name, rounds=self._round_no[name], new=self._new[name])

    async def _follow_rollback(
        self, runtimes: dict[str, TaskRuntime], swap: Callable[[str], Awaitable[bool]]
    ) -> None:
        """`edgeagent learn rollback` moved ``latest``: serve what it points at now
        (checked every ``ROLLBACK_CHECK_S``; a SIGHUP does the same at once)."""
        if time.monotonic() - self._checked_at < ROLLBACK_CHECK_S:
            return
        self._checked_at = time.monotonic()
        for name, rt in runtimes.items():
            configured = self._configured.get(name)
            serving = getattr(rt.config.backend, "bundle", None)
            if configured is None or serving is None:
                continue
            vdir = versions_dir(self.state_dir, name)
            link = current(vdir)
            if name in self._seen_link and self._seen_link[name] == link:
                continue  # unchanged: no need to hash the bundle files again
            self._seen_link[name] = link
            # Hashing a version's files takes ~0.1 s: never on the event loop.
            want = await asyncio.to_thread(serving_bundle, configured, vdir)
            if Path(want) != Path(serving):
                log.info("learn.version_changed", task=name, bundle=str(want))
                await swap(name)

    def _due(self, name: str, rt: TaskRuntime) -> bool:
        cfg = rt.config.learn
        new = self._new.get(name, 0)
        if new >= cfg.every_examples:
            return True
        waited = time.time() - self._last_round_at.get(name, time.time())
        return new >= cfg.min_new_examples and waited >= cfg.every_s

    async def _feed_memory(self, store: Store, name: str, rt: TaskRuntime) -> None:
        """Embed (worker thread) a chunk of new cloud answers into the task's memory."""
        backend: Any = rt.backend
        memory = getattr(backend, "memory", None)
        queue = self._memory_queue.setdefault(name, [])
        if memory is None:
            queue.clear()
            return
        if backend in self._backfill:
            self._backfill.discard(backend)
            queue[:0] = self._unlearned(store, rt)
        items = queue[:MEMORY_CHUNK]
        if not items:
            return
        del queue[: len(items)]
        emb = await asyncio.to_thread(backend.embed, [t for t, _ in items])
        memory.add(emb, [lb for _, lb in items])
        log.info("learn.remembered", task=name, added=len(items), size=len(memory))

    async def _feed_few_shot(self, store: Store, name: str, rt: TaskRuntime) -> None:
        """Give a new GGUF runtime its few-shot selector, filled with the task's stored
        cloud answers (built in a worker thread), then add new answers as they come."""
        from edgeagent.learning.fewshot import NearestAnswers

        backend: Any = rt.backend
        queue = self._shot_queue.setdefault(name, [])
        if backend in self._shot_new:
            self._shot_new.discard(backend)
            cfg = rt.config.learn
            queue.clear()  # what arrives from now on is added below; the rest is in `rows`
            rows = [(r[1], r[2]) for r in store.learn_examples(name) if isinstance(r[1], str)]
            encoder = cfg.few_shot_encoder
            assert encoder is not None  # LearnConfig checks it

            def build() -> NearestAnswers:
                sel = NearestAnswers.from_bundle(
                    encoder, cfg.few_shot, cfg.few_shot_min_cos, cfg.few_shot_max
                )
                sel.add(rows[-cfg.few_shot_max :])
                return sel

            try:
                backend.few_shot = await asyncio.to_thread(build)
            except Exception as exc:  # a bad encoder bundle: the task answers without shots
                log.error("learn.few_shot_unavailable", task=name, error=str(exc)[:300])
                return
            log.info("learn.few_shot_ready", task=name, examples=len(backend.few_shot))
        selector = backend.few_shot
        items = queue[:MEMORY_CHUNK]
        if selector is None or not items:
            return
        del queue[: len(items)]
        await asyncio.to_thread(selector.add, items)

    def _unlearned(self, store: Store, rt: TaskRuntime) -> list[tuple[str, str]]:
        """Examples the serving head was not fitted on (newer than its round's snapshot)."""
        after = 0
        serving = getattr(rt.config.backend, "bundle", None)
        for r in read_rounds(self.state_dir, rt.name):
            promoted = r.get("outcome") == PROMOTED and serving is not None
            if promoted and Path(str(r.get("bundle"))).name == Path(str(serving)).name:
                after = int(r.get("max_seq", 0))
        out: list[tuple[str, str]] = []
        for seq, inp, outp, _reason, _t in store.learn_examples(rt.name):
            label = outp.get("label") if isinstance(outp, dict) else None
            if seq > after and isinstance(inp, str) and isinstance(label, str):
                out.append((inp, label))
        return out[-rt.config.learn.memory_max :]

    # -- one round ------------------------------------------------------------------

    async def _run_round(
        self, name: str, rt: TaskRuntime, store: Store, swap: Callable[[str], Awaitable[bool]]
    ) -> None:
        cfg = rt.config.learn
        number = self._round_no.get(name, 0) + 1
        self._round_no[name] = number
        self._new[name] = 0
        self._last_round_at[name] = time.time()
        rows = store.learn_examples(name)
        kept, drop = learnable(name, rows, cfg, set(rt.labels))
        if drop:
            store.delete_examples(drop)
            log.info("learn.examples_dropped", task=name, dropped=len(drop))
        self.metrics.learn_examples.labels(name).set(len(rows) - len(drop))
        tdir = task_dir(self.state_dir, name)
        job_path, result_path = tdir / "round-job.json", tdir / "round-result.json"
        b = rt.config.backend
        job = {
            "task": name,
            "round": number,
            "serving_bundle": str(getattr(b, "bundle", "")),
            "versions_dir": str(versions_dir(self.state_dir, name)),
            "examples": [
                {"text": e.text, "label": e.label, "split": e.split, "audit": e.audit} for e in kept
            ],
            "audit_rate": rt.config.audit_rate,
            "learn": cfg.model_dump(mode="json"),
            "threshold": rt.config.threshold,
            "oos_distance": getattr(b, "oos_distance", True),
            "use_bundle_threshold": getattr(b, "use_bundle_threshold", True),
            "max_length": getattr(b, "max_length", 128),
            "limits": {
                "nice": cfg.refit_nice,
                "idle": cfg.refit_idle,
                "max_memory_mb": cfg.refit_max_memory_mb,
            },
        }
        await asyncio.to_thread(_write_job, job_path, result_path, job)
        log.info("learn.round_started", task=name, round=number, examples=len(kept))
        record = await self._child(job_path, result_path, cfg)
        record.setdefault("task", name)
        record.setdefault("round", number)
        record["max_seq"] = max((r[0] for r in rows), default=0)
        record["at"] = time.time()
        outcome = str(record.get("outcome", FAILED))
        self.metrics.learn_rounds.labels(name, outcome).inc()
        hold = (record.get("evaluation") or {}).get("learned_holdout")
        if hold:
            side = "candidate" if outcome == PROMOTED else "serving"
            self.metrics.learn_holdout_accuracy.labels(name).set(hold[side]["local_accuracy"])
        if outcome == PROMOTED:
            gone = prune(versions_dir(self.state_dir, name), cfg.keep_versions)
            record["pruned"] = [p.name for p in gone]
        append_round(self.state_dir, name, record)
        log.info(
            "learn.round_done",
            task=name,
            round=number,
            outcome=outcome,
            why=record.get("why"),
            seconds=record.get("seconds"),
            peak_rss_mb=record.get("peak_rss_mb"),
        )
        if outcome == PROMOTED:
            configured = self._configured.get(name)
            if configured is not None:  # hash the new version here, not on the loop
                await asyncio.to_thread(
                    serving_bundle, configured, versions_dir(self.state_dir, name)
                )
            swapped = await swap(name)
            log.info("learn.promoted", task=name, bundle=record.get("bundle"), swapped=swapped)

    async def _child(self, job_path: Path, result_path: Path, cfg: Any) -> dict[str, Any]:
        """Run the refit process (paused while jobs are in flight, see
        :mod:`edgeagent.learning.gate`); its result record, or a ``failed`` one."""
        timeout_s = cfg.refit_timeout_s
        env = {**os.environ, **THREAD_ENV, PARENT_ENV: str(os.getpid())}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "edgeagent.learning.refit",
            str(job_path),
            str(result_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        log.info("learn.refit_spawned", pid=proc.pid, job=str(job_path))
        stats = GateStats()
        gate = None
        if self.busy is not None and cfg.refit_yield_ms > 0 and CAN_PAUSE:
            gate = asyncio.get_running_loop().create_task(
                yield_to_jobs(
                    proc.pid, self.busy, cfg.refit_yield_ms / 1000, cfg.refit_min_share, stats
                )
            )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), timeout_s)
        except TimeoutError:
            await _stop_gate(gate)
            proc.kill()
            await proc.wait()
            return {"outcome": FAILED, "why": f"refit took longer than {timeout_s:g} s"}
        except asyncio.CancelledError:
            await _stop_gate(gate)
            proc.kill()
            await proc.wait()
            raise
        await _stop_gate(gate)
        record = await asyncio.to_thread(_read_result, result_path, proc.returncode, err)
        if gate is not None:
            record["yielded"] = stats.as_dict()
        return record


async def _stop_gate(gate: asyncio.Task[None] | None) -> None:
    """Cancel the gate (it leaves the refit running) and wait for it."""
    if gate is not None:
        gate.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gate


def _write_job(job_path: Path, result_path: Path, job: dict[str, Any]) -> None:
    job_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    job_path.write_text(json.dumps(job, ensure_ascii=False), "utf-8")


def _read_result(result_path: Path, returncode: int | None, err: bytes | None) -> dict[str, Any]:
    """The child's result record, or a ``failed`` one saying why there is none."""
    if returncode != 0 or not result_path.exists():
        tail = (err or b"").decode(errors="replace").strip().splitlines()[-3:]
        return {"outcome": FAILED, "why": f"refit exited {returncode}: {' | '.join(tail)}"}
    try:
        record: dict[str, Any] = json.loads(result_path.read_text("utf-8"))
    except ValueError as exc:
        return {"outcome": FAILED, "why": f"unreadable refit result: {exc}"}
    return record
