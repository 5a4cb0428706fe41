"""The job path at its seams: the pipeline with a fake broker, a fake supervisor (the
daemon's side), a fake backend and SQLite on disk; no broker, no subprocess.

Each test drives the steps by name (receive → commit(admit) → schedule → route →
deliver/commit(settle) → pump → PUBACK) and checks what a consumer would see on the
wire: every status (ok, unrecognized, rejected, error, expired, provisional), cache
hits, replays, the cloud's answers, and that nothing is acknowledged or published
before the commit that holds it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeagent import pipeline
from edgeagent.backends.base import INLINE_MAX_CHARS, Prediction
from edgeagent.config import load_settings
from edgeagent.escalation import Escalator
from edgeagent.metrics import Metrics
from edgeagent.mqtt import Inbound
from edgeagent.pipeline import Outcome, PendingJob, Pipeline, TaskRuntime, Work, expired
from edgeagent.protocol import Job, Limits, Topics
from edgeagent.redact import Redactor
from edgeagent.store import Store, StoreUnavailable, Transaction
from tests.harness import write_config

TASK = """
[tasks.t]
kind = "classify"
labels = ["a", "b", "oos"]
threshold = 0.5
offline = "provisional"
[tasks.t.backend]
type = "rules"
rules = [{label = "a", keywords = ["a"]}]
"""


class FakeBackend:
    model_id = "fake@1"
    fingerprint = "f1"

    def load(self) -> None: ...
    def warmup(self) -> None: ...
    def close(self) -> None: ...

    def infer_batch(self, inputs: list[Any]) -> list[Prediction]:
        return [Prediction({"label": "a"}, 0.9) for _ in inputs]


class FakeBroker:
    """Records publishes (each gets a packet id) and acknowledgements."""

    def __init__(self) -> None:
        self.connected = True
        self.published: list[tuple[int, str, dict[str, Any], bytes | None]] = []
        self.acked: list[int] = []

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation: bytes | None = None,
        response_topic: str | None = None,
    ) -> int | None:
        mid = len(self.published) + 1
        self.published.append((mid, topic, json.loads(payload), correlation))
        return mid

    def ack(self, message: Inbound) -> None:
        self.acked.append(message.mid)

    def results(self) -> list[dict[str, Any]]:
        return [p for _, topic, p, _ in self.published if "/cloud/" not in topic]

    def requests(self) -> list[dict[str, Any]]:
        return [p for _, topic, p, _ in self.published if "/cloud/requests/" in topic]


class FakeSupervisor:
    """The daemon's side: intake open, store writable, store failures recorded."""

    def __init__(self) -> None:
        self.degraded: str | None = None
        self.open = True
        self.troubles: list[str] = []

    def accepting(self) -> bool:
        return self.open

    def store_trouble(self, exc: BaseException, where: str) -> None:
        self.troubles.append(where)
        if isinstance(exc, StoreUnavailable):
            self.degraded = exc.reason


