"""Coverage-guided fuzzing of the job parser and the journal write (atheris = libFuzzer).

Every input is published as a job payload would be: parsed by ``parse_job``; a Job is
written to a real SQLite journal on disk and read back; a Rejection must carry a known
code and serialise as a result.  Any exception is a crash (libFuzzer stops, saves the input
as ``crash-*`` and exits non-zero).

    pip install atheris
    python benchmarks/fuzz_parser.py -max_total_time=300 -dict=benchmarks/fuzz/json.dict \\
        -max_len=4096 /tmp/fuzz-corpus benchmarks/fuzz/seeds

libFuzzer prints ``#N ... exec/s`` lines and, at the end, ``Done N runs in S second(s)``.
Seeds (valid and broken jobs) live in ``benchmarks/fuzz/seeds``; new coverage goes to the
first directory (keep it out of the repository).
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from edgeagent import protocol
    from edgeagent.protocol import Job, Limits, Rejection, ResultMessage, parse_job
    from edgeagent.store import ReplyTarget, Store, cache_key

LIMITS = Limits(
    max_payload_bytes=65536, max_input_bytes=16384, default_deadline_ms=5000, max_deadline_ms=60000
)
TASKS = frozenset({"alarm", "reading"})
_STATE = Path(tempfile.mkdtemp(prefix="edgeagent-fuzz-"))
STORE = Store(_STATE / "edgeagent.db", synchronous="normal")
_count = 0


def test_one_input(data: bytes) -> None:
    global _count
    out = parse_job(data, task="alarm", derived_id="d-fuzz", limits=LIMITS, known_tasks=TASKS)
    if isinstance(out, Rejection):
        if out.code not in protocol.REJECTION_CODES or not out.message:
            raise AssertionError(f"bad rejection {out!r}")
        ResultMessage(
            id=out.id,
            task="alarm",
            status="rejected",
            error={"code": out.code, "message": out.message},
        ).to_bytes().decode("utf-8")
        return
    if not isinstance(out, Job):
        raise AssertionError(f"parse_job returned {type(out)}")
    _count += 1
    job = dataclasses.replace(out, id=f"j{_count}")
    cache_key(job.task, "fp", job.input)
    with STORE.transaction() as tx:
        if tx.admit(job, ReplyTarget("r/x"), redelivery=False).state != "new":
            raise AssertionError("fresh id not new")
    back = STORE.job(job.id)
    if back != job:
        raise AssertionError(f"journal round trip changed the job: {job!r} -> {back!r}")
    if _count % 5000 == 0:  # keep the journal small
        STORE._db.execute("DELETE FROM jobs")
        STORE._db.execute("DELETE FROM reply_targets")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
