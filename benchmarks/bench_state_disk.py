"""State-directory footprint over a burst of jobs: SQLite defaults vs the bounded WAL (issue 9).

Part 1 (always): replays the daemon's own transactions on ``edgeagent.store.Store`` — an
intake commit per batch of jobs (journal rows + reply targets), a result commit per batch
(result, outbox rows, ``answered``), an outbox delete after the PUBACKs — twice in the same
run: once with SQLite's defaults (``wal_autocheckpoint = 1000`` pages, no
``journal_size_limit``: the baseline, what the daemon had before) and once with the
settings the store now uses.  It samples the size of ``edgeagent.db`` + ``-wal`` + ``-shm``
after every commit and prints the peak, the size at the end of the burst and after the
idle maintenance (``Store.maintain``), with ratios to the baseline.

Part 2 (``--daemon``): the real ``edgeagent run`` subprocess over its own mosquitto, a burst
of ``--jobs`` jobs, the state directory sampled every 10 ms: the peak as a device sees it.

Part 3 (``--writes N``): what a job costs the storage (flash wear on an SD card or eMMC).
The real daemon (``rules`` task, ``synchronous = "normal"``) answers N jobs one at a time,
then N pipelined (64 in flight), and the kernel's per-process counters (``/proc/PID/io``)
give the bytes it wrote: to the state file system (``write_bytes``: WAL frames,
checkpoints into the database) and through ``write`` calls of any kind (``wchar``: also
its MQTT packets), per job.  With ``--baseline-repo DIR`` (a ``git archive`` of another
commit) the daemon of that tree runs in the same invocation (three fresh daemons per
tree, alternated; medians), and the ratios are printed.

    .venv/bin/python benchmarks/bench_state_disk.py [--jobs 5000] [--batch 64] [--daemon]
    .venv/bin/python benchmarks/bench_state_disk.py --writes 2000 [--baseline-repo /tmp/old]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgeagent.protocol import Job, ResultMessage  # noqa: E402
from edgeagent.store import ReplyTarget, Store  # noqa: E402


def _dir_size(d: Path) -> int:
    total = 0
    for p in d.iterdir():
        with contextlib.suppress(OSError):
            total += p.stat().st_size
    return total


def replay(state: Path, *, jobs: int, batch: int, defaults: bool) -> dict[str, int]:
    store = Store(state / "edgeagent.db", synchronous="normal")
    if defaults:  # what every edgeagent before this change ran with
        store._db.execute("PRAGMA wal_autocheckpoint=1000")
        store._db.execute("PRAGMA journal_size_limit=-1")
    peak = 0
    text = "sensor th-{} reports smoke near the kitchen door, value={}.5 °C " * 3
    for start in range(0, jobs, batch):
        ids = [f"job-{i:06d}" for i in range(start, min(jobs, start + batch))]
        with store.transaction() as tx:
            for i, jid in enumerate(ids):
                job = Job(jid, "alarm", text.format(i, i, i, i, i, i), {}, 5000, "auto")
                tx.admit(job, ReplyTarget("edgeagent/d/results/alarm", b"c"), redelivery=False)
        peak = max(peak, store.footprint())
        with store.transaction() as tx:
            for jid in ids:
                res = ResultMessage(
                    id=jid,
                    task="alarm",
                    status="ok",
                    output={"label": "fire"},
                    confidence=0.97,
                    source="local",
                    model="rules@0123456789abcdef",
                    latency_ms=3.2,
                )
                tx.answer(jid, res.to_bytes(), fallback=ReplyTarget("edgeagent/d/results/alarm"))
        peak = max(peak, store.footprint())
        store.outbox_done(r.seq for r in store.outbox(limit=10 * batch))
        peak = max(peak, store.footprint())
    end = store.footprint()
    wal_end = (state / "edgeagent.db-wal").stat().st_size
    store.maintain()
    idle = store.footprint()
    store.close()
    return {"peak": peak, "end": end, "wal_end": wal_end, "idle": idle}


def daemon_burst(jobs: int) -> dict[str, int]:
    from tests.broker import Broker
    from tests.harness import DaemonProcess, TestClient, write_config

    tmp = Path(tempfile.mkdtemp(prefix="bench-state-"))
    try:
        with Broker(tmp / "broker") as broker:
            cfg = write_config(tmp / "c.toml", port=broker.port, state_dir=tmp / "state")
            d = DaemonProcess(cfg, tmp / "daemon.log").start()
            try:
                d.wait_connected()
                c = TestClient(broker.port)
                c.subscribe("edgeagent/dev1/results/#")
                peak = [0]
                stop = threading.Event()

                def sample() -> None:
                    while not stop.is_set():
                        peak[0] = max(peak[0], _dir_size(tmp / "state"))
                        time.sleep(0.01)

                t = threading.Thread(target=sample, daemon=True)
                t.start()
                for i in range(jobs):
                    payload = json.dumps({"id": f"b{i}", "input": f"smoke {i} near door " * 4})
                    c.publish_nowait("edgeagent/dev1/jobs/alarm", payload)
                c.wait_published(300)
                got = len(c.collect(jobs, timeout=600))
                time.sleep(0.5)
                stop.set()
                t.join()
                c.close()
                return {"peak": peak[0], "answered": got, "end": _dir_size(tmp / "state")}
            finally:
                d.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _io(pid: int) -> dict[str, int]:
    fields = Path(f"/proc/{pid}/io").read_text().split("\n")
    return {k: int(v) for k, v in (f.split(": ") for f in fields if f)}


def daemon_writes(repo: Path, jobs: int, work: Path, port: int) -> dict[str, float]:
    """Bytes the daemon of ``repo`` writes per job answered, one at a time and pipelined
    (see part 3)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_daemon import Producer, job, start_daemon  # type: ignore[import-not-found]

    name = f"w{abs(hash(str(repo))) % 10000}"
    state = work / name
    proc = start_daemon(port, work, name, "normal", cache=False, repo=repo)
    prod = Producer(port)
    try:
        prod.wait_online([name])
        topic = f"edgeagent/{name}/jobs/alarm"
        texts = ["smoke in hall {i}", "door forced at gate {i}", "quiet {i}"]
        prod.sequential(topic, lambda i: job(i, texts[i % 3]), 200)  # warm: WAL at its bound
        make = lambda i: job(i, texts[i % 3])  # noqa: E731
        out: dict[str, float] = {}
        for mode in ("sequential", "pipelined"):
            before = _io(proc.pid)
            if mode == "sequential":
                prod.sequential(topic, make, jobs)
            else:
                prod.pipelined(topic, make, jobs, 64)
            after = _io(proc.pid)
            for k in ("write_bytes", "wchar", "syscw"):
                out[f"{mode} {k}"] = (after[k] - before[k]) / jobs
        return out
    finally:
        prod.close()
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(state, ignore_errors=True)


