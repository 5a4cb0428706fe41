"""GroupCommitter: the writes of one loop turn share one transaction (a real Store on disk)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgeagent.commit import GroupCommitter
from edgeagent.protocol import Job
from edgeagent.store import ReplyTarget, Store, StoreUnavailable, Transaction

_OPEN: list[Store] = []


def opened(store: Store) -> Store:
    """Closed after the test (and with it the store's commit thread)."""
    _OPEN.append(store)
    return store


@pytest.fixture(autouse=True)
def _close_stores() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def job(jid: str) -> Job:
    return Job(jid, "intent", "hi", {}, 1000, "auto")


class Recorder:
    """What the committer told us, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[tuple[str, object]] = []
        self.errors: list[tuple[BaseException, str]] = []

    def on_error(self, exc: BaseException, where: str) -> None:
        self.errors.append((exc, where))

    def committed_ids(self) -> set[str]:
        """Job ids visible to another connection: committed, not just written."""
        db = sqlite3.connect(self.path)
        try:
            return {r[0] for r in db.execute("SELECT id FROM jobs")}
        finally:
            db.close()

    def admit(self, jid: str) -> tuple[object, object, object]:
        def write(tx: Transaction) -> str:
            tx.admit(job(jid), ReplyTarget("r"), redelivery=False)
            return jid

        def after(value: str) -> None:
            # Runs only once the commit is done: another connection already sees the row.
            self.events.append(("after", (value, value in self.committed_ids())))

        def undo() -> None:
            self.events.append(("undo", jid))

        return write, after, undo


def run_turn(gc: GroupCommitter, body: Callable[[], None]) -> None:
    """Run ``body`` in one loop turn, then until its group commits (with "full", the
    COMMIT runs in the store's commit thread)."""

    async def main() -> None:
        body()
        await asyncio.sleep(0)  # the group commit starts at the end of this turn
        while gc.busy or gc.pending:
            await asyncio.sleep(0.001)

    asyncio.run(main())


SYNC = pytest.mark.parametrize("synchronous", ["normal", "full"])


@SYNC
def test_writes_of_one_turn_share_one_commit_and_after_runs_once_durable(
    tmp_path: Path, synchronous: str
) -> None:
    store = opened(Store(tmp_path / "e.db", synchronous=synchronous))
    rec = Recorder(store.path)
    groups: list[int] = []
    gc = GroupCommitter(store, on_error=rec.on_error, committed=lambda: groups.append(gc.writes))

    def body() -> None:
        for jid in ("a", "b", "c"):
            write, after, undo = rec.admit(jid)
            gc.submit(write, after, undo=undo)  # type: ignore[arg-type]
        assert gc.pending == 3 and rec.committed_ids() == set()  # nothing before the turn ends

    run_turn(gc, body)
    assert rec.events == [("after", ("a", True)), ("after", ("b", True)), ("after", ("c", True))]
    assert gc.commits == 1 and groups == [3] and rec.errors == []
    assert [j.id for j in store.open_jobs()] == ["a", "b", "c"]


@SYNC
def test_a_failing_write_is_rolled_back_alone(tmp_path: Path, synchronous: str) -> None:
    store = opened(Store(tmp_path / "e.db", synchronous=synchronous))
    rec = Recorder(store.path)
    gc = GroupCommitter(store, on_error=rec.on_error)

    def broken(tx: Transaction) -> None:
        tx.admit(job("bad"), ReplyTarget("r"), redelivery=False)  # undone with its savepoint
        tx.enqueue("t", b"half")
        raise ValueError("a bug of ours")

    def body() -> None:
        w, a, u = rec.admit("a")
        gc.submit(w, a, undo=u)  # type: ignore[arg-type]
        gc.submit(broken, lambda _: rec.events.append(("after", "bad")), undo=lambda: None)
        gc.submit(broken, undo=lambda: rec.events.append(("undo", "bad")), where="intake")
        w, a, u = rec.admit("b")
        gc.submit(w, a, undo=u)  # type: ignore[arg-type]

    run_turn(gc, body)
    assert rec.events == [("undo", "bad"), ("after", ("a", True)), ("after", ("b", True))]
    assert rec.committed_ids() == {"a", "b"}
    assert store.outbox_depth == 0 and store.outbox() == []
    assert [(type(e).__name__, w) for e, w in rec.errors] == [
        ("ValueError", "write"),
        ("ValueError", "intake"),
    ]


@SYNC
def test_a_full_disk_fails_the_whole_group_and_nothing_runs_but_undo(
    tmp_path: Path, synchronous: str
) -> None:
    store = opened(Store(tmp_path / "e.db", synchronous=synchronous))
    rec = Recorder(store.path)
    gc = GroupCommitter(store, on_error=rec.on_error)
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count={pages}")  # SQLITE_FULL at the next new page

    def big(tx: Transaction) -> None:
        tx.enqueue("t", b"x" * 200_000)

    def body() -> None:
        w, a, u = rec.admit("a")
        gc.submit(w, a, undo=u, where="intake")  # type: ignore[arg-type]
        gc.submit(big, lambda _: rec.events.append(("after", "big")), where="deliver")
        w, a, u = rec.admit("b")
        gc.submit(w, a, undo=u)  # type: ignore[arg-type]

    run_turn(gc, body)
    assert rec.events == [("undo", "b"), ("undo", "a")]  # no after ran; undos last first
    assert len(rec.errors) == 1
    exc, where = rec.errors[0]
    assert isinstance(exc, StoreUnavailable) and exc.reason == "disk_full" and where == "intake"
    assert rec.committed_ids() == set() and store.outbox_depth == 0 and gc.commits == 0

    store._db.execute("PRAGMA max_page_count=1073741823")  # space again: the retry commits
    rec.events.clear()
    run_turn(gc, lambda: gc.submit(*rec.admit("a")[:2]))  # type: ignore[call-overload]
    assert rec.events == [("after", ("a", True))] and gc.commits == 1


@SYNC
def test_after_may_submit_the_next_group_and_a_failing_after_spares_the_others(
    tmp_path: Path, synchronous: str
) -> None:
    store = opened(Store(tmp_path / "e.db", synchronous=synchronous))
    rec = Recorder(store.path)
    gc = GroupCommitter(store, on_error=rec.on_error)

    def chain(_: object) -> None:
        w, a, u = rec.admit("second")
        gc.submit(w, a, undo=u)  # type: ignore[arg-type]

    def boom(_: object) -> None:
        raise RuntimeError("after failed")

    def body() -> None:
        gc.submit(lambda tx: None, chain)
        gc.submit(lambda tx: None, boom, where="deliver")
        w, a, u = rec.admit("first")
        gc.submit(w, a, undo=u)  # type: ignore[arg-type]

    run_turn(gc, body)
    assert rec.events == [("after", ("first", True)), ("after", ("second", True))]
    assert gc.commits == 2
    assert [(str(e), w) for e, w in rec.errors] == [("after failed", "deliver")]


def test_only_non_durable_writes_commit_without_fsync_and_keep_the_setting(
    tmp_path: Path,
) -> None:
    store = opened(Store(tmp_path / "e.db", synchronous="full"))
    with store.transaction() as tx:
        tx.enqueue("t/1", b"a")
        tx.enqueue("t/2", b"b")
    seqs = [r.seq for r in store.outbox()]
    rec = Recorder(store.path)
    gc = GroupCommitter(store, on_error=rec.on_error)
    seen: list[int] = []

    def body() -> None:
        gc.submit(lambda tx: tx.outbox_done(seqs), lambda _: seen.append(store.outbox_depth),
                  durable=False)  # fmt: skip

    run_turn(gc, body)
    assert seen == [0] and store.outbox() == [] and rec.errors == []
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again


def test_close_commits_or_drops_and_later_writes_are_undone(tmp_path: Path) -> None:
    store = opened(Store(tmp_path / "e.db"))
    rec = Recorder(store.path)

    async def main() -> None:
        gc = GroupCommitter(store, on_error=rec.on_error)
        w, a, u = rec.admit("kept")
        gc.submit(w, a, undo=u)  # type: ignore[arg-type]
        gc.close()  # commits now, without waiting for the turn to end
        w, a, u = rec.admit("late")
        gc.submit(w, a, undo=u)  # type: ignore[arg-type]
        dropped = GroupCommitter(store, on_error=rec.on_error)
        w, a, u = rec.admit("dropped")
        dropped.submit(w, a, undo=u)  # type: ignore[arg-type]
        dropped.close(commit=False)
        await asyncio.sleep(0)

    asyncio.run(main())
    assert rec.events == [("after", ("kept", True)), ("undo", "late"), ("undo", "dropped")]
    assert rec.committed_ids() == {"kept"}


@SYNC
def test_store_transaction_durable_flag_restores_synchronous(
    tmp_path: Path, synchronous: str
) -> None:
    store = opened(Store(tmp_path / "e.db", synchronous=synchronous))
    with store.transaction(durable=False) as tx:
        tx.enqueue("t", b"a")
    want = 2 if synchronous == "full" else 1
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == want
    assert store.outbox_depth == 1


def test_with_full_the_fsync_runs_in_a_thread_and_what_comes_meanwhile_is_the_next_group(
    tmp_path: Path,
) -> None:
    store = opened(Store(tmp_path / "e.db", synchronous="full"))
    rec = Recorder(store.path)
    gc = GroupCommitter(store, on_error=rec.on_error)
    seen: list[int] = []

    async def main() -> None:
        w, a, u = rec.admit("a")
        gc.submit(w, a, undo=u)  # type: ignore[arg-type]
        await asyncio.sleep(0)  # the group's COMMIT now runs in the commit thread
        assert gc.busy and gc.commits == 0
        for jid in ("b", "c"):
            w, a, u = rec.admit(jid)
            gc.submit(w, a, undo=u)  # type: ignore[arg-type]
        assert gc.pending == 2
        seen.append(store.open_job_count())  # any other use of the store waits for the COMMIT
        while gc.busy or gc.pending:
            await asyncio.sleep(0.001)

    asyncio.run(main())
    assert seen == [1] and gc.commits == 2
    assert rec.events == [("after", (j, True)) for j in ("a", "b", "c")]


def test_callbacks_run_group_after_group_even_when_the_next_group_commits_inline(
    tmp_path: Path,
) -> None:
    """A group of non-durable writes only, queued during an fsync, commits on the loop when
    that fsync lands: its callbacks still come after those of the group before it."""
    store = opened(Store(tmp_path / "e.db", synchronous="full"))
    rec = Recorder(store.path)
    gc = GroupCommitter(store, on_error=rec.on_error)

    async def main() -> None:
        w, a, u = rec.admit("a")
        gc.submit(w, a, undo=u)  # type: ignore[arg-type]
        await asyncio.sleep(0)
        assert gc.busy
        gc.submit(lambda tx: None, lambda _: rec.events.append(("after", "relaxed")),
                  durable=False)  # fmt: skip
        while gc.busy or gc.pending:
            await asyncio.sleep(0.001)

    asyncio.run(main())
    assert rec.events == [("after", ("a", True)), ("after", "relaxed")]
    assert gc.commits == 2


@SYNC
def test_a_group_of_one_failing_write_is_rolled_back_and_the_next_commits(
    tmp_path: Path, synchronous: str
) -> None:
    """A group of one write runs without a savepoint: its failure rolls the whole
    transaction back (the same writes are undone) and nothing of it is committed."""
    store = opened(Store(tmp_path / "e.db", synchronous=synchronous))
    rec = Recorder(store.path)
    gc = GroupCommitter(store, on_error=rec.on_error)
    cache_rows = store.cache_rows

    def broken(tx: Transaction) -> None:
        tx.admit(job("bad"), ReplyTarget("r"), redelivery=False)
        tx.enqueue("t", b"half")
        tx.cache_put("k", "intent", {"output": 1}, ttl_s=60, max_entries=10)
        raise ValueError("a bug of ours")

    run_turn(gc, lambda: gc.submit(broken, undo=lambda: rec.events.append(("undo", "bad"))))
    assert rec.events == [("undo", "bad")] and gc.commits == 0
    assert [(type(e).__name__, w) for e, w in rec.errors] == [("ValueError", "write")]
    assert rec.committed_ids() == set() and store.outbox() == [] and store.outbox_depth == 0
    assert store.cache_rows == cache_rows and store.cache_get("k") is None
    run_turn(gc, lambda: gc.submit(*rec.admit("a")[:2]))  # type: ignore[call-overload]
    assert rec.events[-1] == ("after", ("a", True)) and gc.commits == 1
