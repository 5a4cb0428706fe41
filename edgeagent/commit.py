"""Group commit: the store writes of one event-loop turn share one SQLite transaction.

A commit costs a fixed price (with ``store.synchronous = "full"`` an ``fsync``, about
as long as a whole MQTT round trip), so the daemon does not commit per job: intake,
delivery and outbox clean-up :meth:`GroupCommitter.submit` their writes, and the
committer runs every write queued so far in ONE transaction at the end of the turn
(``loop.call_soon``), then calls ``committed()`` (publish) and each write's ``after``
callback (acknowledge, schedule) in submission order, group after group.

The guarantees are those of a transaction per write:

* ``after`` (acknowledge to the broker, publish, schedule) runs only once the commit
  has succeeded, so nothing is acknowledged before it is durable and nothing is
  published before it is committed;
* each write runs under its own savepoint: one that raises is rolled back alone
  (its ``undo`` runs and the error goes to ``on_error``) and the others still commit
  (a group of one write needs no savepoint: its transaction is rolled back instead);
* a store failure (disk full, I/O error, damaged file) anywhere rolls back the whole
  group: no ``after`` runs, every ``undo`` runs (in reverse submission order, so that
  each can push its items back to the head of a queue and keep their order) and the
  error goes to ``on_error`` once, with the ``where`` of the first write.

With ``synchronous = "full"`` the writes run on the loop but the COMMIT (the ``fsync``)
runs in the store's commit thread (:meth:`Store.commit_in_thread`), so the loop keeps
receiving, inferring and publishing meanwhile; what is submitted during that time forms
the next group, which starts as soon as the COMMIT lands (before the landed group's
``after`` callbacks run, so that its ``fsync`` overlaps them; writes queued behind a
COMMIT that fails fail with it).  At most one COMMIT is in flight, and any other use
of the store waits for it (:meth:`Store.settle`) except :meth:`Store.outbox`, which
meanwhile reads committed rows on a second connection.

Thread model: event loop only (``submit`` from another thread is a bug); the commit
thread runs nothing but ``COMMIT``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from edgeagent.store import Store, StoreError, Transaction

T = TypeVar("T")


@dataclass(slots=True)
class _Landing:
    """A group whose COMMIT runs in the store's commit thread."""

    batch: list[_Write[Any]]
    done: list[tuple[_Write[Any], Any]]
    failed: list[tuple[_Write[Any], Exception]]
    future: Future[None]


@dataclass(slots=True)
class _Write(Generic[T]):
    write: Callable[[Transaction], T]
    after: Callable[[T], None] | None
    undo: Callable[[], None] | None
    where: str
    durable: bool