def writes(jobs: int, baseline: Path | None) -> None:
    from tests.broker import Broker

    trees = ([("baseline", baseline)] if baseline else []) + [("this tree", REPO)]
    got: dict[str, list[dict[str, float]]] = {name: [] for name, _ in trees}
    with (
        tempfile.TemporaryDirectory() as tmp,
        Broker(Path(tmp) / "broker", extra_config=["set_tcp_nodelay true"]) as broker,
    ):
        for r in range(3):  # alternated: a fresh daemon (and state file) per tree per round
            for name, repo in trees if r % 2 == 0 else trees[::-1]:
                got[name].append(daemon_writes(repo, jobs, Path(tmp), broker.port))
    med = {
        name: {k: statistics.median(x[k] for x in runs) for k in runs[0]}
        for name, runs in got.items()
    }
    for mode in ("sequential", "pipelined"):
        print(f"\nbytes written per job, {jobs} {mode} jobs, median of 3 daemons per tree:")
        print(f"{'':12}{'write_bytes':>12}{'(4 KiB pages)':>15}{'wchar':>10}{'write calls':>13}")
        for name, m in med.items():
            w = m[f"{mode} write_bytes"]
            print(
                f"{name:12}{w:12.0f}{w / 4096:15.1f}"
                f"{m[f'{mode} wchar']:10.0f}{m[f'{mode} syscw']:13.1f}"
            )
        if baseline:
            b, n = med["baseline"], med["this tree"]
            ratios = [
                n[f"{mode} {k}"] / b[f"{mode} {k}"] for k in ("write_bytes", "wchar", "syscw")
            ]
            print(f"{'ratio':12}{ratios[0]:12.2f}{'':15}{ratios[1]:10.2f}{ratios[2]:13.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--daemon", action="store_true", help="also measure the daemon subprocess")
    ap.add_argument(
        "--writes", type=int, default=0, metavar="N", help="only part 3: bytes written per job"
    )
    ap.add_argument("--baseline-repo", type=Path, help="part 3: another tree's daemon, alternated")
    args = ap.parse_args()
    if args.writes:
        writes(args.writes, args.baseline_repo)
        return
    kib = 1024.0
    rows = {}
    for name, defaults in (("sqlite defaults (before)", True), ("bounded WAL (now)", False)):
        with tempfile.TemporaryDirectory() as d:
            rows[name] = replay(Path(d), jobs=args.jobs, batch=args.batch, defaults=defaults)
    base = rows["sqlite defaults (before)"]
    print(f"store replay: {args.jobs} jobs in batches of {args.batch}")
    print(
        f"{'':28}{'peak KiB':>10}{'end KiB':>10}{'WAL end':>10}{'idle KiB':>10}{'peak ratio':>12}"
    )
    for name, r in rows.items():
        print(
            f"{name:28}{r['peak'] / kib:10.0f}{r['end'] / kib:10.0f}{r['wal_end'] / kib:10.0f}"
            f"{r['idle'] / kib:10.0f}{r['peak'] / base['peak']:12.2f}"
        )
    if args.daemon:
        r = daemon_burst(args.jobs)
        print(
            f"daemon subprocess: {r['answered']}/{args.jobs} answered, state dir peak "
            f"{r['peak'] / kib:.0f} KiB, {r['end'] / kib:.0f} KiB after the burst"
        )


if __name__ == "__main__":
    main()
