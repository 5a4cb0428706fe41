"""The SQLite journal/outbox/cache, on disk."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from edgeagent import store as store_module
from edgeagent.protocol import Job
from edgeagent.store import (
    ReplyTarget,
    Store,
    StoreError,
    cache_key,
    normalise_input,
)


def job(jid: str, text: str = "hi") -> Job:
    return Job(jid, "intent", text, {}, 1000, "auto")


def test_admit_is_idempotent_and_answer_reaches_every_target(tmp_path: Path) -> None:
    s = Store(tmp_path / "e.db")
    a, b = ReplyTarget("r/a", b"1"), ReplyTarget("r/b", None)
    with s.transaction() as tx:
        assert tx.admit(job("j"), a, redelivery=False).state == "new"
        assert tx.admit(job("j"), b, redelivery=False).state == "in_flight"
    assert [j.id for j in s.open_jobs()] == ["j"]
    with s.transaction() as tx:
        targets = tx.answer("j", b"result-1", fallback=ReplyTarget("r/default"))
        assert set(targets) == {a, b}
        assert tx.answer("j", b"result-2", fallback=ReplyTarget("r/default")) == []  # never twice
    assert s.open_jobs() == []
    assert [(r.topic, r.payload, r.correlation) for r in s.outbox()] == [
        ("r/a", b"result-1", b"1"),
        ("r/b", b"result-1", None),
    ] or sorted(r.topic for r in s.outbox()) == ["r/a", "r/b"]
    from_file = Store(tmp_path / "e.db")  # what the publisher had in memory is on disk
    assert [(r.seq, r.topic, r.payload, r.correlation) for r in from_file.outbox()] == [
        (r.seq, r.topic, r.payload, r.correlation) for r in s.outbox()
    ]
    from_file.close()
    with s.transaction() as tx:
        again = tx.admit(job("j"), ReplyTarget("r/c"), redelivery=False)
        assert again.state == "answered" and again.result == b"result-1"
        # A broker redelivery (DUP) to a known target gets nothing new.
        assert tx.admit(job("j"), a, redelivery=True).state == "duplicate_delivery"


def test_outbox_survives_reopen_and_is_deleted_after_ack(tmp_path: Path) -> None:
    s = Store(tmp_path / "e.db")
    with s.transaction() as tx:
        tx.enqueue("t/1", b"a")
        tx.enqueue("t/2", b"b", b"corr")
    s.close()
    s = Store(tmp_path / "e.db")
    rows = s.outbox()
    assert s.outbox_depth == 2 and [r.topic for r in rows] == ["t/1", "t/2"]
    s.outbox_done([rows[0].seq])
    assert s.outbox_depth == 1 and [r.topic for r in s.outbox()] == ["t/2"]
    assert s.outbox(after=rows[1].seq) == []


def test_recovery_sees_jobs_left_in_flight(tmp_path: Path) -> None:
    s = Store(tmp_path / "e.db")
    with s.transaction() as tx:
        tx.admit(job("a"), ReplyTarget("r"), redelivery=False)
        tx.admit(job("b"), ReplyTarget("r"), redelivery=False)
        tx.answer("a", b"x", fallback=ReplyTarget("r"))
    del s  # no close: as after SIGKILL
    s2 = Store(tmp_path / "e.db")
    assert [j.id for j in s2.open_jobs()] == ["b"]


def test_cache_key_depends_on_fingerprint_and_normalised_input() -> None:
    k = cache_key("intent", "fp1", "hello  world")
    assert k == cache_key("intent", "fp1", " hello world ")
    assert k != cache_key("intent", "fp2", "hello world")  # a model swap never serves old answers
    assert k != cache_key("other", "fp1", "hello world")
    assert normalise_input({"b": 1, "a": 2}) == '{"a":2,"b":1}'


def test_cache_ttl_and_cap(tmp_path: Path) -> None:
    s = Store(tmp_path / "e.db")
    with s.transaction() as tx:
        for i in range(50):
            tx.cache_put(f"k{i}", "t", {"output": i}, ttl_s=100, max_entries=20)
    assert s.cache_count() <= 20
    assert s.cache_get("k49") == {"output": 49}
    assert s.cache_get("k0") is None
    assert s.cache_get("k49", now=time.time() + 1000) is None


def test_prune_forgets_old_answered_jobs(tmp_path: Path) -> None:
    s = Store(tmp_path / "e.db")
    with s.transaction() as tx:
        tx.admit(job("old"), ReplyTarget("r"), redelivery=False)
        tx.answer("old", b"x", fallback=ReplyTarget("r"))
    assert s.prune(retention_s=60, now=time.time() + 3600) == 1
    assert s.stored_result("old") is None


def test_prune_keeps_open_and_recent_jobs_and_their_reply_targets(tmp_path: Path) -> None:
    s = Store(tmp_path / "e.db")
    with s.transaction() as tx:
        for jid in ("old", "old-open", "recent"):
            tx.admit(job(jid), ReplyTarget(f"r/{jid}"), redelivery=False)
        tx.answer("old", b"x", fallback=ReplyTarget("r"))
        tx.answer("recent", b"y", fallback=ReplyTarget("r"))
    db = sqlite3.connect(tmp_path / "e.db")
    db.execute(
        "UPDATE jobs SET received_at = received_at - 7200, answered_at = answered_at - 7200 "
        "WHERE id IN ('old', 'old-open')"
    )
    db.commit()
    db.close()
    assert s.prune(retention_s=3600) == 1
    assert s.stored_result("old") is None and s.stored_result("recent") == b"y"
    assert [j.id for j in s.open_jobs()] == ["old-open"]
    targets = s._db.execute("SELECT job_id FROM reply_targets ORDER BY job_id").fetchall()
    assert targets == [("old-open",), ("recent",)]


_SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE jobs (id TEXT PRIMARY KEY, task TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('received', 'answered')), job TEXT NOT NULL,
    received_at REAL NOT NULL, answered_at REAL, result BLOB);
CREATE INDEX jobs_open ON jobs (received_at) WHERE state = 'received';
CREATE INDEX jobs_answered ON jobs (answered_at) WHERE state = 'answered';
CREATE TABLE reply_targets (job_id TEXT NOT NULL, topic TEXT NOT NULL,
    correlation BLOB NOT NULL DEFAULT x'', PRIMARY KEY (job_id, topic, correlation));
CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,
    payload BLOB NOT NULL, correlation BLOB, response_topic TEXT, created_at REAL NOT NULL);
CREATE TABLE dead_letters (seq INTEGER PRIMARY KEY, job_id TEXT, topic TEXT NOT NULL,
    payload BLOB NOT NULL, correlation BLOB, response_topic TEXT, created_at REAL NOT NULL,
    reason_code INTEGER NOT NULL, reason TEXT NOT NULL, refused_at REAL NOT NULL);
INSERT INTO meta VALUES ('schema', '1');
"""


