"""Adversarial-input benchmark: can one task's hostile inputs slow another task down?

    .venv/bin/python benchmarks/bench_adversarial.py [--duration 30] [--quiet 600]
        [--rounds 3] [--pace 0] [--before /path/to/old/checkout]

Starts its own mosquitto on a free port (tests/broker.py) and `edgeagent run` as a
subprocess with the two tasks of ``examples/rules.toml`` (``alarm``: keyword and
regex rules; ``reading``: regex extraction).  One producer measures the latency of
sequential ``alarm`` jobs (publish -> result on ``.../results/alarm``):

* quiet: nothing else running;
* attacked: meanwhile three 16 KiB inputs (the ``max_input_bytes`` limit) built to
  make backtracking regexes quadratic (``1111…``, ``1.1.1.…``, ``-1-1-1…``) are kept in
  flight on ``reading`` for ``--duration`` s: each one answered is replaced at once
  (a flood of 16 KiB jobs, the harshest case) or after ``--pace`` seconds.

The phases alternate ``--rounds`` times (samples pooled per phase) so that drifts in the
machine's load fall on both.  It prints p50/p99 of both and their ratio (goal: attacked
p99 <= 2x quiet p99).  ``--before DIR`` runs the same measurement against another checkout (its own
``edgeagent`` package and its own example config, e.g. the code before RE2) in the same
invocation and prints the before/after ratio.  Machine noise: compare ratios.
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
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.broker import Broker  # noqa: E402

INPUT_BYTES = 16384
ADVERSARIAL = [
    "1" * INPUT_BYTES,
    "1." * (INPUT_BYTES // 2),
    "-1" * (INPUT_BYTES // 2),
]
BENIGN = [  # same size, nothing a regex engine could struggle with: the flood's own cost
    ("device=a temp 21.5 C; " * 745)[:INPUT_BYTES],
    ("humidity 45 % at device=b " * 631)[:INPUT_BYTES],
    ("ok " * 5462)[:INPUT_BYTES],
]
ALARM_TEXTS = ["smoke in hall {i}", "door forced at gate {i}", "water leak under sink {i}"]


class Client:
    """Publishes jobs and records when each result arrives (by job id)."""

    def __init__(self, port: int, device: str) -> None:
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"bench-adv-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.max_inflight_messages_set(1000)
        self.device = device
        self.sent: dict[str, float] = {}
        self.done: dict[str, tuple[float, str]] = {}
        self.cond = threading.Condition()
        sub = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: sub.set()
        self.client.connect("127.0.0.1", port)
        self.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.loop_start()
        self.client.subscribe(f"edgeagent/{device}/results/+", qos=1)
        if not sub.wait(10):
            raise TimeoutError("no SUBACK")

    def _on_message(self, c: paho.Client, u: object, m: paho.MQTTMessage) -> None:
        now = time.perf_counter()
        try:
            res = json.loads(m.payload)
        except ValueError:
            return
        with self.cond:
            start = self.sent.pop(res.get("id"), None)
            if start is not None:
                self.done[res["id"]] = (now - start, str(res.get("status")))
            self.cond.notify_all()

    def send(self, task: str, text: str) -> str:
        job_id = uuid.uuid4().hex
        payload = json.dumps({"v": 1, "id": job_id, "input": text, "deadline_ms": 600000})
        with self.cond:
            self.sent[job_id] = time.perf_counter()
        self.client.publish(f"edgeagent/{self.device}/jobs/{task}", payload, qos=1)
        return job_id

    def wait(self, job_id: str, timeout: float) -> tuple[float, str]:
        until = time.monotonic() + timeout
        with self.cond:
            while job_id not in self.done:
                left = until - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no result for {job_id} in {timeout} s")
                self.cond.wait(left)
            return self.done.pop(job_id)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Adversary(threading.Thread):
    """Keeps three adversarial jobs in flight on ``reading`` until stopped."""

    def __init__(self, client: Client, pace_s: float, inputs: list[str]) -> None:
        super().__init__(name="adversary", daemon=True)
        self.client = client
        self.inputs = inputs
        self.pace_s = pace_s
        self.stop = threading.Event()
        self.answered = 0
        self.in_flight: list[str] = []

    def run(self) -> None:
        self.in_flight = in_flight = [self.client.send("reading", text) for text in self.inputs]
        while not self.stop.is_set():
            with self.client.cond:
                finished = [j for j in in_flight if j in self.client.done]
                for j in finished:
                    self.client.done.pop(j)
                if not finished:
                    self.client.cond.wait(0.1)
                    continue
            if self.pace_s:
                self.stop.wait(self.pace_s)  # paced: not a throughput flood
            for j in finished:
                in_flight.remove(j)
                self.answered += 1
                in_flight.append(self.client.send("reading", self.inputs[self.answered % 3]))


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))] * 1000.0


def measure(
    code: Path,
    port: int,
    work: Path,
    quiet_n: int,
    duration: float,
    pace_s: float,
    rounds: int,
    inputs: list[str],
    cloud: bool = False,
) -> dict[str, float]:
    device = f"adv{uuid.uuid4().hex[:6]}"
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(code),
        EDGEAGENT_DEVICE_ID=device,
        EDGEAGENT_MQTT__PORT=str(port),
        EDGEAGENT_STORE__STATE_DIR=str(work / device),
        EDGEAGENT_STORE__SYNCHRONOUS="normal",
        EDGEAGENT_METRICS__LISTEN="",
        EDGEAGENT_LOG__LEVEL="warning",
        EDGEAGENT_LOG__FORMAT="json",
        EDGEAGENT_TASKS__ALARM__CACHE="false",
        EDGEAGENT_TASKS__READING__CACHE="false",
    )
    if cloud:  # escalations (no agent: offline, provisional) are redacted, in a thread
        env["EDGEAGENT_CLOUD__ENABLED"] = "true"
    env.pop("NOTIFY_SOCKET", None)
    # The model-free example (alarm + reading on rules); older checkouts had it as
    # examples/edgeagent.toml.
    config = code / "examples" / "rules.toml"
    if not config.exists():
        config = code / "examples" / "edgeagent.toml"
    with open(work / f"{device}.log", "wb") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "edgeagent", "run", "--config", str(config)],
            cwd=code,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    client = Client(port, device)
    try:
        for i in range(60):  # the daemon is up once it answers; warm every path
            try:
                client.wait(client.send("alarm", "smoke warm-up"), timeout=30 if i == 0 else 5)
            except TimeoutError:
                if daemon.poll() is not None:
                    raise RuntimeError("daemon exited; see its log") from None
                continue
            if i >= 20:
                break
        client.wait(client.send("reading", "device=a 21.5 C"), timeout=30)

        # Quiet and attacked phases alternate, so that slow drifts in the machine's
        # load fall on both alike; samples are pooled per phase.
        quiet: list[float] = []
        loaded: list[float] = []
        statuses: dict[str, int] = {}
        answered = 0
        i = 0
        for _round in range(rounds):
            for _ in range(quiet_n // rounds):
                latency, _ = client.wait(client.send("alarm", ALARM_TEXTS[i % 3].format(i=i)), 60)
                quiet.append(latency)
                i += 1
            adversary = Adversary(client, pace_s, inputs)
            adversary.start()
            until = time.monotonic() + duration / rounds
            while time.monotonic() < until:
                latency, status = client.wait(
                    client.send("alarm", ALARM_TEXTS[i % 3].format(i=i)), timeout=600
                )
                loaded.append(latency)
                statuses[status] = statuses.get(status, 0) + 1
                i += 1
            adversary.stop.set()
            adversary.join(5)
            answered += adversary.answered
            if _round < rounds - 1:
                for job_id in adversary.in_flight:  # let the next quiet phase be quiet
                    client.wait(job_id, timeout=600)
    finally:
        client.close()
        daemon.terminate()
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(10)
    return {
        "quiet_p50": pct(quiet, 0.5),
        "quiet_p99": pct(quiet, 0.99),
        "adv_p50": pct(loaded, 0.5),
        "adv_p99": pct(loaded, 0.99),
        "adv_max": max(loaded) * 1000.0,
        "adv_n": float(len(loaded)),
        "adv_not_ok": float(sum(n for s, n in statuses.items() if s != "ok")),
        "adversarial_answered": float(answered),
        "quiet_mean": statistics.fmean(quiet) * 1000.0,
    }


def report(label: str, r: dict[str, float]) -> None:
    print(
        f"{label:8} quiet p50 {r['quiet_p50']:8.2f} ms  p99 {r['quiet_p99']:8.2f} ms | "
        f"adversarial p50 {r['adv_p50']:9.2f} ms  p99 {r['adv_p99']:9.2f} ms  "
        f"max {r['adv_max']:9.1f} ms | p50 x{r['adv_p50'] / r['quiet_p50']:.2f}  "
        f"p99 x{r['adv_p99'] / r['quiet_p99']:.2f} (goal <= 2) | alarm jobs {int(r['adv_n'])}, "
        f"not ok {int(r['adv_not_ok'])}; adversarial answered {int(r['adversarial_answered'])}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quiet", type=int, default=600, help="alarm jobs in the quiet phases")
    ap.add_argument("--duration", type=float, default=30.0, help="attacked phases in all (s)")
    ap.add_argument("--rounds", type=int, default=3, help="quiet/attacked alternations")
    ap.add_argument("--before", type=Path, help="another checkout to measure the same way")
    ap.add_argument(
        "--pace",
        type=float,
        default=0.0,
        help="wait this long (s) before replacing answered adversarial inputs; 0: at once "
        "(a flood of 16 KiB jobs, the harshest case)",
    )
    ap.add_argument(
        "--benign",
        action="store_true",
        help="16 KiB inputs of ordinary text instead (the cost of the flood itself)",
    )
    ap.add_argument(
        "--cloud",
        action="store_true",
        help="enable [cloud] (no agent runs): unanswerable inputs are escalated, so the "
        "16 KiB inputs are also redacted (within the task's escalation budget)",
    )
    args = ap.parse_args()

    results: dict[str, dict[str, float]] = {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        Broker(Path(tmp) / "broker", extra_config=["set_tcp_nodelay true"]) as broker,
    ):
        work = Path(tmp)
        inputs = BENIGN if args.benign else ADVERSARIAL
        results["after"] = measure(
            REPO,
            broker.port,
            work,
            args.quiet,
            args.duration,
            args.pace,
            args.rounds,
            inputs,
            args.cloud,
        )
        if args.before is not None:  # one round: its attacked phase takes minutes to drain
            results["before"] = measure(
                args.before.resolve(),
                broker.port,
                work,
                args.quiet,
                args.duration,
                args.pace,
                1,
                inputs,
                args.cloud,
            )

    print(
        f"\nadversarial-input benchmark: alarm latency while 3 x {INPUT_BYTES} B "
        f"{'benign' if args.benign else 'adversarial'} inputs are "
        f"in flight on reading ({args.duration:.0f} s, pace {args.pace} s; "
        f"python {sys.version.split()[0]}, {os.cpu_count()} cpu)\n"
    )
    for label in ("before", "after"):
        if label in results:
            report(label, results[label])
    if "before" in results:
        b, a = results["before"], results["after"]
        before_ratio = b["adv_p99"] / b["quiet_p99"]
        after_ratio = a["adv_p99"] / a["quiet_p99"]
        print(
            f"\np99 slow-down under attack: before x{before_ratio:.1f}, after x{after_ratio:.2f} "
            f"(before/after {before_ratio / after_ratio:.0f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
