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


@pytest.mark.parametrize("returning", [True, False], ids=["insert-returning", "sqlite<3.35"])
def test_admit_is_idempotent_and_answer_reaches_every_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, returning: bool
) -> None:
    monkeypatch.setattr(store_module, "_RETURNING", returning)  # both ways to the outbox
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
