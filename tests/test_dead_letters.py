"""A publish the broker refuses is kept (dead_letters) and `edgeagent results` shows it."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from edgeagent import jobinfo, store
from edgeagent.cli import main as cli_main
from edgeagent.protocol import Job
from edgeagent.store import EscalationRow, ReplyTarget, Store

NOT_AUTHORIZED = 0x87


def _job(job_id: str) -> Job:
    return Job(job_id, "alarm", "smoke", {}, 5000, "auto")


def _answered(s: Store, job_id: str, topic: str) -> int:
    """Journal and answer a job whose result goes to ``topic``; returns its outbox seq."""
    with s.transaction() as tx:
        tx.admit(_job(job_id), ReplyTarget(topic, b"corr"), redelivery=False)
        tx.answer(
            job_id,
            json.dumps(
                {"v": 1, "id": job_id, "status": "ok", "output": {"label": "fire"}}
            ).encode(),
            fallback=ReplyTarget("edgeagent/d1/results/alarm"),
        )
    return s.last_seq


def test_refused_result_moves_to_dead_letters(tmp_path: Path) -> None:
    s = Store(tmp_path / "edgeagent.db")
    seq = _answered(s, "j1", "edgeagent/d1/other/x")
    assert s.outbox_depth == 1
    dead = s.dead_letter(seq, NOT_AUTHORIZED, "Not authorized")
    assert dead is not None
    assert (dead.job_id, dead.topic, dead.reason_code) == ("j1", "edgeagent/d1/other/x", 0x87)
    assert s.outbox_depth == 0 and s.outbox() == []
    assert s.stored_result("j1") is not None  # the result itself stays in the journal
    assert s.dead_letter(seq, NOT_AUTHORIZED, "Not authorized") is None  # gone from the outbox
    s.close()
    # Durable: a restart still has it, and the outbox stays empty.
    s = Store(tmp_path / "edgeagent.db")
    assert s.outbox_depth == 0
    s.close()
    db = jobinfo.open_readonly(tmp_path / "edgeagent.db")
    report = jobinfo.job_report(db, "j1")
    assert report is not None
    assert report["state"] == "answered"
    assert report["result"]["output"] == {"label": "fire"}
    assert report["reply_targets"] == ["edgeagent/d1/other/x"]
    [d] = report["dead_letters"]
    assert d["topic"] == "edgeagent/d1/other/x"
    assert d["reason"] == "Not authorized" and d["reason_code"] == NOT_AUTHORIZED
    assert "DEAD LETTER: edgeagent/d1/other/x" in jobinfo.render(report)


def test_refused_escalation_request_is_filed_under_its_job(tmp_path: Path) -> None:
    s = Store(tmp_path / "edgeagent.db")
    now = time.time()
    request = json.dumps({"v": 1, "escalation_id": "e-1", "task": "alarm"}).encode()
    with s.transaction() as tx:
        tx.admit(_job("j2"), None, redelivery=False)
        tx.add_escalation(
            EscalationRow(
                "e-1", "j2", "alarm", "low_confidence", "pending", False, False,
                now, now + 5, now, 0, request, {}, {},
            )
        )  # fmt: skip
        tx.enqueue("edgeagent/cloud/requests/alarm", request, b"e-1")
    dead = s.dead_letter(s.last_seq, NOT_AUTHORIZED, "Not authorized")
    assert dead is not None and dead.job_id == "j2"
    report = jobinfo.job_report(jobinfo.open_readonly(s.path), "j2")
    assert report is not None
    assert report["state"] == "received"
    assert [e["id"] for e in report["escalations"]] == ["e-1"]
    assert report["dead_letters"][0]["topic"] == "edgeagent/cloud/requests/alarm"
    s.close()


def test_dead_letters_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "DEAD_LETTER_MAX_ROWS", 3)
    s = Store(tmp_path / "edgeagent.db")
    for i in range(5):
        seq = _answered(s, f"j{i}", "edgeagent/d1/other/x")
        s.dead_letter(seq, NOT_AUTHORIZED, "Not authorized")
    rows = s._db.execute("SELECT job_id FROM dead_letters ORDER BY seq").fetchall()
    assert [r[0] for r in rows] == ["j2", "j3", "j4"]
    s.close()


def test_existing_database_gets_the_table(tmp_path: Path) -> None:
    """A state file written before dead letters existed: readable by `edgeagent results`
    as it is, and migrated (journal kept) when the daemon opens it."""
    path = tmp_path / "edgeagent.db"
    s = Store(path)
    _answered(s, "old", "edgeagent/d1/results/alarm")
    s.close()
    raw = sqlite3.connect(path)
    raw.execute("DROP TABLE dead_letters")
    raw.commit()
    raw.close()
    report = jobinfo.job_report(jobinfo.open_readonly(path), "old")
    assert report is not None and report["dead_letters"] == []
    s = Store(path)
    assert s.stored_result("old") is not None
    assert s.outbox_depth == 1
    seq = s.outbox()[0].seq
    assert s.dead_letter(seq, NOT_AUTHORIZED, "Not authorized") is not None
    s.close()


def test_results_cli_reads_without_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    s = Store(state / "edgeagent.db")
    seq = _answered(s, "j9", "edgeagent/d1/other/x")
    s.dead_letter(seq, NOT_AUTHORIZED, "Not authorized")
    s.close()
    cfg = tmp_path / "edgeagent.toml"
    cfg.write_text(f'device_id = "d1"\n[store]\nstate_dir = "{state}"\n')
    before = {p.name: p.read_bytes() for p in state.iterdir()}
    assert cli_main(["results", "--config", str(cfg), "j9"]) == 0
    out = capsys.readouterr().out
    assert "job j9: answered" in out
    assert "DEAD LETTER: edgeagent/d1/other/x refused by the broker" in out
    assert "reason code 135" in out
    assert cli_main(["results", "--config", str(cfg), "j9", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dead_letters"][0]["reason_code"] == 135
    assert cli_main(["results", "--config", str(cfg), "nope"]) == 1
    assert "no job 'nope'" in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in state.iterdir() if p.name in before}
    assert after == before
    empty = tmp_path / "empty.toml"
    empty.write_text(f'device_id = "d1"\n[store]\nstate_dir = "{tmp_path / "none"}"\n')
    assert cli_main(["results", "--config", str(empty), "j9"]) == 1
    assert "no state file" in capsys.readouterr().err
