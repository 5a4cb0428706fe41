"""Issue 9: no message stops the daemon.  Property tests through the parser, the journal
(a real SQLite file) and the daemon's intake (its pipeline's one commit), plus the
store's error kinds.

The e2e side (the daemon subprocess over mosquitto) is in ``test_intake_e2e.py``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeagent import protocol
from edgeagent.config import load_settings
from edgeagent.daemon import Daemon
from edgeagent.metrics import Metrics
from edgeagent.mqtt import Inbound
from edgeagent.pipeline import TaskRuntime, Work
from edgeagent.protocol import Job, Limits, Rejection, ResultMessage, parse_job
from edgeagent.store import ReplyTarget, Store, StoreError, StoreUnavailable, cache_key, error_kind
from tests.harness import write_config
from tests.strategies import deep_payloads, hostile_payloads, huge_numbers

LIMITS = Limits(
    max_payload_bytes=65536, max_input_bytes=16384, default_deadline_ms=1000, max_deadline_ms=60000
)
TASKS = frozenset({"alarm", "reading"})
# Issue 9 item 1, the reproduction's payload verbatim (34 bytes; the "41-byte job"
# is the same job with spaces and another id).
SURROGATE_JOB = b'{"v":1,"id":"p1","input":"\\ud800"}'


def parse(payload: bytes, task: str = "alarm") -> Job | Rejection:
    return parse_job(payload, task=task, derived_id="d-x", limits=LIMITS, known_tasks=TASKS)


# -- the parser -------------------------------------------------------------------------


def test_the_41_byte_surrogate_job_is_rejected_not_raised() -> None:
    out = parse(SURROGATE_JOB)
    assert isinstance(out, Rejection) and out.code == "not_json" and out.id == "p1"
    assert "surrogate U+D800" in out.message and "input" in out.message
    for payload in (
        b'{"v":1,"id":"p2","input":{"\\udfff":"x"}}',  # in a key of an object input
        b'{"v":1,"id":"p3","input":"a","params":{"k":["\\ud83d"]}}',  # in params
        b'{"v":1,"id":"p4","input":"a","reply_to":"edgeagent/x/\\udc00"}',
    ):
        out = parse(payload)
        assert isinstance(out, Rejection) and out.code == "not_json", payload
        ResultMessage(id=out.id, task="alarm", status="rejected").to_bytes()
    # A valid pair is one character (U+1F600), not a lone surrogate.
    ok = parse(b'{"v":1,"id":"p5","input":"\\ud83d\\ude00"}')
    assert isinstance(ok, Job) and ok.input == "\U0001f600"


def test_each_kind_of_non_ijson_payload_has_a_clear_rejection() -> None:
    cases = {
        b'{"v":1,"input":"a","input":"b"}': "duplicate key 'input'",
        b'{"v":1,"input":"a","params":{"n":1e400}}': "out of range",
        b'{"v":1,"input":"a","params":{"n":-Infinity}}': "-Infinity is not a JSON number",
        b'{"v":1,"input":"a","params":{"n":' + b"9" * 5000 + b"}}": "digits",
        b'{"v":1,"input":"\xff"}': "not UTF-8",
        _deep(40): "nested deeper than 32",
        _deep(50_000): "nested deeper than 32",
    }
    for payload, text in cases.items():
        out = parse_job(
            payload,
            task="alarm",
            derived_id="d",
            limits=Limits(10**6, 10**6, 1, 1),
            known_tasks=TASKS,
        )
        assert isinstance(out, Rejection) and out.code == "not_json", (payload[:50], out)
        assert text in out.message, (text, out.message)
    # A UTF-8 byte order mark is ignored (RFC 8259 lets parsers do so).
    assert isinstance(parse(b'\xef\xbb\xbf{"v":1,"input":"a"}'), Job)
    # Large but in-range numbers are fine and survive the journal.
    big = parse(b'{"v":1,"input":"a","params":{"n":' + b"9" * 300 + b',"f":1e300}}')
    assert isinstance(big, Job) and big.params["n"] == int("9" * 300)


def _deep(depth: int) -> bytes:
    return b'{"v":1,"input":{"a":' + b"[" * depth + b"]" * depth + b"}}"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    s = Store(tmp_path_factory.mktemp("prop") / "edgeagent.db", synchronous="normal")
    yield s
    s.close()


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_payloads, st.sampled_from(["alarm", "reading", "nope"]))
def test_any_payload_is_a_job_or_a_rejection_and_a_job_round_trips_the_journal(
    store: Store, payload: bytes, task: str
) -> None:
    out = parse(payload, task)
    if isinstance(out, Rejection):
        assert out.code in protocol.REJECTION_CODES and out.message
        assert 1 <= len(out.id) <= 128
        # The rejection itself can always be serialised (and so published).
        ResultMessage(
            id=out.id,
            task=task,
            status="rejected",
            error={"code": out.code, "message": out.message},
        ).to_bytes().decode("utf-8")
        return
    assert isinstance(out, Job)
    job = dataclasses.replace(out, id=uuid.uuid4().hex)  # ids repeat across examples
    cache_key(job.task, "fp", job.input)
    with store.transaction() as tx:
        assert tx.admit(job, ReplyTarget("r/x", b"c"), redelivery=False).state == "new"
    assert store.job(job.id) == job


@settings(max_examples=200, deadline=None)
@given(st.one_of(deep_payloads, huge_numbers))
def test_deep_nesting_and_huge_numbers_never_raise(payload: bytes) -> None:
    out = parse(payload)
    assert isinstance(out, (Job, Rejection))
    if isinstance(out, Job):
        assert Job.from_json(out.to_json()) == out


# -- the daemon's intake, with a real store ------------------------------------------------
#
# Through the pipeline's one write path, as the daemon wires it: Pipeline.commit(Work(
# messages=...)) admits a batch in one transaction; once it is durable the jobs to run
# are scheduled on their tasks' queues and the results (rejections, cache hits) are in
# the outbox.  The daemon is the pipeline's supervisor (a store failure degrades it).


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    cfg = write_config(tmp_path / "c.toml", port=1, state_dir=tmp_path / "state", device="d1")
    s, path = load_settings(cfg)
    d = Daemon(s, path)
    d.store = Store(tmp_path / "state" / "edgeagent.db", synchronous="normal")
    d.runtimes = {name: TaskRuntime.build(name, tc, Metrics()) for name, tc in s.tasks.items()}
    for rt in d.runtimes.values():  # admission alone: the rules backend would answer at once
        rt.answers_at_admission = False
    yield d
    d.store.close()
    for rt in d.runtimes.values():
        rt.close()


def _msg(payload: bytes, task: str = "alarm", mid: int = 1) -> Inbound:
    return Inbound(f"edgeagent/d1/jobs/{task}", payload, 1, mid, False, 1)


def _intake(d: Daemon, msgs: list[Inbound]) -> list[Job]:
    """Admit ``msgs`` as one batch (one commit); the jobs it scheduled, in order."""
    work = Work(messages=msgs)

    async def turn() -> None:
        d.pipeline.commit(work)
        await asyncio.sleep(0)  # the group commit runs at the end of this turn

    asyncio.run(turn())
    scheduled = []
    for rt in d.runtimes.values():
        while not rt.queue.empty():
            scheduled.append(rt.queue.get_nowait().job)
    d.pipeline.open.clear()
    return scheduled


def _outbox(d: Daemon, after: int = 0) -> list[dict[str, Any]]:
    assert d.store is not None
    return [json.loads(r.payload) for r in d.store.outbox(after=after)]


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(hostile_payloads, min_size=1, max_size=6))
def test_every_message_of_a_batch_is_scheduled_or_answered(
    daemon: Daemon, payloads: list[bytes]
) -> None:
    """One transaction per batch, as the intake loop does; each message has an effect: a job
    journaled to run, or a result (rejection, cache hit) in the outbox under its id — unless
    its id was already journaled earlier in the same batch (it waits for that job's result)."""
    store = daemon.store
    assert store is not None
    store._db.execute("DELETE FROM jobs")
    store._db.execute("DELETE FROM reply_targets")
    msgs = [_msg(payload, mid=i) for i, payload in enumerate(payloads)]
    last_seq = store.last_seq
    scheduled = {job.id for job in _intake(daemon, msgs)}
    answered = {r["id"] for r in _outbox(daemon, after=last_seq)}
    seen: set[str] = set()
    for msg in msgs:
        parsed = parse_job(
            msg.payload,
            task="alarm",
            derived_id=protocol.derive_job_id(msg.topic, msg.payload, None),
            limits=daemon.limits,
            known_tasks=frozenset(daemon.runtimes),
        )
        assert parsed.id in scheduled | answered | seen, (msg.payload[:80], parsed)
        seen.add(parsed.id)
    for row in _outbox(daemon, after=last_seq):
        assert row["status"] in {"rejected", "ok"}
    assert daemon.metrics.quarantined._value.get() == 0


def test_one_bad_message_does_not_abort_its_batch(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = daemon.pipeline
    real = p._answer_from_cache

    def explode(tx: Any, job: Job, received: float) -> bool:
        if job.input == "boom":
            raise RuntimeError("a bug of ours, triggered by this input")
        return real(tx, job, received)

    monkeypatch.setattr(p, "_answer_from_cache", explode)
    msgs = [
        _msg(b'{"id":"g1","input":"smoke"}', mid=1),
        _msg(b'{"id":"b1","input":"boom"}', mid=2),
        _msg(SURROGATE_JOB, mid=3),
        _msg(b'{"id":"g2","input":"fire"}', mid=4),
    ]
    assert [j.id for j in _intake(daemon, msgs)] == ["g1", "g2"]
    codes = {r["id"]: r["error"]["code"] for r in _outbox(daemon)}
    assert codes["p1"] == "not_json"
    assert codes["b1"] == "unprocessable"  # answered under the producer's own id
    assert daemon.store is not None and daemon.store.job("b1") is None  # rolled back alone
    # If even the rejection cannot be written, the message is quarantined, not retried.
    monkeypatch.setattr(p, "_reject", lambda *a: (_ for _ in ()).throw(ValueError("x")))
    assert _intake(daemon, [_msg(b'{"id":"b2","input":"boom"}', mid=5)]) == []
    assert daemon.metrics.quarantined._value.get() == 1
    assert daemon.degraded is None and p.inbox == collections.deque()  # nothing waits


def test_an_id_used_on_another_task_is_an_id_conflict(daemon: Daemon) -> None:
    [job] = _intake(daemon, [_msg(b'{"id":"same","input":"smoke"}', "alarm")])
    assert job.task == "alarm"
    assert _intake(daemon, [_msg(b'{"id":"same","input":"device=a value=1"}', "reading")]) == []
    [res] = _outbox(daemon)
    assert res["status"] == "rejected" and res["error"]["code"] == "id_conflict"
    assert res["task"] == "reading" and "'alarm'" in res["error"]["message"]
    assert daemon.store is not None
    journaled = daemon.store.job("same")
    assert journaled is not None and journaled.task == "alarm"  # untouched
    # The same id on the same task is still the idempotent replay it always was.
    assert _intake(daemon, [_msg(b'{"id":"same","input":"smoke"}', "alarm")]) == []


def test_store_conflict_adds_no_reply_target(tmp_path: Path) -> None:
    s = Store(tmp_path / "e.db")
    a = Job("x", "alarm", "smoke", {}, 1000, "auto")
    with s.transaction() as tx:
        assert tx.admit(a, ReplyTarget("r/a"), redelivery=False).state == "new"
        adm = tx.admit(dataclasses.replace(a, task="reading"), ReplyTarget("r/b"), redelivery=False)
        assert adm.state == "conflict" and adm.task == "alarm"
        targets = tx.answer("x", b"res", fallback=ReplyTarget("r/default"))
    assert targets == [ReplyTarget("r/a")]  # task B's reply topic never gets A's result


# -- store error kinds ---------------------------------------------------------------------


def test_sqlite_errors_are_classified() -> None:
    assert error_kind(sqlite3.OperationalError("database or disk is full")) == "full"
    assert error_kind(sqlite3.OperationalError("disk I/O error")) == "io"
    assert error_kind(sqlite3.DatabaseError("database disk image is malformed")) == "corrupt"
    assert error_kind(sqlite3.DatabaseError("file is not a database")) == "corrupt"
    assert error_kind(sqlite3.OperationalError("attempt to write a readonly database")) == (
        "read_only"
    )
    assert error_kind(sqlite3.IntegrityError("UNIQUE constraint failed")) == "other"


def test_open_errors_have_their_own_kind_and_message(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as e:
        Store(tmp_path / "no" / "such" / "edgeagent.db")
    assert e.value.kind == "missing_dir" and "is its disk mounted" in str(e.value)
    s = Store(tmp_path / "ok" / "edgeagent.db")  # one missing level is created
    s.close()
    db = sqlite3.connect(tmp_path / "ok" / "edgeagent.db")
    db.execute("UPDATE meta SET value='99' WHERE key='schema'")
    db.commit()
    db.close()
    with pytest.raises(StoreError) as e:
        Store(tmp_path / "ok" / "edgeagent.db")
    assert e.value.kind == "newer_schema" and "newer edgeagent" in str(e.value)
    (tmp_path / "bad.db").write_bytes(b"this is not sqlite" * 300)
    with pytest.raises(StoreError) as e:
        Store(tmp_path / "bad.db")
    assert e.value.kind == "corrupt" and "damaged" in str(e.value)


def test_a_read_only_file_is_not_called_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Store(tmp_path / "e.db").close()
    real_access = __import__("os").access

    def access(path: Any, mode: int) -> bool:  # root ignores mode bits: fake the seam
        if str(path).endswith("e.db") and mode & 2:
            return False
        return bool(real_access(path, mode))

    monkeypatch.setattr("edgeagent.store.os.access", access)
    with pytest.raises(StoreError) as e:
        Store(tmp_path / "e.db")
    assert e.value.kind == "read_only"
    assert "not damaged" in str(e.value) and "move it aside" in str(e.value)
    assert "do not move it aside" in str(e.value)


def test_a_failed_commit_is_unavailable_and_rolls_back(tmp_path: Path) -> None:
    s = Store(tmp_path / "e.db")

    class Full(sqlite3.OperationalError):
        pass

    with pytest.raises(StoreUnavailable) as e, s.transaction() as tx:
        tx.enqueue("t", b"x")
        raise Full("database or disk is full")
    assert e.value.reason == "disk_full"
    assert s.outbox() == [] and s.outbox_depth == 0
    with s.transaction() as tx:  # the connection is still usable
        tx.enqueue("t", b"y")
    assert [r.payload for r in s.outbox()] == [b"y"]


def test_a_message_paho_cannot_decode_does_not_end_the_network_thread() -> None:
    """A topic that is not UTF-8 (mosquitto refuses them; other brokers may not) used to raise
    out of paho's loop() and end the MQTT thread: the daemon stayed up but deaf."""
    import asyncio

    import paho.mqtt.client as paho

    from edgeagent.mqtt import ConnectOptions, MqttAdapter

    loop = asyncio.new_event_loop()
    try:
        got: list[Inbound] = []
        adapter = MqttAdapter(
            ConnectOptions(host="127.0.0.1", port=1, client_id="t"),
            loop=loop,
            subscriptions=list,
            on_message=got.append,
            on_connected=lambda _: None,
            on_disconnected=lambda: None,
            on_puback=lambda _: None,
        )
        acked: list[tuple[int, int]] = []

        class Client:
            def ack(self, mid: int, qos: int) -> None:
                acked.append((mid, qos))

        msg = paho.MQTTMessage(mid=7, topic=b"edgeagent/d1/jobs/\xff")
        msg.qos = 1
        adapter._on_message(Client(), None, msg)  # type: ignore[arg-type]
        assert acked == [(7, 1)] and got == []
    finally:
        loop.close()


def test_a_batch_our_code_fails_on_is_answered_and_the_worker_lives() -> None:
    """A prediction the router cannot handle used to raise out of the worker: the task then
    answered nothing more, silently, while the daemon reported `online`."""
    from edgeagent.backends.base import Prediction
    from tests.test_pipeline import FakeBackend, pending, run

    class Odd(FakeBackend):
        def infer_batch(self, inputs: list[Any]) -> list[Prediction]:
            return [
                Prediction({"label": "x"}, "not a number" if x == "in-1" else 0.9)  # type: ignore[arg-type]
                for x in inputs
            ]

    out = {o.result.id: o.result for o in run(Odd(), [pending(1), pending(2), pending(3)])}
    assert out["j1"].status == "error"
    assert out["j1"].error is not None and out["j1"].error.code == "internal_error"
    assert out["j2"].status == out["j3"].status == "ok"  # the rest of the batch is answered


def test_a_full_disk_mid_batch_commits_nothing_of_the_batch(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite may roll back the whole transaction on SQLITE_FULL: a per-message savepoint must
    not treat that as one bad message (the batch would then be acknowledged half-written)."""
    from edgeagent.store import Transaction

    real = Transaction.admit

    def admit(self: Transaction, job: Job, *a: Any, **kw: Any) -> Any:
        if job.id == "g2":
            raise sqlite3.OperationalError("database or disk is full")
        return real(self, job, *a, **kw)

    monkeypatch.setattr(Transaction, "admit", admit)
    msgs = [_msg(b'{"id":"g1","input":"smoke"}', mid=1), _msg(b'{"id":"g2","input":"x"}', mid=2)]
    assert _intake(daemon, msgs) == []
    assert daemon.degraded == "disk_full"  # the daemon degrades: intake pauses
    assert list(daemon.pipeline.inbox) == msgs  # back at the head, unacknowledged
    assert daemon.store is not None and daemon.store.job("g1") is None  # nothing committed
    assert daemon.store.outbox() == []
