"""SQLite (WAL) state: job journal, result outbox and result cache, in one file.

Thread model: one connection for every read and write, used by the event-loop thread
(a COMMIT may run in the commit thread, :meth:`Store.commit_in_thread`; the loop then
waits for it before its next use).  Every method that changes state commits before it
returns, so what the caller does next (acknowledge a job, publish a result) happens only
after the change is durable.  Two more connections only read or checkpoint: the outbox
reader (while a COMMIT runs in the commit thread) and the checkpoint thread's.

Invariants:
* a job row is ``received`` until its result is written; the result, the
  outbox rows carrying it and the ``answered`` state are one transaction;
* an outbox row is deleted only after the broker's PUBACK for it;
* a cache entry is keyed by task, task/model fingerprint and normalised input,
  so a changed model or task config never serves an old answer.

Errors: every SQLite failure leaves this module as a :class:`StoreError` whose
``kind`` says what an operator must do (see :data:`StoreError.kind`).  A full
disk, an I/O error or a file turned read-only at run time is a
:class:`StoreUnavailable`: nothing was committed, retry later.  Corruption is
never retried.

Disk footprint: the WAL is checkpointed every :data:`WAL_AUTOCHECKPOINT_PAGES`
pages and truncated to :data:`JOURNAL_SIZE_LIMIT_BYTES` after each checkpoint (the
checkpoint thread runs a PASSIVE checkpoint every :data:`CHECKPOINT_EVERY_COMMITS`
commits, so the committing connection, which would stall on its two ``fsync`` calls, rarely
reaches that bound itself);
:meth:`Store.maintain` truncates it to zero and returns free pages to the file
system when the daemon is idle.  Temporary tables and indices live in memory.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import itertools
import json
import os
import queue
import shutil
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeagent.inputs import canonical_input
from edgeagent.protocol import Job

SCHEMA_VERSION = 2

WAL_AUTOCHECKPOINT_PAGES = 128
"""Checkpoint the WAL into the database once it holds this many pages (4 KiB each)."""
JOURNAL_SIZE_LIMIT_BYTES = 512 * 1024
"""Truncate the WAL to this size after a checkpoint (SQLite's default keeps its peak)."""
CHECKPOINT_EVERY_COMMITS = 16
"""A background (PASSIVE) checkpoint is started every this many commits, in the store's
checkpoint thread on a connection of its own, so that the WAL rarely reaches
:data:`WAL_AUTOCHECKPOINT_PAGES`, where the committing connection would checkpoint it
itself: two ``fsync``s inside a COMMIT (on the event loop with ``synchronous = "normal"``)."""
FRESH_OUTBOX_ROWS = 4096
"""Committed outbox rows kept in memory for the publisher (:meth:`Store.outbox` then needs
no SELECT); beyond this many unsent ones (the broker is away) it reads them back."""
MIN_FREE_BYTES = 4 * 1024 * 1024
"""Free space on the state file system below which the daemon warns at start (bytes)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id          TEXT PRIMARY KEY,
    task        TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('received', 'answered')),
    job         TEXT NOT NULL,
    received_at REAL NOT NULL,
    answered_at REAL,
    result      BLOB
);
CREATE INDEX IF NOT EXISTS jobs_open ON jobs (received_at) WHERE state = 'received';
CREATE TABLE IF NOT EXISTS reply_targets (
    job_id      TEXT NOT NULL,
    topic       TEXT NOT NULL,
    correlation BLOB NOT NULL DEFAULT x'',
    PRIMARY KEY (job_id, topic, correlation)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    seq         INTEGER PRIMARY KEY,
    topic       TEXT NOT NULL,
    payload     BLOB NOT NULL,
    correlation BLOB,
    response_topic TEXT,
    created_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq         INTEGER PRIMARY KEY,
    job_id      TEXT,
    topic       TEXT NOT NULL,
    payload     BLOB NOT NULL,
    correlation BLOB,
    response_topic TEXT,
    created_at  REAL NOT NULL,
    reason_code INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    refused_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_job ON dead_letters (job_id);
CREATE TABLE IF NOT EXISTS cache (
    key         TEXT PRIMARY KEY,
    task        TEXT NOT NULL,
    value       TEXT NOT NULL,
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS cache_age ON cache (created_at);
CREATE TABLE IF NOT EXISTS escalations (
    id              TEXT PRIMARY KEY,
    job_id          TEXT NOT NULL,
    task            TEXT NOT NULL,
    reason          TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'done', 'failed', 'expired')),
    audit           INTEGER NOT NULL DEFAULT 0,
    provisional     INTEGER NOT NULL DEFAULT 0,
    created_at      REAL NOT NULL,
    deadline_at     REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    request         BLOB NOT NULL,
    mapping         TEXT NOT NULL DEFAULT '{}',
    local           TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS escalations_open ON escalations (next_attempt_at)
    WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS escalations_job ON escalations (job_id);
CREATE TABLE IF NOT EXISTS examples (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    task             TEXT NOT NULL,
    input            TEXT NOT NULL,
    cloud_output     TEXT NOT NULL,
    local_output     TEXT,
    local_confidence REAL,
    agreed           INTEGER,
    reason           TEXT NOT NULL,
    model            TEXT,
    created_at       REAL NOT NULL
);
"""
# Schema 2 writes fewer pages per job than 1 (each page a 4 KiB WAL frame, and again at
# the checkpoint: flash wear; ``bench_state_disk.py --writes``).  Every b-tree a job's
# commit touches costs at least one page, so a job touches as few as it can:
# - ``reply_targets`` is ``WITHOUT ROWID``: its key is its primary key, no second b-tree
#   for the key's index;
# - ``outbox.seq`` is assigned by the store (:attr:`Store._next_seq`), not by
#   ``AUTOINCREMENT``, whose ``sqlite_sequence`` row is one more page per commit.  Numbers
#   are never reused by one process (the publisher's watermark relies on that) nor against
#   a kept dead letter; after a restart with an empty outbox they may start lower again,
#   which nothing persisted refers to;
# - no index on ``answered_at``: :meth:`Store.prune` walks the oldest rows in ``rowid``
#   order (jobs are inserted as they arrive), so answering a job touches no index of it;
# - (no schema change) a transaction holds a new job's row until its COMMIT
#   (:meth:`Transaction.write_held`): a job answered in its admission's transaction is
#   inserted once, as ``answered``, and never enters ``jobs_open``.

_MIGRATIONS: dict[int, tuple[tuple[str, ...], tuple[str, ...]]] = {
    2: (
        (  # before _SCHEMA: the tables it defines anew step aside
            "ALTER TABLE reply_targets RENAME TO reply_targets_v1",
            "ALTER TABLE outbox RENAME TO outbox_v1",
            "DROP INDEX IF EXISTS jobs_answered",
        ),
        (  # after _SCHEMA created them: their rows move in
            "INSERT OR IGNORE INTO reply_targets(job_id, topic, correlation) "
            "SELECT job_id, topic, correlation FROM reply_targets_v1",
            "DROP TABLE reply_targets_v1",
            "INSERT INTO outbox(seq, topic, payload, correlation, response_topic, created_at) "
            "SELECT seq, topic, payload, correlation, response_topic, created_at FROM outbox_v1",
            "DROP TABLE outbox_v1",
        ),
    ),
}
"""Statements that bring a file of schema ``N - 1`` to ``N``: those run before
:data:`_SCHEMA`'s (which creates what is missing) and those run after it, all in one
transaction (after a backup of the file).  The tables are defined once, in ``_SCHEMA``."""

_MAX_ROWID = 2**63 - 1

DEAD_LETTER_MAX_ROWS = 10000
"""Refused publishes kept for inspection (`edgeagent results`); older ones are dropped."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A publish the broker refused, kept with the reason (``dead_letters`` table)."""

    seq: int
    job_id: str | None
    topic: str
    payload: bytes
    reason_code: int
    reason: str
    refused_at: float


def _job_id_of(db: sqlite3.Connection, payload: bytes) -> str | None:
    """The job an outbox payload belongs to: a result's ``id``, or the job of an
    escalation request's ``escalation_id``."""
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    esc = data.get("escalation_id")
    if isinstance(esc, str):
        row = db.execute("SELECT job_id FROM escalations WHERE id=?", (esc,)).fetchone()
        return str(row[0]) if row else None
    job_id = data.get("id")
    return job_id if isinstance(job_id, str) else None


class StoreError(Exception):
    """The state file cannot be opened, migrated or written.

    ``kind`` is one of ``missing_dir`` (the state directory does not exist and cannot be
    created), ``read_only`` (file, directory or file system not writable; the file is
    intact), ``corrupt`` (damaged file), ``newer_schema`` (written by a newer edgeagent),
    ``full`` (no space left), ``io`` (I/O error) or ``unusable`` (anything else).
    """

    def __init__(self, message: str, kind: str = "unusable") -> None:
        super().__init__(message)
        self.kind = kind


class StoreUnavailable(StoreError):
    """A write failed for a reason that may pass (disk full, I/O error, read-only remount).

    Nothing of the failed transaction was committed; the caller retries later.
    ``reason`` is ``disk_full``, ``io_error``, ``read_only`` or ``busy`` (another process
    holds the database lock).
    """

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message, kind)
        self.reason = {"full": "disk_full", "io": "io_error"}.get(kind, kind)


