"""End-to-end daemon benchmark: a `rules` task over MQTT vs a bare MQTT echo, same run.

    .venv/bin/python benchmarks/bench_daemon.py [--n 500] [--burst 5000] [--window 64] [--floor]

Starts its own mosquitto on a free port (tests/broker.py), a bare echo service
(benchmarks/echo.py) and `edgeagent run` as subprocesses, then measures from one
producer:

* sequential round trips (one job at a time): p50 / p99 latency;
* pipelined throughput (``--window`` jobs in flight, ``--burst`` jobs);
* cache hits (the same input again);

for the echo and the daemon (``store.synchronous`` "normal" and "full"), and
prints each as a ratio to the echo, plus the in-process inference time of the
rules backend, the cost of one ``fsync``-ed SQLite commit on the benchmark's
disk, the daemon's RSS, and the goals of issue 10 with PASS/MISS:

* pipelined throughput with ``synchronous = "full"`` >= 0.9x the echo's;
* single-job p50 <= 2x the echo's (``synchronous = "normal"``: with "full" every
  result waits for at least one ``fsync``, printed for comparison);
* cache-hit p50 <= 1.5x the echo's.

``--baseline-repo DIR`` runs another checkout's daemons through the same rounds and prints
this tree's figures as ratios to theirs (a same-invocation A/B).

``--floor`` adds the durable echo (``benchmarks/echo.py --durable``): journal, answer and
outbox row in one group commit before the acknowledgement and the answer, outbox delete
after the broker's PUBACK, one thread, nothing else. It is the least any daemon keeping
PROTOCOL.md's guarantees must do, so ``daemon / floor`` is edgeagent's own overhead and
``floor / echo`` what durability alone costs on this machine.

Machine noise: run it twice; compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.broker import Broker  # noqa: E402

TASKS = """
[tasks.alarm]
kind = "classify"
cache = {cache}
max_wait_ms = 0
[tasks.alarm.backend]
type = "rules"
[[tasks.alarm.backend.rules]]
label = "fire"
keywords = ["smoke", "fire", "flame", "burning"]
[[tasks.alarm.backend.rules]]
label = "intrusion"
keywords = ["door forced", "glass break", "motion"]
[[tasks.alarm.backend.rules]]
label = "water_leak"
patterns = ["\\\\bwater\\\\b.*\\\\bleak"]
"""

TEXTS = ["smoke in hall {i}", "door forced at gate {i}", "water leak under sink {i}", "quiet {i}"]


class Producer:
    """Publishes requests with Response Topic + Correlation Data; times each reply."""

    def __init__(self, port: int) -> None:
        self.reply_topic = f"bench/replies/{uuid.uuid4().hex[:8]}"
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"bench-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.max_inflight_messages_set(65535)
        self.sent: dict[bytes, float] = {}
        self.rtts: list[float] = []
        self.online: dict[str, bool] = {}
        self.cond = threading.Condition()
        sub = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: sub.set()
        self.client.connect("127.0.0.1", port)
        self.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.loop_start()
        self.client.subscribe([(self.reply_topic, 1), ("edgeagent/+/status", 1)])
        if not sub.wait(10):
            raise TimeoutError("no SUBACK")

    def wait_online(self, devices: list[str], timeout: float = 120) -> None:
        """Until each daemon's retained status says ``online`` (slow starts on a busy box)."""
        with self.cond:
            if not self.cond.wait_for(lambda: all(self.online.get(d) for d in devices), timeout):
                raise TimeoutError(f"daemons not online: {self.online}")

    def _on_message(self, c: paho.Client, u: object, m: paho.MQTTMessage) -> None:
        now = time.perf_counter()
        if m.topic.endswith("/status"):
            with self.cond:
                self.online[m.topic.split("/")[1]] = json.loads(m.payload)["state"] == "online"
                self.cond.notify_all()
            return
        corr = m.properties.CorrelationData
        with self.cond:
            start = self.sent.pop(corr, None)
            if start is not None:
                self.rtts.append(now - start)
            self.cond.notify_all()

    def send(self, topic: str, payload: bytes) -> None:
        corr = uuid.uuid4().bytes
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = corr
        with self.cond:
            self.sent[corr] = time.perf_counter()
        self.client.publish(topic, payload, qos=1, properties=props)

    def wait_below(self, n: int, timeout: float = 60) -> None:
        until = time.monotonic() + timeout
        with self.cond:
            while len(self.sent) > n:
                left = until - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self.sent)} replies missing")
                self.cond.wait(left)

    def sequential(self, topic: str, make: Callable[[int], bytes], n: int) -> list[float]:
        self.rtts = []
        for i in range(n):
            self.send(topic, make(i))
            self.wait_below(0)
        return list(self.rtts)

    def pipelined(self, topic: str, make: Callable[[int], bytes], n: int, window: int) -> float:
        self.rtts = []
        start = time.perf_counter()
        for i in range(n):
            self.wait_below(window - 1)
            self.send(topic, make(i))
        self.wait_below(0, timeout=300)
        return n / (time.perf_counter() - start)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))] * 1000.0