class GroupCommitter:
    """Runs the writes queued during one event-loop turn in one transaction.

    ``on_error(exc, where)`` receives every failure: a :class:`StoreError` that rolled
    back the group, an exception of one write (rolled back alone), or one raised by an
    ``after`` or ``undo`` callback (the others still run).  ``committed()``, if given,
    runs once after each successful commit, before the ``after`` callbacks (e.g.
    publish what the group queued in the outbox: results first, acknowledgements next).
    """

    def __init__(
        self,
        store: Store,
        *,
        on_error: Callable[[BaseException, str], None],
        committed: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self._on_error = on_error
        self._committed = committed
        self._queue: list[_Write[Any]] = []
        self._handle: asyncio.Handle | None = None
        self._landing: _Landing | None = None  # the group whose COMMIT runs in a thread
        self._closed = False
        self.commits = 0
        """Transactions committed so far (each write shares one with the others of its turn)."""
        self.writes = 0
        """Writes committed so far."""

    @property
    def pending(self) -> int:
        """Writes queued for the next commit."""
        return len(self._queue)

    @property
    def busy(self) -> bool:
        """A group's COMMIT is running in the store's commit thread."""
        return self._landing is not None

    def submit(
        self,
        write: Callable[[Transaction], T],
        after: Callable[[T], None] | None = None,
        *,
        undo: Callable[[], None] | None = None,
        where: str = "write",
        durable: bool = True,
    ) -> None:
        """Queue ``write`` for the commit at the end of this event-loop turn.

        ``write(tx)`` runs inside the group's transaction, under its own savepoint; its
        return value goes to ``after`` once the transaction has committed.  ``undo()``
        runs instead when the write did not commit (its own exception, a failed group,
        or a committer closed before it ran): put back what the write was to consume.
        ``durable=False`` marks a write whose loss after a power cut is harmless (the
        outbox rows the broker acknowledged: a restart resends them); a group made only
        of such writes commits without an ``fsync``.  ``where`` names the write in errors.
        """
        item = _Write(write, after, undo, where, durable)
        if self._closed:
            self._run(item.undo, where)
            return
        self._queue.append(item)
        if self._handle is None and self._landing is None:
            self._handle = asyncio.get_running_loop().call_soon(self.flush)

    def flush(self, *, wait: bool = False) -> bool:
        """Commit everything queued now; False if the group failed (``on_error`` was told).

        Runs by itself at the end of the turn.  With ``synchronous = "full"`` the COMMIT
        (its ``fsync``) runs in the store's commit thread while the loop goes on; writes
        submitted meanwhile form the next group, started as soon as that COMMIT is done.
        ``wait=True`` (before closing the store) commits on the spot.
        """
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._landing is not None:
            if not wait:
                return True  # the next group starts when the COMMIT in flight lands
            self._land(self._landing)
        if not self._queue:
            return True
        batch, self._queue = self._queue, []
        durable = any(w.durable for w in batch)
        done: list[tuple[_Write[Any], Any]] = []
        failed: list[tuple[_Write[Any], Exception]] = []
        try:
            tx = self.store.begin(durable=durable)
        except Exception as exc:
            return self._fail(batch, exc)
        alone = len(batch) == 1  # no savepoint: a failure rolls the transaction back
        try:
            for item in batch:
                try:
                    with tx.savepoint(alone=alone):
                        done.append((item, item.write(tx)))
                except StoreError:
                    raise
                except Exception as exc:  # rolled back alone: the others commit
                    failed.append((item, exc))
        except Exception as exc:
            self.store.rollback(tx)
            return self._fail(batch, exc)
        if alone and failed:
            self.store.rollback(tx)  # its only write failed: nothing to commit
            item, error = failed[0]
            self._run(item.undo, item.where)
            self._on_error(error, item.where)
            return True
        if durable and self.store.synchronous == "full" and not wait:
            self._hand_off(_Landing(batch, done, failed, self.store.commit_in_thread(tx)))
            return True
        try:
            self.store.commit(tx)
        except Exception as exc:
            return self._fail(batch, exc)
        self._committed_group(done, failed)
        return True

    def _hand_off(self, landing: _Landing) -> None:
        """``landing`` runs in the commit thread; the loop hears when it is done."""
        self._landing = landing
        loop = asyncio.get_running_loop()

        def landed(_: object) -> None:  # commit thread
            with contextlib.suppress(RuntimeError):  # loop closed at shutdown
                loop.call_soon_threadsafe(self._landed, landing)

        landing.future.add_done_callback(landed)

    def _landed(self, landing: _Landing) -> None:
        """The COMMIT run in the commit thread is done (event loop)."""
        if landing is self._landing:
            self._land(landing, start_next=True)

    def _land(self, landing: _Landing, *, start_next: bool = False) -> None:
        self._landing = None
        self.store.settle()
        try:
            landing.future.result()
        except Exception as exc:
            # What was queued behind a failed COMMIT fails with it (undone in reverse order,
            # so that each write can push its items back to the head of a queue).
            queued, self._queue = self._queue, []
            self._fail(landing.batch + queued, exc)
            return
        if start_next and any(w.durable for w in self._queue):
            self.flush()  # in the commit thread: its fsync overlaps the callbacks below
        self._committed_group(landing.done, landing.failed)  # callbacks stay in group order
        if start_next and self._landing is None and self._queue:
            self.flush()

    def _fail(self, batch: list[_Write[Any]], exc: Exception) -> bool:
        for item in reversed(batch):
            self._run(item.undo, item.where)
        self._on_error(exc, batch[0].where)
        return False

    def _committed_group(
        self, done: list[tuple[_Write[Any], Any]], failed: list[tuple[_Write[Any], Exception]]
    ) -> None:
        self.commits += 1
        self.writes += len(done)
        if self._committed is not None:  # first: results are what producers wait for
            self._run(self._committed, "committed")
        for item, error in failed:
            self._run(item.undo, item.where)
            self._on_error(error, item.where)
        for item, value in done:
            if item.after is not None:
                self._run(item.after, item.where, value)

    def close(self, *, commit: bool = True) -> None:
        """Commit what is queued (``commit=False``: drop it, running the ``undo``
        callbacks), then refuse new writes (their ``undo`` runs at once)."""
        if commit:
            self.flush(wait=True)
        else:
            if self._handle is not None:
                self._handle.cancel()
                self._handle = None
            if self._landing is not None:
                self._land(self._landing)
            batch, self._queue = self._queue, []
            for item in batch:
                self._run(item.undo, item.where)
        self._closed = True

    def _run(self, fn: Callable[..., None] | None, where: str, *args: Any) -> None:
        if fn is None:
            return
        try:
            fn(*args)
        except Exception as exc:  # one callback's bug must not cost the others theirs
            self._on_error(exc, where)