def test_a_schema_1_file_is_backed_up_and_migrated_with_everything_it_holds(
    tmp_path: Path,
) -> None:
    """What an edgeagent before schema 2 left behind (an open job, an answered one with two
    reply targets, two unsent outbox rows, a dead letter) is all there after the upgrade,
    and new outbox rows are numbered after every kept one."""
    path = tmp_path / "e.db"
    db = sqlite3.connect(path)
    db.executescript(_SCHEMA_1)
    now = time.time()
    db.executemany(
        "INSERT INTO jobs VALUES (?, 'intent', ?, ?, ?, ?, ?)",
        [
            ("open", "received", job("open").to_json(), now, None, None),
            ("done", "answered", job("done").to_json(), now, now, b"result"),
        ],
    )
    db.executemany(
        "INSERT INTO reply_targets VALUES (?, ?, ?)",
        [("open", "r/a", b""), ("done", "r/a", b"c1"), ("done", "r/b", b"")],
    )
    for _ in range(7):  # sqlite_sequence remembers 7; rows 5 and 7 are left unsent
        db.execute(
            "INSERT INTO outbox(topic, payload, created_at) VALUES ('r/a', x'70', ?)", (now,)
        )
    db.execute("DELETE FROM outbox WHERE seq NOT IN (5, 7)")
    db.execute(
        "INSERT INTO dead_letters VALUES (9, 'x', 'r/x', x'70', NULL, NULL, ?, 135, 'no', ?)",
        (now, now),
    )
    db.commit()
    db.close()

    s = Store(path)
    assert (tmp_path / "e.v1.bak").exists()
    assert s._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("2",)
    sql = dict(s._db.execute("SELECT name, sql FROM sqlite_master WHERE type='table'").fetchall())
    assert "WITHOUT ROWID" in sql["reply_targets"] and "AUTOINCREMENT" not in sql["outbox"]
    assert not [name for name in sql if name.endswith("_v1")]  # nothing of schema 1 left
    assert "outbox" not in {r[0] for r in s._db.execute("SELECT name FROM sqlite_sequence")}
    assert (
        s._db.execute("SELECT name FROM sqlite_master WHERE name='jobs_answered'").fetchone()
        is None
    )
    assert [j.id for j in s.open_jobs()] == ["open"]
    assert s.stored_result("done") == b"result"
    assert [r.seq for r in s.outbox(limit=10)] == [5, 7]
    with s.transaction() as tx:
        targets = tx.answer("open", b"answer", fallback=ReplyTarget("r/default"))
    assert targets == [ReplyTarget("r/a", None)]
    assert [r.seq for r in s.outbox(limit=10)] == [5, 7, 10]  # after the dead letter's 9
    with s.transaction() as tx:  # a retry of the answered job gets its stored result
        assert tx.admit(job("done"), ReplyTarget("r/c"), redelivery=False).state == "answered"
    s.close()
    Store(path).close()  # and it opens again as schema 2, with nothing left to migrate