class Rig:
    """A pipeline wired like the daemon does it, with the fakes."""

    def __init__(self, tmp_path: Path, *, cloud: bool, synchronous: str = "normal") -> None:
        extra = "[cloud]\nenabled = true\nassume_online = false\n" if cloud else ""
        cfg = write_config(
            tmp_path / "c.toml", port=1, state_dir=tmp_path, device="d1", tasks=TASK, extra=extra
        )
        settings, _ = load_settings(cfg)
        self.metrics = Metrics()
        topics = Topics("edgeagent", "d1")
        limits = Limits(65536, 16384, 30000, 600000)
        self.escalator = Escalator(settings.cloud, topics, "d1", self.metrics)
        self.supervisor = FakeSupervisor()
        self.broker = FakeBroker()
        self.store = Store(tmp_path / "edgeagent.db", synchronous=synchronous)
        self.rt = TaskRuntime("t", settings.tasks["t"], FakeBackend(), self.metrics)  # type: ignore[arg-type]
        self.escalator.configure({"t": self.rt.config})
        self.rt.cloud_available = self.escalator.usable(self.rt.config)
        self.p = Pipeline(settings, topics, limits, self.metrics, self.escalator, self.supervisor)
        self.p.store, self.p.mqtt, self.p.runtimes = self.store, self.broker, {"t": self.rt}
        self.mid = 0
        self.loop = asyncio.new_event_loop()

    def turn(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` on the event loop, then let the turn's group commit (and whatever its
        callbacks start) run."""

        async def main() -> None:
            fn(*args)
            quiet = 0
            while quiet < 5:  # a few turns in a row with no commit queued or running
                await asyncio.sleep(0 if quiet else 0.001)
                c = self.p.committer
                busy = c is not None and (c.pending or getattr(c, "busy", False))
                quiet = 0 if busy else quiet + 1

        self.loop.run_until_complete(main())

    def commit(self, work: Work) -> bool:
        """Step 8 for ``work``; True if it committed."""
        self.turn(self.p.commit, work)
        return not work.failed

    def msg(self, payload: dict[str, Any] | bytes, *, task: str = "t") -> Inbound:
        self.mid += 1
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return Inbound(f"edgeagent/d1/jobs/{task}", body, 1, self.mid, False, 0)

    def queued(self) -> list[PendingJob]:
        out = []
        while not self.rt.queue.empty():
            out.append(self.rt.queue.get_nowait())
        return out

    def run(self, prediction: Prediction) -> None:
        """Step 5-7 for every queued job: this prediction, routed, delivered."""
        self.turn(self.p.deliver, [self.rt._route(p, prediction) for p in self.queued()])

    def close(self) -> None:
        self.turn(self.p.close)
        self.loop.close()
        self.store.close()
        self.rt.close()


@pytest.fixture(params=["normal", "full"])
def rig(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Rig]:
    """Both store modes: ``full`` commits with an fsync (possibly off the loop)."""
    r = Rig(tmp_path, cloud=False, synchronous=request.param)
    yield r
    r.close()


@pytest.fixture(params=["normal", "full"])
def cloud_rig(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Rig]:
    r = Rig(tmp_path, cloud=True, synchronous=request.param)
    yield r
    r.close()


def only(results: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(results) == 1, results
    return results[0]


# -- statuses ----------------------------------------------------------------------------


def test_ok_is_acked_after_the_journal_commit_then_answered_cached_and_counted(rig: Rig) -> None:
    m = rig.msg({"id": "j1", "input": "say a"})
    rig.p.receive(m)
    assert rig.broker.acked == []  # waiting in the inbox: not acknowledged
    assert rig.commit(Work(messages=list(rig.p.inbox)))
    rig.p.inbox.clear()
    assert rig.broker.acked == [m.mid] and rig.store.open_job_count() == 1
    assert rig.p.open == {"j1"}
    rig.run(Prediction({"label": "a"}, 0.9))
    res = only(rig.broker.results())
    assert (res["status"], res["source"], res["output"]) == ("ok", "local", {"label": "a"})
    assert res["model"] == "fake@1" and res["latency_ms"] >= 0
    assert rig.p.open == set() and rig.store.open_job_count() == 0
    assert rig.p.tally.by_status == {"ok": 1} and rig.p.tally.by_source == {"local": 1}
    # The same input again: answered from the cache at admission, never scheduled.
    assert rig.commit(Work(messages=[rig.msg({"id": "j2", "input": "say   a"})]))
    assert rig.queued() == []
    hit = rig.broker.results()[-1]
    assert (hit["id"], hit["status"], hit["source"]) == ("j2", "ok", "cache")
    assert rig.p.tally.cache_hits == 1


def test_low_confidence_without_cloud_is_unrecognized_and_not_cached(rig: Rig) -> None:
    rig.commit(Work(messages=[rig.msg({"id": "j1", "input": "hmm"})]))
    rig.run(Prediction({"label": "b"}, 0.2))
    res = only(rig.broker.results())
    assert res["status"] == "unrecognized" and res["output"] is None
    assert res["error"]["code"] == "low_confidence"
    assert rig.p.tally.reasons == {"low_confidence": 1}
    rig.commit(Work(messages=[rig.msg({"id": "j2", "input": "hmm"})]))
    assert [p.job.id for p in rig.queued()] == ["j2"]  # no cache entry was made


def test_invalid_jobs_and_removed_tasks_are_rejected(rig: Rig) -> None:
    rig.commit(
        Work(messages=[rig.msg(b"{not json"), rig.msg({"id": "x", "input": "a"}, task="nope")])
    )
    codes = [(r["status"], r["error"]["code"]) for r in rig.broker.results()]
    assert codes == [("rejected", "not_json"), ("rejected", "unknown_task")]
    assert rig.queued() == [] and len(rig.broker.acked) == 2
    # A journaled job whose task a reload removed: rejected when it is scheduled.
    rig.commit(Work(messages=[rig.msg({"id": "j1", "input": "a"})]))
    [p] = rig.queued()
    rig.p.open.discard("j1")
    rig.p.runtimes = {}
    rig.turn(rig.p.schedule, p.job, p.received_at)
    res = rig.broker.results()[-1]
    assert (res["id"], res["status"], res["error"]["code"]) == ("j1", "rejected", "unknown_task")
    assert rig.p.tally.by_status == {"rejected": 3} and rig.p.open == set()


def test_an_expired_job_is_answered_expired(rig: Rig) -> None:
    rig.commit(Work(messages=[rig.msg({"id": "j1", "input": "a"})]))
    [p] = rig.queued()
    rig.turn(rig.p.deliver, [Outcome(p, expired(p, "t"))])
    res = only(rig.broker.results())
    assert res["status"] == "expired" and res["error"]["code"] == "deadline_exceeded"


def test_a_bug_while_settling_answers_error_and_spares_the_batch(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig.commit(Work(messages=[rig.msg({"id": f"j{i}", "input": "a"}) for i in (1, 2)]))
    real = rig.escalator.wants_audit
    calls = []

    def audit_once_broken(task: Any) -> bool:
        calls.append(task)
        if len(calls) == 1:
            raise RuntimeError("a bug of ours")
        return real(task)

    monkeypatch.setattr(rig.escalator, "wants_audit", audit_once_broken)
    rig.run(Prediction({"label": "a"}, 0.9))
    by_id = {r["id"]: r for r in rig.broker.results()}
    assert by_id["j1"]["status"] == "error" and by_id["j1"]["error"]["code"] == "internal_error"
    assert by_id["j2"]["status"] == "ok"
    assert len(rig.broker.results()) == 2  # j1's rolled-back answer never went out


def test_a_replayed_id_gets_the_stored_result_again(rig: Rig) -> None:
    rig.commit(Work(messages=[rig.msg({"id": "j1", "input": "a"})]))
    rig.run(Prediction({"label": "a"}, 0.9))
    rig.commit(Work(messages=[rig.msg({"id": "j1", "input": "a"})]))
    assert rig.queued() == []
    first, again = rig.broker.results()
    assert first == again
    assert rig.p.tally.by_status == {"ok": 1}  # a replay is not a new job


def test_work_of_one_loop_turn_shares_one_commit(rig: Rig) -> None:
    rig.commit(Work(messages=[rig.msg({"id": "j1", "input": "a"})]))
    [p] = rig.queued()
    assert rig.p.committer is not None
    before = rig.p.committer.commits

    def arrive_and_finish() -> None:
        rig.p.receive(rig.msg({"id": "j2", "input": "a b"}))
        rig.p.commit(Work(messages=[rig.p.inbox.popleft()]))
        rig.p.deliver([rig.rt._route(p, Prediction({"label": "a"}, 0.9))])

    rig.turn(arrive_and_finish)
    assert rig.p.committer.commits == before + 1  # one transaction for both
    assert [r["id"] for r in rig.broker.results()] == ["j1"] and len(rig.broker.acked) == 2
    assert [q.job.id for q in rig.queued()] == ["j2"]
    assert not Work(acked=[1]).durable and Work(tick=True).durable


# -- store failures ----------------------------------------------------------------------


def test_nothing_is_acked_or_published_when_the_commit_fails(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*a: Any, **kw: Any) -> Any:
        raise StoreUnavailable("disk full", "full")

    m = rig.msg({"id": "j1", "input": "a"})
    monkeypatch.setattr(Transaction, "admit", full)
    rig.p.receive(m)
    assert not rig.commit(Work(messages=[rig.p.inbox.popleft()]))
    assert rig.broker.acked == [] and list(rig.p.inbox) == [m]  # back at the head, unacked
    assert rig.supervisor.troubles == ["intake"] and rig.supervisor.degraded == "disk_full"
    monkeypatch.undo()
    rig.supervisor.degraded = None
    assert rig.commit(Work(messages=[rig.p.inbox.popleft()]))
    assert rig.broker.acked == [m.mid]
    # Results computed while degraded wait in the stash, unpublished, until resume().
    rig.supervisor.degraded = "disk_full"
    rig.run(Prediction({"label": "a"}, 0.9))
    assert rig.broker.results() == [] and rig.p.waiting == 1 and rig.p.open == {"j1"}
    rig.supervisor.degraded = None
    rig.turn(rig.p.resume)
    assert only(rig.broker.results())["status"] == "ok" and rig.p.waiting == 0


def test_outbox_rows_go_only_after_the_brokers_puback(rig: Rig) -> None:
    rig.commit(Work(messages=[rig.msg({"id": "j1", "input": "a"})]))
    rig.run(Prediction({"label": "a"}, 0.9))
    assert rig.store.outbox_depth == 1 and len(rig.p.inflight) == 1
    assert not rig.p.pump()  # in flight already: not sent twice
    [mid] = rig.p.inflight
    rig.turn(rig.p.on_puback, mid)  # the delete is committed with a later group
    assert rig.store.outbox_depth == 0 and rig.p.inflight == {}


def test_a_refused_publish_becomes_a_dead_letter(rig: Rig) -> None:
    rig.commit(Work(messages=[rig.msg({"id": "j1", "input": "a"})]))
    rig.run(Prediction({"label": "a"}, 0.9))
    [mid] = rig.p.inflight
    rig.p.on_publish_refused(mid, 0x87, "Not authorized")
    assert rig.store.outbox_depth == 0
    rows = rig.store._db.execute("SELECT job_id, reason FROM dead_letters").fetchall()
    assert rows == [("j1", "Not authorized")]
    assert rig.metrics.dead_letters.labels("not_authorized")._value.get() == 1


# -- the cloud -------------------------------------------------------------------------------


def test_provisional_answer_then_the_clouds_answer_supersedes_it(cloud_rig: Rig) -> None:
    rig = cloud_rig
    rig.commit(Work(messages=[rig.msg({"id": "j1", "input": "hmm"})]))
    rig.run(Prediction({"label": "b"}, 0.2))  # cloud offline: offline = "provisional"
    first = only(rig.broker.results())
    assert first["provisional"] and first["status"] == "ok" and first["output"] == {"label": "b"}
    assert rig.broker.requests() == []  # unreachable: queued durably, not sent
    assert rig.escalator.in_flight == 1
    status = Inbound("edgeagent/cloud/status", b'{"state": "online"}', 1, 90, False, 0)
    rig.turn(rig.p.on_cloud_message, status)
    [request] = rig.broker.requests()
    esc_id = request["escalation_id"]
    row = rig.store.escalation(esc_id)
    assert row is not None and row.attempts == 1  # the re-send was counted in its commit
    body = {"escalation_id": esc_id, "status": "ok", "output": {"label": "a"}, "model": "big"}
    reply = Inbound("edgeagent/d1/cloud/replies", json.dumps(body).encode(), 1, 91, False, 0)
    rig.turn(rig.p.on_cloud_message, reply)
    assert rig.broker.acked[-2:] == [90, 91]
    second = rig.broker.results()[-1]
    assert (second["status"], second["source"], second["supersedes"]) == ("ok", "cloud", "j1")
    assert rig.escalator.in_flight == 0
    assert [e["cloud_output"] for e in rig.store.examples("t")] == [{"label": "a"}]
    # The cloud's answer is cached for the same input.
    rig.commit(Work(messages=[rig.msg({"id": "j2", "input": "hmm"})]))
    hit = rig.broker.results()[-1]
    assert (hit["id"], hit["source"], hit["output"]) == ("j2", "cache", {"label": "a"})


def test_a_job_waiting_for_the_cloud_gets_the_local_answer_at_its_deadline(
    cloud_rig: Rig,
) -> None:
    rig = cloud_rig
    rig.rt.config = rig.rt.config.model_copy(update={"offline": "wait"})
    rig.commit(Work(messages=[rig.msg({"id": "j1", "input": "hmm", "deadline_ms": 50})]))
    [p] = rig.queued()
    rig.turn(rig.p.deliver, [rig.rt._route(p, Prediction({"label": "b"}, 0.2))])
    assert rig.broker.results() == [] and rig.p.open == set()  # waits, durably
    time.sleep(0.06)
    rig.commit(Work(tick=True))
    res = only(rig.broker.results())
    assert res["status"] == "ok" and res["error"]["code"] == "cloud_timeout"
    assert res["output"] == {"label": "b"} and res["escalation"]["reason"] == "low_confidence"


def test_a_cloud_request_goes_out_only_with_the_commit_that_records_it(
    cloud_rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = cloud_rig
    rig.rt.config = rig.rt.config.model_copy(update={"offline": "wait"})
    online = Inbound("edgeagent/cloud/status", b'{"state": "online"}', 1, 90, False, 0)
    rig.turn(rig.p.on_cloud_message, online)
    rig.commit(Work(messages=[rig.msg({"id": "j1", "input": "hmm"})]))

    def full(*a: Any, **kw: Any) -> Any:
        raise StoreUnavailable("disk full", "full")

    monkeypatch.setattr(Transaction, "add_escalation", full)
    rig.run(Prediction({"label": "b"}, 0.2))
    assert rig.broker.requests() == [] and rig.p.waiting == 1  # nothing sent, nothing lost
    assert rig.escalator.in_flight == 0  # re-read from the journal after the rollback
    monkeypatch.undo()
    rig.supervisor.degraded = None
    rig.turn(rig.p.resume)
    [request] = rig.broker.requests()
    row = rig.store.escalation(request["escalation_id"])
    assert row is not None and row.state == "pending" and row.attempts == 1
    assert rig.broker.results() == [] and rig.escalator.in_flight == 1  # the job waits


def test_an_audit_request_follows_the_jobs_own_answer(cloud_rig: Rig) -> None:
    rig = cloud_rig
    rig.rt.config = rig.rt.config.model_copy(update={"audit_rate": 1.0})
    online = Inbound("edgeagent/cloud/status", b'{"state": "online"}', 1, 90, False, 0)
    rig.turn(rig.p.on_cloud_message, online)
    rig.commit(Work(messages=[rig.msg({"id": "j1", "input": "a"})]))
    rig.run(Prediction({"label": "a"}, 0.9))
    topics = [topic for _, topic, _, _ in rig.broker.published]
    assert topics == ["edgeagent/d1/results/t", "edgeagent/cloud/requests/t"]
    [request] = rig.broker.requests()
    row = rig.store.escalation(request["escalation_id"])
    assert row is not None and row.audit and row.job_id == "j1"
    assert only(rig.broker.results())["status"] == "ok"  # the job keeps its local answer


def test_a_cloud_message_our_code_fails_on_is_acked_and_changes_nothing(
    cloud_rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = cloud_rig

    def broken(*a: Any) -> Any:
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(rig.escalator, "on_reply", broken)
    reply = Inbound("edgeagent/d1/cloud/replies", b"{}", 1, 7, False, 0)
    assert rig.commit(Work(cloud=[reply]))
    assert rig.broker.acked == [7] and rig.broker.published == []


# -- the whole path, with the real loops --------------------------------------------------


def test_the_path_end_to_end_with_the_workers_and_loops(rig: Rig) -> None:
    async def scenario() -> list[dict[str, Any]]:
        rig.rt.start(rig.p.deliver)
        loops = [
            asyncio.create_task(rig.p.intake_loop(), name="test:intake"),
            asyncio.create_task(rig.p.outbox_loop(), name="test:outbox"),
        ]
        try:
            for i in range(20):
                rig.p.receive(rig.msg({"id": f"j{i}", "input": f"a {i}"}))
            for _ in range(500):
                if len(rig.broker.results()) == 20:
                    break
                await asyncio.sleep(0.01)
            return rig.broker.results()
        finally:
            for t in loops:
                t.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await rig.rt.stop()

    results = rig.loop.run_until_complete(scenario())
    assert sorted(r["id"] for r in results) == sorted(f"j{i}" for i in range(20))
    assert {r["status"] for r in results} == {"ok"}
    assert len(rig.broker.acked) == 20 and rig.p.open == set()


# -- inline backends -------------------------------------------------------------------------


class ThreadRecordingBackend(FakeBackend):
    """An ``inline`` backend that records the thread each batch runs on."""

    inline = True

    def __init__(self) -> None:
        self.threads: list[str] = []

    def infer_batch(self, inputs: list[Any]) -> list[Prediction]:
        self.threads.append(threading.current_thread().name)
        return super().infer_batch(inputs)


def test_an_inline_backend_answers_small_batches_on_the_loop_and_large_ones_in_a_thread(
    rig: Rig,
) -> None:
    backend = ThreadRecordingBackend()
    rt = TaskRuntime("t", rig.rt.config, backend, rig.metrics)  # type: ignore[arg-type]
    try:
        small = rig.loop.run_until_complete(rt._infer(["say a", {"text": "a"}]))
        big = rig.loop.run_until_complete(rt._infer(["a" * (INLINE_MAX_CHARS + 1)]))
        obj = rig.loop.run_until_complete(rt._infer([{"text": "a", "n": 1}]))
    finally:
        rt.close()
    assert len(small) == 2 and len(big) == 1 and len(obj) == 1
    loop_thread, big_thread, obj_thread = backend.threads
    assert loop_thread == "MainThread"  # the loop's thread: no hand-off
    assert big_thread.startswith("infer-t") and obj_thread.startswith("infer-t")


def test_an_inline_backend_answers_at_admission_in_the_same_commit(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Journal entry and result in one commit: acknowledged and published only after it;
    never scheduled.  Inputs over the inline size are left to the task's workers."""
    backend = ThreadRecordingBackend()
    rt = TaskRuntime("t", rig.rt.config, backend, rig.metrics)  # type: ignore[arg-type]
    rig.p.runtimes = {"t": rt}
    seen: list[tuple[list[int], int]] = []
    real_commit = rig.store.commit

    def commit(tx: Transaction) -> None:  # what the broker had when each commit ran
        seen.append((list(rig.broker.acked), len(rig.broker.published)))
        real_commit(tx)

    monkeypatch.setattr(rig.store, "commit", commit)
    big = "a" * (INLINE_MAX_CHARS + 1)
    try:
        msgs = [rig.msg({"id": "j1", "input": "say a"}), rig.msg({"id": "j2", "input": big})]
        assert rig.commit(Work(messages=msgs))
        assert seen == [([], 0)]  # one commit, before any acknowledgement or publish
        assert rig.broker.acked == [m.mid for m in msgs]
        assert [(r["id"], r["status"]) for r in rig.broker.results()] == [("j1", "ok")]
        assert rig.store.open_job_count() == 1 and rig.p.open == {"j2"}
        assert [p.job.id for p in _drain(rt)] == ["j2"]  # too long: the workers answer it
        assert backend.threads == ["MainThread"] and rig.p.tally.by_status == {"ok": 1}
    finally:
        rt.close()


def test_a_task_that_audits_its_answers_is_not_answered_at_admission(rig: Rig) -> None:
    """Its confident answers go to the cloud, redacted off the loop by the workers: answered
    at admission, each would be inferred a second time there."""
    backend = ThreadRecordingBackend()
    config = rig.rt.config.model_copy(update={"audit_rate": 0.5})
    rt = TaskRuntime("t", config, backend, rig.metrics)  # type: ignore[arg-type]
    rt.redactor, rt.cloud_available = Redactor(), True
    batch = [PendingJob(Job("j", "t", "say a", {}, 30000, "auto"), time.time())]
    try:
        assert rt.answer_inline(batch) == ([], batch)
        assert backend.threads == []  # no inference here
        rt.cloud_available = False  # nothing leaves the device: answered on the spot
        done, rest = rt.answer_inline(batch)
        assert [o.pending for o in done] == batch and rest == []
    finally:
        rt.close()


def _drain(rt: TaskRuntime) -> list[PendingJob]:
    out = []
    while not rt.queue.empty():
        out.append(rt.queue.get_nowait())
    return out


def test_small_batches_are_redacted_on_the_loop_and_large_ones_in_a_thread(
    cloud_rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = cloud_rig.rt
    rt.redactor = Redactor()
    hand_offs: list[Callable[[], Any]] = []
    real = asyncio.to_thread

    async def counting_to_thread(fn: Callable[[], Any]) -> Any:
        hand_offs.append(fn)
        return await real(fn)

    monkeypatch.setattr(pipeline.asyncio, "to_thread", counting_to_thread)
    pred = Prediction({"label": "b"}, 0.1)
    for text, threaded in [("mail bob@example.com", False), ("bob@example.com " * 20, True)]:
        pending = PendingJob(Job("j", "t", text, {}, 30000, "auto"), time.time())
        escalating = Outcome(pending, expired(pending, "t"), prediction=pred, escalate="low")
        (done,) = cloud_rig.loop.run_until_complete(rt._redact_for_cloud([escalating]))
        assert done.redacted is not None
        assert "bob@example.com" not in json.dumps(done.redacted[0])
        assert bool(hand_offs) is threaded
        hand_offs.clear()
