"""`edgeagent results JOB_ID`: what the state file knows about one job, read-only.

Reads the daemon's SQLite file through a read-only connection (``mode=ro``), so it
can run beside the daemon and never changes the journal.  Shows the job's state, its
stored result, where the result goes, an unacknowledged publish still in the outbox,
its escalations and any publish the broker refused (a dead letter).
"""

from __future__ import annotations

import json
import sqlite3
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from edgeagent.exitcodes import EXIT_FAILURE


class StateFileError(Exception):
    """The state file cannot be read."""


def open_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection to the state file (it must exist)."""
    if not path.exists():
        raise StateFileError(f"no state file at {path}")
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    try:
        db = sqlite3.connect(uri, uri=True)
        db.execute("PRAGMA busy_timeout=5000")
        db.execute("SELECT 1 FROM jobs LIMIT 1").fetchall()
    except sqlite3.Error as exc:
        raise StateFileError(f"cannot read state file {path}: {exc}") from exc
    return db


def _payload(data: bytes | None) -> Any:
    if data is None:
        return None
    try:
        return json.loads(bytes(data))
    except (UnicodeDecodeError, ValueError):
        return bytes(data).decode("utf-8", "backslashreplace")


def _when(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds")


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    row = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,))
    return row.fetchone() is not None


def job_report(db: sqlite3.Connection, job_id: str) -> dict[str, Any] | None:
    """Everything stored about ``job_id``; None if the state file knows nothing of it."""
    row = db.execute(
        "SELECT task, state, job, received_at, answered_at, result FROM jobs WHERE id=?",
        (job_id,),
    ).fetchone()
    dead: list[dict[str, Any]] = []
    if _has_table(db, "dead_letters"):  # absent in a file no daemon of this version opened
        for r in db.execute(
            "SELECT seq, topic, payload, reason_code, reason, created_at, refused_at "
            "FROM dead_letters WHERE job_id=? ORDER BY seq",
            (job_id,),
        ):
            dead.append(
                {
                    "topic": r[1],
                    "payload": _payload(r[2]),
                    "reason_code": r[3],
                    "reason": r[4],
                    "queued_at": _when(r[5]),
                    "refused_at": _when(r[6]),
                }
            )
    if row is None and not dead:
        return None
    report: dict[str, Any] = {"id": job_id, "dead_letters": dead}
    if row is None:
        report.update(state="forgotten", note="past store.journal_retention_s")
        return report
    report.update(
        task=row[0],
        state=row[1],
        received_at=_when(row[3]),
        answered_at=_when(row[4]),
        result=_payload(row[5]),
        reply_targets=[
            r[0] for r in db.execute("SELECT topic FROM reply_targets WHERE job_id=?", (job_id,))
        ],
    )
    try:
        waiting = db.execute(
            "SELECT topic FROM outbox WHERE json_extract(CAST(payload AS TEXT), '$.id') = ?",
            (job_id,),
        ).fetchall()
        report["unacknowledged_publishes"] = [r[0] for r in waiting]
    except sqlite3.Error:  # no JSON functions in this SQLite: leave it out
        pass
    report["escalations"] = [
        {"id": r[0], "reason": r[1], "state": r[2], "attempts": r[3], "audit": bool(r[4])}
        for r in db.execute(
            "SELECT id, reason, state, attempts, audit FROM escalations WHERE job_id=? "
            "ORDER BY created_at",
            (job_id,),
        )
    ]
    return report


def render(report: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    lines = [f"job {report['id']}: {report['state']}"]
    for key in ("task", "received_at", "answered_at"):
        if report.get(key) is not None:
            lines.append(f"  {key + ':':13}{report[key]}")
    if report.get("reply_targets"):
        lines.append(f"  {'reply to:':13}{', '.join(report['reply_targets'])}")
    if report.get("result") is not None:
        lines.append(f"  {'result:':13}{json.dumps(report['result'], ensure_ascii=False)}")
    for topic in report.get("unacknowledged_publishes", []):
        lines.append(f"  {'outbox:':13}{topic} (not yet acknowledged by the broker)")
    for e in report.get("escalations", []):
        kind = "audit" if e["audit"] else e["reason"]
        lines.append(
            f"  {'escalation:':13}{e['id']} {kind} {e['state']} ({e['attempts']} attempt(s))"
        )
    for d in report["dead_letters"]:
        lines.append(
            f"  {'DEAD LETTER:':13}{d['topic']} refused by the broker at {d['refused_at']}: "
            f"{d['reason']} (reason code {d['reason_code']})"
        )
    if report.get("note"):
        lines.append(f"  {report['note']}")
    return "\n".join(lines)


def main(state_file: Path, job_id: str, *, as_json: bool) -> int:
    try:
        db = open_readonly(state_file)
    except StateFileError as exc:
        print(f"edgeagent results: {exc}", file=sys.stderr)
        return 1
    try:
        report = job_report(db, job_id)
    finally:
        db.close()
    if report is None:
        print(f"edgeagent results: no job {job_id!r} in {state_file}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(report, ensure_ascii=False) if as_json else render(report))
    return 0