def test_outbox_numbers_are_never_reused_once_the_outbox_is_empty(tmp_path: Path) -> None:
    s = Store(tmp_path / "e.db")
    seqs = []
    for _ in range(3):
        with s.transaction() as tx:
            tx.enqueue("r/a", b"p")
        (row,) = s.outbox(after=seqs[-1] if seqs else 0, limit=10)
        seqs.append(row.seq)
        s.outbox_done([row.seq])  # acknowledged: the outbox is empty again
    assert seqs == [1, 2, 3]


def test_newer_schema_is_refused_and_garbage_file_is_a_clear_error(tmp_path: Path) -> None:
    s = Store(tmp_path / "e.db")
    s.close()
    db = sqlite3.connect(tmp_path / "e.db")
    db.execute("UPDATE meta SET value='99' WHERE key='schema'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer edgeagent"):
        Store(tmp_path / "e.db")
    (tmp_path / "bad.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="is damaged") as e:
        Store(tmp_path / "bad.db")
    assert e.value.kind == "corrupt"


def test_outbox_reads_only_committed_rows(tmp_path: Path) -> None:
    """What the publisher reads can never be a row whose transaction has not committed."""
    s = Store(tmp_path / "e.db")
    tx = s.begin()
    tx.enqueue("t/1", b"a")
    assert s.outbox() == []  # written, not committed
    s.commit(tx)
    assert [r.topic for r in s.outbox()] == ["t/1"]
    s.close()


@pytest.mark.parametrize("synchronous", ["normal", "full"])
def test_the_wal_is_checkpointed_in_the_background(tmp_path: Path, synchronous: str) -> None:
    """Every CHECKPOINT_EVERY_COMMITS commits a PASSIVE checkpoint runs in the store's
    checkpoint thread: committed pages reach the database file although the committing
    connection never checkpoints (its automatic checkpoint is off here)."""
    from edgeagent.store import CHECKPOINT_EVERY_COMMITS

    s = Store(tmp_path / "e.db", synchronous=synchronous)
    try:
        s._db.execute("PRAGMA wal_autocheckpoint=0")
        marker = b"background-checkpoint-marker"
        for i in range(CHECKPOINT_EVERY_COMMITS - 1):
            with s.transaction() as tx:
                tx.enqueue("t", marker + str(i).encode())
        assert s._checkpointing is None and marker not in s.path.read_bytes()
        with s.transaction() as tx:
            tx.enqueue("t", b"last")
        assert s._checkpointing is not None
        s._checkpointing.result(30)
        assert marker + b"0" in s.path.read_bytes()  # copied from the WAL by the checkpoint
        assert [r.payload for r in s.outbox()][-1] == b"last"
    finally:
        s.close()


def test_the_publisher_reads_committed_rows_from_memory_and_older_ones_from_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of an earlier run, and rows beyond the in-memory bound, are read back; rows
    rolled back (a savepoint) or deleted are never served."""
    path = tmp_path / "e.db"
    s = Store(path)
    with s.transaction() as tx:
        tx.enqueue("t/old", b"o")
    s.close()
    s = Store(path)
    with s.transaction() as tx:
        tx.enqueue("t/a", b"a", b"c1", "r/1")
        with pytest.raises(RuntimeError), tx.savepoint():
            tx.enqueue("t/gone", b"g")
            raise RuntimeError("rolled back alone")
        tx.enqueue("t/b", b"b")
    rows = s.outbox(after=0)
    assert [(r.topic, r.payload, r.correlation, r.response_topic) for r in rows] == [
        ("t/old", b"o", None, None),
        ("t/a", b"a", b"c1", "r/1"),
        ("t/b", b"b", None, None),
    ]
    assert s.outbox(after=rows[0].seq) == rows[1:]  # from memory now
    s.outbox_done([rows[2].seq])
    assert s.outbox(after=rows[0].seq) == rows[1:2]
    monkeypatch.setattr(store_module, "FRESH_OUTBOX_ROWS", 2)
    with s.transaction() as tx:
        for i in range(3):
            tx.enqueue(f"t/{i}", b"x")
    assert [r.topic for r in s.outbox(after=rows[0].seq)] == ["t/a", "t/0", "t/1", "t/2"]
    s.close()


def test_a_job_answered_in_its_admission_transaction_is_written_once_as_answered(
    tmp_path: Path,
) -> None:
    """Answered at admission (an inline backend, the cache): one row, written answered; it
    never enters the index of open jobs.  A job only admitted is journaled as received."""
    s = Store(tmp_path / "e.db")
    statements: list[str] = []
    s._db.set_trace_callback(statements.append)
    with s.transaction() as tx:
        assert tx.admit(job("inline"), ReplyTarget("r/a"), redelivery=False).state == "new"
        assert tx.admit(job("queued"), ReplyTarget("r/a"), redelivery=False).state == "new"
        assert tx.answer("inline", b"ok", fallback=ReplyTarget("r/x")) == [ReplyTarget("r/a")]
    s._db.set_trace_callback(None)
    writes = [q for q in statements if q.startswith(("INSERT INTO jobs", "UPDATE jobs"))]
    assert len(writes) == 2 and "'answered'" in writes[0] and "'received'" in writes[1]
    assert not any(q.startswith("UPDATE jobs") for q in statements)
    assert s.stored_result("inline") == b"ok"
    assert [j.id for j in s.open_jobs()] == ["queued"]
    with s.transaction() as tx:
        assert tx.answer("queued", b"later", fallback=ReplyTarget("r/x")) == [ReplyTarget("r/a")]
        assert tx.answer("queued", b"twice", fallback=ReplyTarget("r/x")) == []
    assert s.stored_result("queued") == b"later" and s.open_jobs() == []


def test_a_job_answered_at_admission_reaches_its_targets_without_reading_them_back(
    tmp_path: Path,
) -> None:
    """The targets a job got in its admission's transaction are all it has: answered in that
    transaction, it is queued for each of them, in the same order and with the same
    correlation as a job answered later (read back from ``reply_targets``)."""
    targets = [ReplyTarget("r/b", b"2"), ReplyTarget("r/a", b""), ReplyTarget("r/a", b"1")]
    outboxes = []
    for answer_at_admission in (True, False):
        s = Store(tmp_path / f"{answer_at_admission}.db")
        statements: list[str] = []
        s._db.set_trace_callback(statements.append)
        with s.transaction() as tx:
            for t in targets:
                tx.admit(job("j"), t, redelivery=False)
            if answer_at_admission:
                got = tx.answer("j", b"ok", fallback=ReplyTarget("r/x"))
        if not answer_at_admission:
            with s.transaction() as tx:
                got = tx.answer("j", b"ok", fallback=ReplyTarget("r/x"))
        s._db.set_trace_callback(None)
        reads = [q for q in statements if q.startswith("SELECT topic, correlation")]
        assert bool(reads) != answer_at_admission
        assert got == [ReplyTarget("r/a"), ReplyTarget("r/a", b"1"), ReplyTarget("r/b", b"2")]
        outboxes.append([(r.topic, r.payload, r.correlation) for r in s.outbox()])
        s.close()
    assert outboxes[0] == outboxes[1]


def test_a_held_job_keeps_idempotency_and_savepoints_within_its_transaction(
    tmp_path: Path,
) -> None:
    s = Store(tmp_path / "e.db")
    with s.transaction() as tx:
        assert tx.admit(job("j"), ReplyTarget("r/a"), redelivery=False).state == "new"
        # the same id again in the same transaction: in flight; on another task: a conflict
        assert tx.admit(job("j"), ReplyTarget("r/b"), redelivery=False).state == "in_flight"
        other = Job("j", "other-task", "hi", {}, 1000, "auto")
        adm = tx.admit(other, ReplyTarget("r/c"), redelivery=False)
        assert (adm.state, adm.task) == ("conflict", "intent")
        with pytest.raises(RuntimeError), tx.savepoint():  # an answer rolled back ...
            tx.answer("j", b"lost", fallback=ReplyTarget("r/x"))
            raise RuntimeError("the write failed after answering")
        with pytest.raises(RuntimeError), tx.savepoint():  # ... and an admission too
            tx.admit(job("k"), ReplyTarget("r/a"), redelivery=False)
            raise RuntimeError("the write failed after admitting")
    assert [j.id for j in s.open_jobs()] == ["j"]  # ... leave "j" open, and no "k"
    assert s.stored_result("j") is None and s.job("k") is None
    with s.transaction() as tx:
        assert set(tx.answer("j", b"ok", fallback=ReplyTarget("r/x"))) == {
            ReplyTarget("r/a"),
            ReplyTarget("r/b"),
        }
    with s.transaction() as tx:
        adm = tx.admit(job("j"), ReplyTarget("r/a"), redelivery=True)
        assert adm.state == "duplicate_delivery"
        assert tx.admit(job("j"), ReplyTarget("r/a"), redelivery=False).result == b"ok"


def test_the_backup_before_a_migration_holds_what_only_the_wal_held(tmp_path: Path) -> None:
    """A daemon killed mid-burst leaves its last commits in the WAL: the backup taken before
    the migration has them too (a copy of the database file alone would not)."""
    path = tmp_path / "e.db"
    killed = sqlite3.connect(path, isolation_level=None)  # stays open: never checkpointed
    killed.execute("PRAGMA journal_mode=WAL")
    killed.execute("PRAGMA wal_autocheckpoint=0")
    killed.executescript(_SCHEMA_1)
    killed.execute(
        "INSERT INTO jobs VALUES ('open', 'intent', 'received', ?, 1.0, NULL, NULL)",
        (job("open").to_json(),),
    )
    killed.execute("INSERT INTO outbox(topic, payload, created_at) VALUES ('r/a', x'70', 1.0)")
    assert (tmp_path / "e.db-wal").stat().st_size > 0
    s = Store(path)
    assert [j.id for j in s.open_jobs()] == ["open"]
    s.close()
    killed.close()
    bak = sqlite3.connect(tmp_path / "e.v1.bak")
    assert bak.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("1",)
    assert bak.execute("SELECT id FROM jobs").fetchall() == [("open",)]
    assert bak.execute("SELECT count(*) FROM outbox").fetchone() == (1,)
    bak.close()