def job(i: int, text: str) -> bytes:
    return json.dumps({"v": 1, "id": f"{uuid.uuid4().hex}", "input": text.format(i=i)}).encode()


def start_daemon(
    port: int, work: Path, name: str, synchronous: str, cache: bool, repo: Path = REPO
) -> subprocess.Popen[bytes]:
    """``edgeagent run`` with the benchmark's `rules` task; ``repo``: the tree whose code
    runs (another checkout, for a same-invocation baseline)."""
    cfg = work / f"{name}.toml"
    cfg.write_text(
        f'device_id = "{name}"\n[mqtt]\nport = {port}\nreceive_maximum = 256\n'
        f'[store]\nstate_dir = "{work / name}"\nsynchronous = "{synchronous}"\n'
        f'[metrics]\nlisten = ""\n[log]\nformat = "json"\nlevel = "warning"\n'
        f'[topics]\nallowed_reply_prefixes = ["bench/"]\n'
        + TASKS.replace("{cache}", "true" if cache else "false")
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeagent", "run", "--config", str(cfg)],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        stdout=subprocess.DEVNULL,
        stderr=open(work / f"{name}.log", "wb"),  # noqa: SIM115
    )
    return proc


def start_floor(port: int, work: Path, synchronous: str) -> subprocess.Popen[bytes]:
    """The durable echo (benchmarks/echo.py --durable) on ``bench/floor-SYNC/req``."""
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "benchmarks" / "echo.py"),
            str(port),
            "--durable",
            synchronous,
            str(work / f"floor-{synchronous}.db"),
            f"bench/floor-{synchronous}/req",
        ],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    return proc


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def fsync_commit_ms(work: Path) -> float:
    """Median cost of one small SQLite commit with ``synchronous = "full"`` here."""
    from edgeagent.store import Store

    store = Store(work / "fsync" / "probe.db", synchronous="full")
    times = []
    for i in range(50):
        t = time.perf_counter()
        with store.transaction() as tx:
            tx.enqueue("probe", b"x")
        times.append(time.perf_counter() - t)
        store.outbox_done([i + 1])
    store.close()
    return statistics.median(times) * 1000.0


def inference_ms() -> float:
    from edgeagent.backends.rules import RulesBackend
    from edgeagent.config import (
        TaskConfig,
        tomllib,  # tomli on Python 3.10
    )

    data = tomllib.loads(TASKS.replace("{cache}", "true"))["tasks"]["alarm"]
    backend = RulesBackend("alarm", TaskConfig.model_validate(data))
    times = []
    for i in range(2000):
        t = time.perf_counter()
        backend.infer_batch([TEXTS[i % 4].format(i=i)])
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000.0