# SQLite primary result codes (https://sqlite.org/rescode.html).
_SQLITE_KINDS = {
    3: "read_only",  # SQLITE_PERM
    5: "busy",  # SQLITE_BUSY: another process holds the lock past busy_timeout
    6: "busy",  # SQLITE_LOCKED
    7: "io",  # SQLITE_NOMEM
    8: "read_only",  # SQLITE_READONLY
    10: "io",  # SQLITE_IOERR
    11: "corrupt",  # SQLITE_CORRUPT
    13: "full",  # SQLITE_FULL
    26: "corrupt",  # SQLITE_NOTADB
}
_MESSAGE_KINDS = (  # Python 3.10 has no sqlite_errorcode: fall back on SQLite's messages
    ("database or disk is full", "full"),
    ("disk i/o error", "io"),
    ("malformed", "corrupt"),
    ("file is not a database", "corrupt"),
    ("readonly database", "read_only"),
    ("read-only", "read_only"),
    ("database is locked", "busy"),
    ("database table is locked", "busy"),
)


def error_kind(exc: BaseException) -> str:
    """Classify a SQLite error: ``full``, ``io``, ``busy``, ``corrupt``, ``read_only`` or
    ``other`` (a bug of ours, e.g. a constraint: confined to the statement)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and (code & 0xFF) in _SQLITE_KINDS:
        return _SQLITE_KINDS[code & 0xFF]
    text = str(exc).lower()
    for needle, kind in _MESSAGE_KINDS:
        if needle in text:
            return kind
    return "other"


def translate(exc: sqlite3.Error, path: Path) -> BaseException:
    """The StoreError for a SQLite error raised at run time (``exc`` itself if unclassified)."""
    kind = error_kind(exc)
    if kind in ("full", "io", "read_only", "busy"):
        return StoreUnavailable(f"state file {path}: {exc}", kind)
    if kind == "corrupt":
        return StoreError(
            f"state file {path} is damaged ({exc}); stop edgeagent and run `sqlite3 {path} "
            "'PRAGMA integrity_check'`; if it is beyond repair, move it aside (the jobs it "
            "holds are lost; the broker redelivers only unacknowledged ones)",
            "corrupt",
        )
    return exc


@dataclass(frozen=True, slots=True)
class ReplyTarget:
    topic: str
    correlation: bytes | None = None


@dataclass(frozen=True, slots=True)
class OutboxRow:
    seq: int
    topic: str
    payload: bytes
    correlation: bytes | None
    response_topic: str | None = None


_ESC_SELECT = (
    "SELECT id, job_id, task, reason, state, audit, provisional, created_at, deadline_at, "
    "next_attempt_at, attempts, request, mapping, local FROM escalations"
)


@dataclass(frozen=True, slots=True)
class EscalationRow:
    id: str
    job_id: str
    task: str
    reason: str
    state: str
    audit: bool
    provisional: bool
    created_at: float
    deadline_at: float
    next_attempt_at: float
    attempts: int
    request: bytes
    mapping: dict[str, str]
    local: dict[str, Any]

    @classmethod
    def from_row(cls, r: tuple[Any, ...]) -> EscalationRow:
        return cls(
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            bool(r[5]),
            bool(r[6]),
            r[7],
            r[8],
            r[9],
            r[10],
            bytes(r[11]),
            json.loads(r[12]),
            json.loads(r[13]),
        )


@dataclass(frozen=True, slots=True)
class Admission:
    """What the journal knew about a job id when it arrived."""

    state: str  # "new" | "in_flight" | "answered" | "duplicate_delivery" | "conflict"
    result: bytes | None = None
    task: str | None = None
    """For ``conflict``: the task that already owns the id."""


def normalise_input(value: str | dict[str, Any]) -> str:
    """Cache-key form of an input: the serialised :func:`edgeagent.inputs.model_input`, so
    inputs that share a cache entry are exactly the inputs the models cannot tell apart
    (text: NFC, whitespace collapsed; objects: keys sorted)."""
    return canonical_input(value)


def cache_key(task: str, fingerprint: str, value: str | dict[str, Any]) -> str:
    h = hashlib.sha256()
    for part in (task, fingerprint, normalise_input(value)):
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


class Store:
    def __init__(self, path: Path, *, synchronous: str = "full") -> None:
        self.path = path
        self.synchronous = synchronous
        """``full``: every commit is an ``fsync`` (survives power loss); ``normal``: not."""
        _check_location(path)
        self._committing: Future[None] | None = None
        self._reader: sqlite3.Connection | None = None
        self._commit_thread: ThreadPoolExecutor | None = None
        self._checkpointer: threading.Thread | None = None
        self._checkpoint_requests: queue.SimpleQueue[Future[None] | None] = queue.SimpleQueue()
        self._checkpointing: Future[None] | None = None
        self._commits_since_checkpoint = 0
        try:
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise _open_error(exc, path) from exc
        try:
            self._db.execute("PRAGMA busy_timeout=5000")
            fresh = self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
            if fresh:  # only a new file can take it without a full VACUUM
                self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
            self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            self._db.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT_BYTES}")
            self._db.execute("PRAGMA temp_store=MEMORY")
            if not fresh:
                row = self._db.execute("PRAGMA quick_check(1)").fetchone()
                if row is None or row[0] != "ok":
                    raise sqlite3.DatabaseError(
                        f"database disk image is malformed: {row[0] if row else '?'}"
                    )
            self._migrate()
            self._outbox_rows = self._count("outbox")
            self.last_seq = int(
                self._db.execute("SELECT coalesce(max(seq), 0) FROM outbox").fetchone()[0]
            )
            """Highest outbox ``seq`` committed (lets the publisher skip an empty query)."""
            self._fresh: collections.deque[OutboxRow] = collections.deque()
            """Committed outbox rows after ``_fresh_from``, every one of them, in ``seq``
            order: what :meth:`outbox` serves without a SELECT."""
            self._fresh_from = self.last_seq
            self._next_seq = 1 + max(
                self.last_seq,
                int(
                    self._db.execute("SELECT coalesce(max(seq), 0) FROM dead_letters").fetchone()[0]
                ),
            )
            """The ``seq`` of the next outbox row (see the note on schema 2)."""
            self._fresh_lock = threading.Lock()  # commit() may run in the commit thread
            self.cache_rows = self._count("cache")
        except StoreError:
            self._db.close()
            raise
        except sqlite3.Error as exc:
            self._db.close()
            raise _open_error(exc, path) from exc

    # -- schema -------------------------------------------------------------------

    def _migrate(self) -> None:
        try:
            have = self._db.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name='meta'"
            ).fetchone()
            version = 0
            if have:
                row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
                version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"state file {self.path} was written by a newer edgeagent (schema "
                    f"{version}; this one knows {SCHEMA_VERSION}); refusing to touch it: "
                    "upgrade edgeagent again, or point store.state_dir at another directory",
                    "newer_schema",
                )
            if have and version < SCHEMA_VERSION:
                # Back up before migrating: a failed migration must not cost the journal.
                # SQLite's online backup, not a file copy: what the last run committed may
                # still be in the WAL only (it was killed), and a copy of the file misses it.
                bak = self.path.with_suffix(f".v{version}.bak")
                try:
                    dst = sqlite3.connect(bak)
                    try:
                        self._db.backup(dst)
                    finally:
                        dst.close()
                except sqlite3.Error as exc:
                    raise StoreError(
                        f"cannot back up {self.path} to {bak} before migrating it: {exc}",
                        "full" if error_kind(exc) == "full" else "io",
                    ) from exc
            steps = [_MIGRATIONS[n] for n in range(max(version, 1) + 1, SCHEMA_VERSION + 1)]
            with self._tx():
                for before, _ in steps if have else ():
                    for stmt in before:
                        self._db.execute(stmt)
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        self._db.execute(stmt)
                for _, after in steps if have else ():
                    for stmt in after:
                        self._db.execute(stmt)
                self._db.execute(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema', ?)",
                    (str(SCHEMA_VERSION),),
                )
        except sqlite3.Error as exc:
            raise _open_error(exc, self.path) from exc

    @property
    def _db(self) -> sqlite3.Connection:
        """The connection, once a commit running in the commit thread has finished."""
        if self._committing is not None:
            self.settle()
        return self._conn

    def settle(self) -> None:
        """Wait for the commit running in the commit thread (:meth:`commit_in_thread`);
        its outcome is for whoever started it."""
        fut, self._committing = self._committing, None
        if fut is not None:
            with suppress(Exception):
                fut.result()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT; SQLite errors leave as StoreError (see :func:`translate`)."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise translate(exc, self.path) from exc
        try:
            yield self._db
        except BaseException as exc:
            self._rollback()
            if isinstance(exc, sqlite3.Error):
                raise translate(exc, self.path) from exc
            raise
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise translate(exc, self.path) from exc

    def _rollback(self) -> None:
        # SQLite may already have rolled back by itself (SQLITE_FULL, SQLITE_IOERR).
        if self._conn.in_transaction:
            with suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[Transaction]:
        """One atomic unit of work (committed on exit), durable unless ``durable=False``.

        ``durable=False`` commits without an ``fsync`` even with ``synchronous = "full"``
        (WAL mode stays consistent: such a commit may be lost in a power cut, and it is
        made durable by the next durable commit, whose ``fsync`` covers the whole WAL).
        """
        tx = self.begin(durable=durable)
        try:
            yield tx
        except BaseException as exc:
            self.rollback(tx)
            if isinstance(exc, sqlite3.Error):
                raise translate(exc, self.path) from exc
            raise
        self.commit(tx)

    def begin(self, *, durable: bool = True) -> Transaction:
        """BEGIN IMMEDIATE: a transaction to end with :meth:`commit` (or
        :meth:`commit_in_thread`) or :meth:`rollback`; :meth:`transaction` does both."""
        db = self._db
        relax = not durable and self.synchronous == "full"
        if relax:
            self._set_synchronous("NORMAL")
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            if relax:
                self._set_synchronous("FULL")
            raise translate(exc, self.path) from exc
        return Transaction(db, self, relaxed=relax)

    def commit(self, tx: Transaction) -> None:
        """COMMIT ``tx`` (on failure it is rolled back and a StoreError raised).

        Touches only the connection, so :meth:`commit_in_thread` may run it elsewhere.
        """
        try:
            tx.write_held()
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise translate(exc, self.path) from exc
        finally:
            if tx.relaxed:
                self._set_synchronous("FULL")
        self._outbox_rows = max(0, self._outbox_rows + tx.outbox_added - tx.outbox_removed)
        if tx.fresh:
            with self._fresh_lock:
                if len(self._fresh) + len(tx.fresh) > FRESH_OUTBOX_ROWS:
                    self._fresh.clear()  # nobody takes them: read them back when wanted
                    self._fresh_from = tx.last_seq
                else:
                    self._fresh.extend(tx.fresh)
        if tx.removed:
            self._forget_fresh(tx.removed)
        if tx.last_seq:
            self.last_seq = tx.last_seq
        self._commits_since_checkpoint += 1
        if self._commits_since_checkpoint >= CHECKPOINT_EVERY_COMMITS:
            self._checkpoint_soon()

    def _forget_fresh(self, seqs: list[int]) -> None:
        """Deleted outbox rows leave the publisher's memory too (usually they left it when
        they were sent)."""
        with self._fresh_lock:
            fresh = self._fresh
            if fresh and max(seqs) >= fresh[0].seq:
                gone = set(seqs)
                self._fresh = collections.deque(r for r in fresh if r.seq not in gone)

    def _checkpoint_soon(self) -> None:
        """Ask the checkpoint thread for a PASSIVE checkpoint unless one runs (after a
        commit; commits never overlap, so this needs no lock)."""
        if self._checkpointing is not None and not self._checkpointing.done():
            return
        self._commits_since_checkpoint = 0
        if self._checkpointer is None:
            # A daemon thread: a store nobody closed must not keep the process alive.
            self._checkpointer = threading.Thread(
                target=_checkpoint_worker,
                args=(self._checkpoint_requests, self.path, self.synchronous),
                name="store-checkpoint",
                daemon=True,
            )
            self._checkpointer.start()
            weakref.finalize(self, self._checkpoint_requests.put, None)
        self._checkpointing = Future()
        self._checkpoint_requests.put(self._checkpointing)

    def rollback(self, tx: Transaction) -> None:
        """Undo ``tx`` (see :meth:`begin`)."""
        self._rollback()
        if tx.relaxed:
            self._set_synchronous("FULL")

    def commit_in_thread(self, tx: Transaction) -> Future[None]:
        """COMMIT ``tx`` in the store's commit thread, so that its ``fsync`` does not hold up
        the caller (the event loop).  Until it is done, any other use of the store waits for
        it (:meth:`settle`).  The future holds the outcome of :meth:`commit`."""
        if self._commit_thread is None:
            self._commit_thread = ThreadPoolExecutor(1, thread_name_prefix="store-commit")
        self.settle()
        self._committing = self._commit_thread.submit(self.commit, tx)
        return self._committing

    def _set_synchronous(self, level: str) -> None:
        try:
            self._conn.execute(f"PRAGMA synchronous={level}")
        except sqlite3.Error as exc:
            raise translate(exc, self.path) from exc

    def _count(self, table: str) -> int:
        return int(self._db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

    # -- journal ------------------------------------------------------------------

    def open_jobs(self) -> list[Job]:
        """Jobs received but not answered (recovery after a crash), oldest first."""
        rows = self._db.execute(
            "SELECT job FROM jobs WHERE state='received' ORDER BY received_at"
        ).fetchall()
        return [Job.from_json(r[0]) for r in rows]

    def job(self, job_id: str) -> Job | None:
        row = self._db.execute("SELECT job FROM jobs WHERE id=?", (job_id,)).fetchone()
        return None if row is None else Job.from_json(row[0])

    def received_at(self, job_id: str) -> float | None:
        row = self._db.execute("SELECT received_at FROM jobs WHERE id=?", (job_id,)).fetchone()
        return float(row[0]) if row else None

    def stored_result(self, job_id: str) -> bytes | None:
        row = self._db.execute(
            "SELECT result FROM jobs WHERE id=? AND state='answered'", (job_id,)
        ).fetchone()
        return bytes(row[0]) if row else None

    def open_job_count(self) -> int:
        return int(
            self._db.execute("SELECT count(*) FROM jobs WHERE state='received'").fetchone()[0]
        )

    def prune(self, *, retention_s: float, now: float | None = None) -> int:
        """Forget answered jobs older than the retention window and expired cache rows."""
        t = time.time() if now is None else now
        cutoff = t - retention_s
        with self._tx() as db:
            # Jobs are inserted as they arrive: the old ones are the first rowids, up to the
            # first job received after the cut-off (a scan as long as what it deletes; no
            # index on answered_at to keep up at every answer).
            first_kept = db.execute(
                "SELECT rowid FROM jobs WHERE received_at >= ? ORDER BY rowid LIMIT 1", (cutoff,)
            ).fetchone()
            old = (first_kept[0] if first_kept else _MAX_ROWID, cutoff)
            db.execute(
                "DELETE FROM reply_targets WHERE job_id IN (SELECT id FROM jobs WHERE "
                "rowid < ? AND state='answered' AND answered_at < ?)",
                old,
            )
            cur = db.execute(
                "DELETE FROM jobs WHERE rowid < ? AND state='answered' AND answered_at < ?", old
            )
            n = cur.rowcount
            db.execute("DELETE FROM cache WHERE expires_at < ?", (t,))
        self.cache_rows = self._count("cache")
        return n

    # -- outbox -------------------------------------------------------------------

    @property
    def outbox_depth(self) -> int:
        return self._outbox_rows

    def outbox(self, *, after: int = 0, limit: int = 1000) -> list[OutboxRow]:
        """Committed outbox rows after ``after``, in ``seq`` order (``seq <= last_seq``).

        The rows this process committed are served from memory; others (those of an
        earlier run, or too many unsent) are read back.  While a COMMIT runs in the commit
        thread they are read on a second connection, which sees committed data only and
        does not wait for it.
        """
        with self._fresh_lock:
            if after >= self._fresh_from:
                fresh = self._fresh
                while fresh and fresh[0].seq <= after:  # sent: never asked for again
                    fresh.popleft()
                self._fresh_from = after
                return list(itertools.islice(fresh, limit))
        try:
            busy = self._committing is not None and not self._committing.done()
            if busy and self._reader is None:
                self._reader = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False
                )
            db = self._reader if busy and self._reader is not None else self._db
            rows = db.execute(
                "SELECT seq, topic, payload, correlation, response_topic FROM outbox "
                "WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                (after, self.last_seq, limit),
            ).fetchall()
        except sqlite3.Error as exc:
            raise translate(exc, self.path) from exc
        return [
            OutboxRow(r[0], r[1], bytes(r[2]), None if r[3] is None else bytes(r[3]), r[4])
            for r in rows
        ]

    def outbox_done(self, seqs: Iterable[int]) -> None:
        """The broker acknowledged these rows: forget them."""
        seq_list = list(seqs)
        if not seq_list:
            return
        with self.transaction(durable=False) as tx:
            tx.outbox_done(seq_list)

    # -- dead letters -------------------------------------------------------------

    def dead_letter(self, seq: int, reason_code: int, reason: str) -> DeadLetter | None:
        """The broker refused outbox row ``seq`` (PUBACK reason code >= 0x80): move it to
        ``dead_letters`` (the job's result stays in the journal), in one transaction.

        Returns the dead letter, None if the row is gone.  The table keeps the newest
        :data:`DEAD_LETTER_MAX_ROWS` rows (a refused escalation is re-sent and refused again).
        """
        row = self._db.execute(
            "SELECT topic, payload, correlation, response_topic, created_at FROM outbox "
            "WHERE seq=?",
            (seq,),
        ).fetchone()
        if row is None:
            return None
        payload = bytes(row[1])
        now = time.time()
        with self._tx() as db:
            job_id = _job_id_of(db, payload)
            db.execute(
                "INSERT OR REPLACE INTO dead_letters(seq, job_id, topic, payload, correlation, "
                "response_topic, created_at, reason_code, reason, refused_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, job_id, row[0], payload, row[2], row[3], row[4], reason_code, reason, now),
            )
            db.execute("DELETE FROM outbox WHERE seq=?", (seq,))
            db.execute(
                "DELETE FROM dead_letters WHERE seq <= "
                "(SELECT seq FROM dead_letters ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                (DEAD_LETTER_MAX_ROWS,),
            )
        self._outbox_rows = max(0, self._outbox_rows - 1)
        self._forget_fresh([seq])
        return DeadLetter(seq, job_id, row[0], payload, reason_code, reason, now)

    # -- cache --------------------------------------------------------------------

    def cache_get(self, key: str, *, now: float | None = None) -> dict[str, Any] | None:
        t = time.time() if now is None else now
        row = self._db.execute("SELECT value, expires_at FROM cache WHERE key=?", (key,)).fetchone()
        if row is None or row[1] < t:
            return None
        value: dict[str, Any] = json.loads(row[0])
        return value

    # -- escalations --------------------------------------------------------------

    def escalation(self, esc_id: str) -> EscalationRow | None:
        row = self._db.execute(_ESC_SELECT + " WHERE id=?", (esc_id,)).fetchone()
        return None if row is None else EscalationRow.from_row(row)

    def pending_escalations(self) -> list[EscalationRow]:
        rows = self._db.execute(
            _ESC_SELECT + " WHERE state='pending' ORDER BY created_at"
        ).fetchall()
        return [EscalationRow.from_row(r) for r in rows]

    def pending_escalation_jobs(self) -> set[str]:
        rows = self._db.execute(
            "SELECT job_id FROM escalations WHERE state='pending' AND audit=0 AND provisional=0"
        ).fetchall()
        return {r[0] for r in rows}

    def examples(self, task: str | None = None) -> Iterator[dict[str, Any]]:
        """Labelled examples learned from the cloud, oldest first (for `edgeagent export`)."""
        sql = (
            "SELECT task, input, cloud_output, local_output, local_confidence, agreed, reason, "
            "model, created_at FROM examples"
        )
        args: tuple[str, ...] = ()
        if task is not None:
            sql += " WHERE task=?"
            args = (task,)
        for r in self._db.execute(sql + " ORDER BY seq", args):
            yield {
                "task": r[0],
                "input": json.loads(r[1]),
                "cloud_output": json.loads(r[2]),
                "local_output": None if r[3] is None else json.loads(r[3]),
                "local_confidence": r[4],
                "agreed": None if r[5] is None else bool(r[5]),
                "reason": r[6],
                "model": r[7],
                "created_at": r[8],
            }

    def learn_examples(self, task: str) -> list[tuple[int, Any, Any, str, float]]:
        """``(seq, input, cloud_output, reason, created_at)`` of a task's kept examples,
        oldest first (what :mod:`edgeagent.learning` refits on)."""
        rows = self._db.execute(
            "SELECT seq, input, cloud_output, reason, created_at FROM examples "
            "WHERE task=? ORDER BY seq",
            (task,),
        ).fetchall()
        return [(r[0], json.loads(r[1]), json.loads(r[2]), r[3], r[4]) for r in rows]

    def delete_examples(self, seqs: Iterable[int]) -> int:
        """Forget examples (storage bounds of the learner); returns how many went."""
        seq_list = [(s,) for s in seqs]
        if not seq_list:
            return 0
        with self._tx() as db:
            db.executemany("DELETE FROM examples WHERE seq=?", seq_list)
        return len(seq_list)

    def cache_count(self) -> int:
        return self._count("cache")

    # -- disk footprint -----------------------------------------------------------

    def probe(self) -> None:
        """A tiny durable write: raises StoreUnavailable while the disk is still unusable."""
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('probe', ?)", (str(time.time()),)
            )

    def maintain(self) -> None:
        """When idle: return free pages to the file system and truncate the WAL to zero."""
        try:
            self._db.execute("PRAGMA incremental_vacuum").fetchall()  # one page per step
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            raise translate(exc, self.path) from exc

    def footprint(self) -> int:
        """Bytes on disk of the database, its WAL and its shared-memory index."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with suppress(OSError):
                total += os.stat(f"{self.path}{suffix}").st_size
        return total

    def free_bytes(self) -> int:
        """Free space on the state directory's file system (bytes)."""
        return shutil.disk_usage(self.path.parent).free

    def close(self) -> None:
        self.settle()
        if self._commit_thread is not None:
            self._commit_thread.shutdown()
        if self._checkpointer is not None:
            self._checkpoint_requests.put(None)
            self._checkpointer.join()
        if self._reader is not None:
            self._reader.close()
        with suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()


class Transaction:
    """Writes inside :meth:`Store.transaction`."""

    def __init__(self, db: sqlite3.Connection, store: Store, *, relaxed: bool = False) -> None:
        self._db = db
        self._store = store
        self.relaxed = relaxed
        """Committed without an ``fsync`` (``Store.begin(durable=False)``)."""
        self.outbox_added = 0
        self.outbox_removed = 0
        self.last_seq = 0
        self.fresh: list[OutboxRow] = []
        """The outbox rows this transaction adds (the publisher's, once committed)."""
        self.removed: list[int] = []
        """The outbox rows this transaction deletes."""
        self._held: dict[str, tuple[str, str, float, tuple[ReplyTarget, ...]]] = {}
        """Jobs admitted in this transaction and not written yet (``task``, job JSON, time
        received, the reply targets this transaction gave it).  A job answered in the same
        transaction (at admission: an ``inline`` backend, the cache) is then written once,
        as ``answered``, and never enters the index of open jobs: one page fewer per job;
        its targets are all those it has (a new job has none before), so its answer reads
        nothing back.  The others are written as ``received`` just before the COMMIT
        (:meth:`write_held`)."""

    @contextmanager
    def savepoint(self, *, alone: bool = False) -> Iterator[None]:
        """Writes of one message: on an exception they are undone, the transaction goes on.

        Errors after which SQLite may have abandoned the whole transaction (disk full, I/O,
        corruption) are not contained: they fail the transaction.  ``alone``: these are the
        only writes of the transaction, so no SAVEPOINT is needed (two statements fewer);
        after an exception the caller must roll the whole transaction back instead of
        committing it (:meth:`Store.rollback`), which undoes the same writes.
        """
        if not self._db.in_transaction:  # SAVEPOINT would silently open a new transaction
            raise StoreUnavailable(f"state file {self._store.path}: transaction lost", "io")
        saved = (self.outbox_added, self.outbox_removed, self.last_seq, self._store.cache_rows)
        fresh, removed, held = len(self.fresh), len(self.removed), dict(self._held)
        if not alone:
            self._db.execute("SAVEPOINT one_message")
        try:
            yield
        except BaseException as exc:
            if isinstance(exc, sqlite3.Error) and error_kind(exc) != "other":
                raise translate(exc, self._store.path) from exc
            if not self._db.in_transaction:
                # SQLite abandoned the whole transaction: none of it may look committed.
                raise StoreUnavailable(
                    f"state file {self._store.path}: transaction rolled back ({exc!r})", "io"
                ) from exc
            if not alone:
                self._db.execute("ROLLBACK TO one_message")
                self._db.execute("RELEASE one_message")
            self.outbox_added, self.outbox_removed, self.last_seq, self._store.cache_rows = saved
            del self.fresh[fresh:], self.removed[removed:]
            self._held = held
            raise
        if not alone:
            self._db.execute("RELEASE one_message")

    def admit(self, job: Job, target: ReplyTarget | None, *, redelivery: bool) -> Admission:
        """Journal a job (idempotent by id) and remember where its result must go.

        ``redelivery`` is the MQTT DUP flag: a broker redelivery to a target we
        already know gets nothing new; a producer's deliberate retry does get the
        stored result again.  An id is a device-wide key: the same id on another
        task is a ``conflict`` (nothing is written).
        """
        held = self._held.get(job.id)
        stored: Any = None  # the result of an answered job
        if held is not None:  # a second message of this transaction with the same id
            owner, state = held[0], "received"
        else:
            row = self._db.execute(
                "SELECT task, state, result FROM jobs WHERE id=?", (job.id,)
            ).fetchone()
            if row is None:
                self._held[job.id] = (job.task, job.to_json(), time.time(), ())
                owner, state = job.task, "new"
            else:
                owner, state, stored = str(row[0]), str(row[1]), row[2]
        if owner != job.task:
            return Admission("conflict", task=owner)
        known_target = False
        if target is not None:
            t = self._db.execute(
                "INSERT OR IGNORE INTO reply_targets(job_id, topic, correlation) VALUES (?, ?, ?)",
                (job.id, target.topic, target.correlation or b""),
            )
            known_target = t.rowcount == 0
            held = self._held.get(job.id)
            if held is not None and not known_target:
                stored_as = ReplyTarget(target.topic, target.correlation or None)  # as read back
                self._held[job.id] = (*held[:3], (*held[3], stored_as))
        if state == "new":
            return Admission("new")
        if state == "received":
            return Admission("in_flight")
        if known_target and redelivery:
            return Admission("duplicate_delivery")
        return Admission("answered", bytes(stored))

    def write_held(self) -> None:
        """Journal the jobs admitted in this transaction and not answered in it, as
        ``received`` (:meth:`Store.commit` calls it just before the COMMIT)."""
        if self._held:
            self._db.executemany(
                "INSERT INTO jobs(id, task, state, job, received_at) "
                "VALUES (?, ?, 'received', ?, ?)",
                [(jid, *row[:3]) for jid, row in self._held.items()],
            )
            self._held.clear()

    def answer(self, job_id: str, result: bytes, *, fallback: ReplyTarget) -> list[ReplyTarget]:
        """Store a job's result and queue it for every reply target, in this transaction.

        Returns the targets (``fallback`` when the job named none).  A job that is
        already answered keeps its first result (never answered twice).
        """
        held = self._held.pop(job_id, None)
        if held is not None:  # admitted in this transaction: one row, written answered
            self._db.execute(
                "INSERT INTO jobs(id, task, state, job, received_at, answered_at, result) "
                "VALUES (?, ?, 'answered', ?, ?, ?, ?)",
                (job_id, *held[:3], time.time(), result),
            )
            # Its targets are the ones given here, in the table's (primary key) order.
            targets = sorted(held[3], key=lambda t: (t.topic, t.correlation or b""))
            for t in targets:
                self.enqueue(t.topic, result, t.correlation)
        else:
            cur = self._db.execute(
                "UPDATE jobs SET state='answered', result=?, answered_at=? "
                "WHERE id=? AND state='received'",
                (result, time.time(), job_id),
            )
            if cur.rowcount == 0:
                return []
            targets = self._enqueue_for_targets(job_id, result)
        if not targets:
            self.enqueue(fallback.topic, result, fallback.correlation)
            targets = [fallback]
        return targets

    def supersede(self, job_id: str, result: bytes) -> list[ReplyTarget]:
        """Replace an answered job's result (a provisional answer the cloud has now answered)
        and queue the new result for every reply target."""
        cur = self._db.execute(
            "UPDATE jobs SET result=? WHERE id=? AND state='answered'", (result, job_id)
        )
        if cur.rowcount == 0:
            return []
        return self._enqueue_for_targets(job_id, result)

    def _enqueue_for_targets(self, job_id: str, result: bytes) -> list[ReplyTarget]:
        """Queue ``result`` for each reply target of the job (none: nothing queued)."""
        rows = self._db.execute(
            "SELECT topic, correlation FROM reply_targets WHERE job_id=?", (job_id,)
        ).fetchall()
        targets = [ReplyTarget(r[0], bytes(r[1]) or None) for r in rows]
        for t in targets:
            self.enqueue(t.topic, result, t.correlation)
        return targets

    def add_escalation(self, row: EscalationRow) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO escalations(id, job_id, task, reason, state, audit, provisional,"
            " created_at, deadline_at, next_attempt_at, attempts, request, mapping, local) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.id,
                row.job_id,
                row.task,
                row.reason,
                row.state,
                int(row.audit),
                int(row.provisional),
                row.created_at,
                row.deadline_at,
                row.next_attempt_at,
                row.attempts,
                row.request,
                json.dumps(row.mapping),
                json.dumps(row.local),
            ),
        )

    def escalation_sent(self, esc_id: str, *, next_attempt_at: float) -> None:
        self._db.execute(
            "UPDATE escalations SET attempts = attempts + 1, next_attempt_at=? WHERE id=?",
            (next_attempt_at, esc_id),
        )

    def close_escalation(self, esc_id: str, state: str) -> bool:
        """Mark a pending escalation done/failed/expired; False if it was not pending."""
        cur = self._db.execute(
            "UPDATE escalations SET state=? WHERE id=? AND state='pending'", (state, esc_id)
        )
        return cur.rowcount == 1

    def add_example(
        self,
        *,
        task: str,
        input: Any,
        cloud_output: Any,
        local_output: Any,
        local_confidence: float | None,
        reason: str,
        model: str | None,
    ) -> None:
        agreed = None if local_output is None else int(local_output == cloud_output)
        self._db.execute(
            "INSERT INTO examples(task, input, cloud_output, local_output, local_confidence, "
            "agreed, reason, model, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                task,
                json.dumps(input, ensure_ascii=False),
                json.dumps(cloud_output, ensure_ascii=False),
                None if local_output is None else json.dumps(local_output, ensure_ascii=False),
                local_confidence,
                agreed,
                reason,
                model,
                time.time(),
            ),
        )

    def enqueue(
        self,
        topic: str,
        payload: bytes,
        correlation: bytes | None = None,
        response_topic: str | None = None,
    ) -> None:
        seq = self._store._next_seq
        self._db.execute(
            "INSERT INTO outbox(seq, topic, payload, correlation, response_topic, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (seq, topic, payload, correlation, response_topic, time.time()),
        )
        self._store._next_seq = seq + 1  # a number rolled back with its row is not reused
        self._added(seq, topic, payload, correlation, response_topic)

    def _added(
        self,
        seq: int,
        topic: str,
        payload: bytes,
        correlation: bytes | None,
        response_topic: str | None,
    ) -> None:
        """Account for an outbox row this transaction inserted (the publisher gets it from
        memory once committed)."""
        self.outbox_added += 1
        self.last_seq = seq
        self.fresh.append(OutboxRow(seq, topic, payload, correlation, response_topic))

    def outbox_done(self, seqs: list[int]) -> None:
        """The broker acknowledged these outbox rows: forget them."""
        cur = self._db.executemany("DELETE FROM outbox WHERE seq BETWEEN ? AND ?", _runs(seqs))
        self.outbox_removed += max(0, cur.rowcount)
        self.removed += seqs

    def cache_put(
        self, key: str, task: str, value: dict[str, Any], *, ttl_s: float, max_entries: int
    ) -> None:
        now = time.time()
        cur = self._db.execute(
            "INSERT OR IGNORE INTO cache(key, task, value, created_at, expires_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (key, task, json.dumps(value, ensure_ascii=False), now, now + ttl_s),
        )
        self._store.cache_rows += cur.rowcount
        # Trim the oldest entries in chunks once over the cap (not on every insert).
        over = self._store.cache_rows - max_entries
        if over > 0:
            trim = over + max(1, max_entries // 20)
            cur = self._db.execute(
                "DELETE FROM cache WHERE key IN "
                "(SELECT key FROM cache ORDER BY created_at LIMIT ?)",
                (trim,),
            )
            self._store.cache_rows -= cur.rowcount


def _runs(seqs: list[int]) -> list[tuple[int, int]]:
    """``seqs`` as runs of consecutive numbers, ``(first, last)`` each (PUBACKs mostly come
    in order: one DELETE for a run of them)."""
    runs: list[tuple[int, int]] = []
    for seq in sorted(set(seqs)):
        if runs and seq == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], seq)
        else:
            runs.append((seq, seq))
    return runs


