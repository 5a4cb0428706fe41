"""Group commit: the store writes of one event-loop turn share one SQLite transaction.

A commit costs a fixed price (with ``store.synchronous = "full"`` an ``fsync``, about
as long as a whole MQTT round trip), so the daemon does not commit per job: intake,
delivery and outbox clean-up :meth:`GroupCommitter.submit` their writes, and the
committer runs every write queued so far in ONE transaction at the end of the turn
(``loop.call_soon``), then calls each write's ``after`` callback in submission order.

The guarantees are those of a transaction per write:

* ``after`` (acknowledge to the broker, publish, schedule) runs only once the commit
  has succeeded, so nothing is acknowledged before it is durable and nothing is
  published before it is committed;
* each write runs under its own savepoint: one that raises is rolled back alone
  (its ``undo`` runs and the error goes to ``on_error``) and the others still commit;
* a store failure (disk full, I/O error, damaged file) anywhere rolls back the whole
  group: no ``after`` runs, every ``undo`` runs (in submission order) and the error
  goes to ``on_error`` once, with the ``where`` of the first write.

Thread model: event loop only (``submit`` from another thread is a bug).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from edgeagent.logs import get_logger
from edgeagent.store import Store, StoreError, Transaction

log = get_logger("edgeagent.commit")

T = TypeVar("T")


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
    runs once after the ``after`` callbacks of each successful commit (e.g. publish
    what the group queued in the outbox).
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
        self._closed = False
        self.commits = 0
        """Transactions committed so far (each write shares one with the others of its turn)."""
        self.writes = 0
        """Writes committed so far."""

    @property
    def pending(self) -> int:
        """Writes queued for the next commit."""
        return len(self._queue)

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
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> bool:
        """Commit everything queued now; False if the group failed (``on_error`` was told).

        Runs by itself at the end of the turn; call it directly before closing the store.
        """
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if not self._queue:
            return True
        batch, self._queue = self._queue, []
        done: list[tuple[_Write[Any], Any]] = []
        failed: list[tuple[_Write[Any], Exception]] = []
        try:
            with self.store.transaction(durable=any(w.durable for w in batch)) as tx:
                for item in batch:
                    try:
                        with tx.savepoint():
                            done.append((item, item.write(tx)))
                    except StoreError:
                        raise
                    except Exception as exc:  # rolled back alone: the others commit
                        failed.append((item, exc))
        except Exception as exc:
            for item in batch:
                self._run(item.undo, item.where)
            self._on_error(exc, batch[0].where)
            return False
        self.commits += 1
        self.writes += len(done)
        for item, error in failed:
            self._run(item.undo, item.where)
            self._on_error(error, item.where)
        for item, value in done:
            if item.after is not None:
                self._run(item.after, item.where, value)
        if self._committed is not None:
            self._run(self._committed, "committed")
        return True

    def close(self, *, commit: bool = True) -> None:
        """Commit what is queued (``commit=False``: drop it, running the ``undo``
        callbacks), then refuse new writes (their ``undo`` runs at once)."""
        if commit:
            self.flush()
        else:
            if self._handle is not None:
                self._handle.cancel()
                self._handle = None
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