def cpu_s(pid: int) -> float:
    """User + system CPU time of a process (seconds)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Case:
    label: str
    topic: str
    make: Callable[[int], bytes]
    pid: int
    lat: list[float] = field(default_factory=list)
    tput: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # CPU seconds per job, per round


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=500, help="sequential round trips per case")
    ap.add_argument("--burst", type=int, default=5000, help="jobs in the throughput run")
    ap.add_argument("--window", type=int, default=64, help="jobs in flight in the throughput run")
    ap.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds (n and burst are split)"
    )
    ap.add_argument(
        "--floor",
        action="store_true",
        help="also measure the durable echo (benchmarks/echo.py --durable): the least any "
        "daemon keeping PROTOCOL.md's guarantees must do, for synchronous normal and full",
    )
    ap.add_argument(
        "--baseline-repo",
        type=Path,
        help="another checkout (e.g. `git worktree add /tmp/base HEAD~1`): its daemons run the "
        "same cases in the same rounds, and each of this tree's figures is printed as a ratio "
        "to its own",
    )
    args = ap.parse_args()

    with (
        tempfile.TemporaryDirectory() as tmp,
        Broker(Path(tmp) / "broker", extra_config=["set_tcp_nodelay true"]) as broker,
    ):
        work = Path(tmp)
        echo = subprocess.Popen(
            [sys.executable, str(REPO / "benchmarks" / "echo.py"), str(broker.port)],
            stdout=subprocess.PIPE,
        )
        assert echo.stdout is not None
        echo.stdout.readline()
        floors = {
            sync: start_floor(broker.port, work, sync)
            for sync in (("normal", "full") if args.floor else ())
        }
        daemons = {
            "normal": start_daemon(broker.port, work, "dnormal", "normal", cache=False),
            "full": start_daemon(broker.port, work, "dfull", "full", cache=False),
            "cache": start_daemon(broker.port, work, "dcache", "normal", cache=True),
        }
        if args.baseline_repo:
            daemons |= {
                f"base-{k}": start_daemon(
                    broker.port, work, f"b{k}", sync, cache=k == "cache", repo=args.baseline_repo
                )
                for k, sync in (("normal", "normal"), ("full", "full"), ("cache", "normal"))
            }  # devices bnormal, bfull, bcache
        prod = Producer(broker.port)
        try:
            prod.wait_online([k.replace("base-", "b") if "-" in k else f"d{k}" for k in daemons])

            def text_job(i: int) -> bytes:
                return job(i, TEXTS[i % 4])

            def same(i: int) -> bytes:  # cache hits: the same input every time
                return job(i, "smoke in hall 7")

            cases = [
                Case("mqtt echo (baseline)", "bench/echo/req", text_job, echo.pid),
                Case("daemon, synchronous=normal", "edgeagent/dnormal/jobs/alarm", text_job,
                     daemons["normal"].pid),
                Case("daemon, synchronous=full", "edgeagent/dfull/jobs/alarm", text_job,
                     daemons["full"].pid),
                Case("daemon, cache hits", "edgeagent/dcache/jobs/alarm", same,
                     daemons["cache"].pid),
            ]  # fmt: skip
            cases += [
                Case(
                    f"durable echo, synchronous={sync}", f"bench/floor-{sync}/req", text_job, p.pid
                )
                for sync, p in floors.items()
            ]
            cases += [
                Case(f"baseline {c.label}", c.topic.replace("/d", "/b", 1), c.make,
                     daemons["base-" + key].pid)
                for c, key in zip(cases[1:4], ("normal", "full", "cache"), strict=True)
                if args.baseline_repo
            ]  # fmt: skip
            for c in cases:  # warm up every path (and fill the cache)
                prod.sequential(c.topic, c.make, 50)
            # Interleaved rounds, the order rotated each time: machine noise (other jobs on
            # a shared box) then hits every case alike, and each ratio compares like times.
            n, burst = max(1, args.n // args.rounds), max(1, args.burst // args.rounds)
            for r in range(args.rounds):
                for c in cases[r % len(cases) :] + cases[: r % len(cases)]:
                    c.lat += prod.sequential(c.topic, c.make, n)
                    before = cpu_s(c.pid)
                    c.tput.append(prod.pipelined(c.topic, c.make, burst, args.window))
                    c.cpu.append((cpu_s(c.pid) - before) / burst)
            rss = {name: rss_mb(p.pid) for name, p in daemons.items()}
            fsync = fsync_commit_ms(work)
        finally:
            prod.close()
            for p in daemons.values():
                p.terminate()
            echo.terminate()
            for p in floors.values():
                p.terminate()
            for p in [*daemons.values(), *floors.values(), echo]:
                p.wait(30)

    infer = inference_ms()
    base = cases[0]
    b50, b99 = pct(base.lat, 0.5), pct(base.lat, 0.99)
    print(
        f"\nedgeagent daemon benchmark  (n={args.n} sequential, burst={args.burst}, "
        f"window={args.window}, {args.rounds} interleaved rounds; python "
        f"{sys.version.split()[0]}, {os.cpu_count()} cpu, load {os.getloadavg()[0]:.1f})\n"
    )
    print(
        f"{'case':34} {'p50 ms':>7} {'p99 ms':>7} {'jobs/s':>7} {'CPU ms/job':>10} "
        f"{'p50/echo':>8} {'p99/echo':>8} {'tput/echo':>9}"
    )
    tput_ratio: dict[str, float] = {}
    p50_ratio: dict[str, float] = {}
    for c in cases:
        # Throughput: the median over rounds of the ratio to the echo's in the same round.
        tput_ratio[c.label] = statistics.median(
            t / e for t, e in zip(c.tput, base.tput, strict=True)
        )
        p50_ratio[c.label] = pct(c.lat, 0.5) / b50
        print(
            f"{c.label:34} {pct(c.lat, 0.5):7.2f} {pct(c.lat, 0.99):7.2f} "
            f"{statistics.median(c.tput):7.0f} {statistics.median(c.cpu) * 1000:10.3f} "
            f"{p50_ratio[c.label]:8.2f} {pct(c.lat, 0.99) / b99:8.2f} {tput_ratio[c.label]:9.2f}"
        )
    print(f"\nrules inference alone (in process, median): {infer:.3f} ms")
    print(f"one fsync-ed SQLite commit on this disk (median): {fsync:.3f} ms")
    print("daemon RSS (MB): " + ", ".join(f"{k} {v:.1f}" for k, v in rss.items()))
    normal, full, cache = (c.label for c in cases[1:4])
    goals = [
        ("pipelined throughput, synchronous=full", tput_ratio[full], ">=", 0.9),
        ("single-job p50, synchronous=normal", p50_ratio[normal], "<=", 2.0),
        ("cache hit p50", p50_ratio[cache], "<=", 1.5),
    ]
    print("\ngoals (issue 10; ratios to the echo, same run):")
    for label, ratio, op, goal in goals:
        ok = ratio >= goal if op == ">=" else ratio <= goal
        print(f"  {label:40} {ratio:6.2f}x  (goal {op} {goal}x)  {'PASS' if ok else 'MISS'}")
    print(
        f"  {'(single-job p50, synchronous=full)':40} {p50_ratio[full]:6.2f}x  "
        f"(no goal: at least one fsync of {fsync:.2f} ms per result)"
    )
    if args.baseline_repo:
        print(f"\nthis tree / {args.baseline_repo} (same rounds; < 1 is faster for p50 and CPU):")
        for c in cases[1:4]:
            b = next(x for x in cases if x.label == f"baseline {c.label}")
            print(
                f"  {c.label:34} p50 {pct(c.lat, 0.5) / pct(b.lat, 0.5):5.2f}x  "
                f"throughput {statistics.median(t / u for t, u in zip(c.tput, b.tput, strict=True)):5.2f}x  "  # noqa: E501
                f"CPU/job {statistics.median(c.cpu) / statistics.median(b.cpu):5.2f}x"
            )
    if args.floor:
        fnormal, ffull = (c.label for c in cases[4:6])
        print("\nthe durable echo (the floor of any daemon with these guarantees), same run:")
        for label, ratio in [
            ("floor: pipelined throughput, full / echo", tput_ratio[ffull]),
            ("floor: single-job p50, normal / echo", p50_ratio[fnormal]),
            ("daemon / floor: throughput, full", tput_ratio[full] / tput_ratio[ffull]),
            ("daemon / floor: single-job p50, normal", p50_ratio[normal] / p50_ratio[fnormal]),
            ("daemon / floor: cache hit p50 (floor normal)", p50_ratio[cache] / p50_ratio[fnormal]),
        ]:
            print(f"  {label:46} {ratio:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