def _checkpoint_worker(
    requests: queue.SimpleQueue[Future[None] | None], path: Path, synchronous: str
) -> None:
    """The store's checkpoint thread: a PASSIVE checkpoint per request, on a connection of
    its own, until ``None``.  It copies committed WAL frames into the database without
    blocking the writer; a failure is harmless (the writer's own checkpoint remains)."""
    conn: sqlite3.Connection | None = None
    try:
        while (done := requests.get()) is not None:
            try:
                if conn is None:
                    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                    conn.execute(
                        f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}"
                    )
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error:
                pass
            done.set_result(None)
    finally:
        if conn is not None:
            conn.close()


# -- opening --------------------------------------------------------------------


def _check_location(path: Path) -> None:
    """The state directory exists (one missing level is created) and everything is writable.

    Only the last level is created: a missing parent usually means a disk that is not
    mounted, and a journal silently written to the root file system instead is worse.
    """
    d = path.parent
    if not d.is_dir():
        if d.exists():
            raise StoreError(f"state directory {d} exists but is not a directory", "missing_dir")
        if not d.parent.is_dir():
            raise StoreError(
                f"state directory {d} does not exist, nor does {d.parent} (is its disk "
                "mounted?); create it, or set store.state_dir",
                "missing_dir",
            )
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise StoreError(
                    f"cannot create state directory {d}: {_why_not_writable(d.parent)}",
                    "read_only",
                ) from exc
            raise StoreError(f"cannot create state directory {d}: {exc.strerror}", "io") from exc
    if not os.access(d, os.W_OK | os.X_OK):
        raise StoreError(
            f"state directory {d} is not writable ({_why_not_writable(d)}); edgeagent needs "
            f"to create {path.name}-wal and {path.name}-shm in it: make it writable by the "
            "user edgeagent runs as",
            "read_only",
        )
    for f in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if f.exists() and not os.access(f, os.R_OK | os.W_OK):
            raise StoreError(
                f"state file {f} is not writable ({_why_not_writable(f)}); the file is not "
                "damaged: make it readable and writable by the user edgeagent runs as "
                "(chown/chmod), do not move it aside",
                "read_only",
            )


def _why_not_writable(p: Path) -> str:
    try:
        if os.statvfs(p).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        pass
    return f"permission denied for uid {os.geteuid()}"


def _open_error(exc: sqlite3.Error, path: Path) -> StoreError:
    kind = error_kind(exc)
    if kind == "read_only":
        return StoreError(
            f"state file {path} cannot be written ({exc}; {_why_not_writable(path.parent)}); "
            "the file is not damaged: make it and its directory writable by the user "
            "edgeagent runs as, do not move it aside",
            "read_only",
        )
    if kind == "full":
        return StoreError(
            f"no space left for state file {path} ({exc}): free space on its file system",
            "full",
        )
    if kind == "io":
        return StoreError(f"I/O error on state file {path} ({exc}): check the disk", "io")
    if kind == "busy":
        return StoreError(
            f"state file {path} is locked by another process ({exc}): is another edgeagent "
            "(or a sqlite3 shell) using the same store.state_dir?",
            "busy",
        )
    if kind == "corrupt":
        err = translate(exc, path)
        assert isinstance(err, StoreError)
        return err
    return StoreError(f"state file {path} is unusable: {exc}", "unusable")
