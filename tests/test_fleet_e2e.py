"""A fleet end to end: three devices (``edgeagent run`` subprocesses) on one mosquitto with
the shipped ACL template and a broker user per device, one cloud agent of two workers
(``edgeagent cloud``, status per worker) and the demo's stand-in LLM
(``edgeagent cloud-standin``).

What a user of a fleet expects, checked on real processes (no timing in any assert):

* device jobs are answered on the device's own topics; escalations from every device are
  answered by the shared workers, each reply on the asking device's reply topic;
* fleet jobs (``$share/fleet/{prefix}/fleet/jobs/+``) are answered once across the group,
  also across a SIGKILL of one device (its journaled jobs finish after its restart);
* escalation keeps working while any worker is online; with none, each device follows its
  task's ``offline`` policy (provisional / reject / wait), and recovers when one returns;
* ``edgeagent status --fleet`` lists every device and its state (``offline``: last will);
* ``learn export`` on one device and ``learn import`` on another (ONNX intent task).

The fleet is started once for the module (starting five Python processes is most of the
cost); each test leaves it as it found it (every device and worker running).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from tests.broker import Broker, free_port, mosquitto_available
from tests.harness import REPO, DaemonProcess, TestClient, write_config
from tests.test_cloud_agent import CloudProcess, write_cloud_config

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not mosquitto_available(), reason="mosquitto not installed"),
]

PREFIX = "edgeagent"
ACL_TEMPLATE = REPO / "examples" / "mosquitto" / "edgeagent.acl"
ENCODER = REPO / "models" / "minilm-l6-int8"

# Each device answers one task with its own offline policy: the fleet shows all three.
OFFLINE = {"kitchen-pi": "provisional", "garage-pi": "reject", "porch-pi": "wait"}
DEVICES = tuple(OFFLINE)
LEARNERS = ("learn-a", "learn-b")
WORKERS = ("w1", "w2")
USERS = {
    **{d: f"pw-{d}" for d in (*DEVICES, *LEARNERS)},
    "edgeagent-cloud": "pw-cloud",
    "producer": "pw-producer",
    "observer": "pw-observer",
}

WAIT = 90.0
"""Upper bound of every wait (a loaded 2-core CI machine); nothing asserts on time."""

ALARM = """
[tasks.alarm]
kind = "classify"
labels = ["fire", "intrusion", "water_leak"]
offline = "{offline}"
budget_per_minute = 6000
budget_burst = 1000
[tasks.alarm.backend]
type = "rules"
[[tasks.alarm.backend.rules]]
label = "fire"
keywords = ["smoke"]
[[tasks.alarm.backend.rules]]
label = "intrusion"
keywords = ["door forced"]
"""
# No local rule knows water: such a job escalates (out_of_scope) and the stand-in, which
# picks the label sharing a word stem with the input, answers `water_leak`.

CLOUD = """
[topics]
fleet_group = "fleet"
stats_interval_s = 1
[cloud]
enabled = true
retry_min_s = 0.5
retry_max_s = 2
"""


def acl() -> str:
    """The shipped template with the per-device block filled in for every device (as an
    operator does), and an `observer` that may read everything (test scaffolding)."""
    blocks = "".join(
        f"\nuser {d}\ntopic write {PREFIX}/cloud/requests/#\ntopic read {PREFIX}/fleet/jobs/#\n"
        for d in (*DEVICES, *LEARNERS)
    )
    return ACL_TEMPLATE.read_text() + blocks + "\nuser observer\ntopic read #\n"


def local_text(tag: str) -> str:
    return f"smoke in room {tag}"


def cloud_text(tag: str) -> str:
    return f"water on the floor of room {tag}"


@dataclass
class Fleet:
    broker: Broker
    root: Path
    standin: subprocess.Popen[bytes]
    producer: TestClient
    observer: TestClient
    devices: dict[str, DaemonProcess] = field(default_factory=dict)
    workers: dict[str, CloudProcess] = field(default_factory=dict)
    seen: list[paho.MQTTMessage] = field(default_factory=list)

    # -- configuration --------------------------------------------------------------

    def password_file(self, user: str) -> Path:
        path = self.root / f"{user}.password"
        path.write_text(USERS[user] + "\n")
        return path

    def mqtt_login(self, user: str) -> str:
        return f'username = "{user}"\npassword_file = "{self.password_file(user)}"\n'

    def device_config(self, device: str, tasks: str, extra: str = CLOUD) -> Path:
        (self.root / device).mkdir(exist_ok=True)
        return write_config(
            self.root / f"{device}.toml",
            port=self.broker.port,
            state_dir=self.root / device / "state",
            device=device,
            extra=extra,
            tasks=tasks,
            mqtt_extra=self.mqtt_login(device),
        )

    def producer_config(self) -> Path:
        return write_config(
            self.root / "producer.toml",
            port=self.broker.port,
            state_dir=self.root / "producer-state",
            device="producer",
            mqtt_extra=self.mqtt_login("producer"),
        )

    # -- processes ------------------------------------------------------------------

    def daemon(self, device: str, config: Path) -> DaemonProcess:
        d = DaemonProcess(config, self.root / f"{device}.log").start()
        self.devices[device] = d
        return d

    def worker(self, worker: str) -> CloudProcess:
        """Start a worker; a restarted one reuses its config, hence its client id (and the
        broker session that holds the requests it was dealt while away)."""
        cfg = self.root / f"cloud-{worker}.toml"
        if cfg.exists():
            w = CloudProcess(cfg, self.root / f"cloud-{worker}.log", worker).start()
            self.workers[worker] = w
            return w
        write_cloud_config(
            cfg,
            port=self.broker.port,
            base_url=f"http://127.0.0.1:{self.standin_port}/v1",
            prefix=PREFIX,
            worker=worker,
            key_file=self.password_file("edgeagent-cloud"),  # any file: the stand-in needs none
            extra_agent="status_per_worker = true",
            extra_mqtt=self.mqtt_login("edgeagent-cloud"),
        )
        w = CloudProcess(cfg, self.root / f"cloud-{worker}.log", worker).start()
        self.workers[worker] = w
        return w

    standin_port = 0

    def restart(self, device: str) -> DaemonProcess:
        old = self.devices[device]
        old.stop()
        d = DaemonProcess(old.config, old.log_path).start()
        self.devices[device] = d
        return d

    def heal(self) -> None:
        """Restart whatever an earlier (failed) test left stopped; wait until every device
        is connected and sees every worker online."""
        for name, d in list(self.devices.items()):
            if d.proc is None or d.proc.poll() is not None:
                offset = len(d.log_records())
                d = self.restart(name)
                wait_until(f"{name} reconnects", lambda d=d, o=offset: connected_since(d, o))
        for name, w in list(self.workers.items()):
            if w.proc is None or w.proc.poll() is not None:
                self.worker(name)
        for d in self.devices.values():
            d.wait_connected(WAIT)
            for w in WORKERS:
                wait_until(f"{w} online", lambda d=d, w=w: _cloud_states(d).get(w) == "online")

    # -- what the producer and the observer see ----------------------------------------

    def submit(self, topic: str, job_id: str, text: str, **extra: Any) -> None:
        self.producer.publish_nowait(topic, json.dumps({"id": job_id, "input": text, **extra}))

    def observed(self) -> list[paho.MQTTMessage]:
        self.seen += self.observer.drain(0.2)
        return self.seen


def wait_until(what: str, check: Callable[[], bool], timeout: float = WAIT) -> None:
    until = time.monotonic() + timeout
    while not check():
        if time.monotonic() > until:
            raise TimeoutError(what)
        time.sleep(0.1)


def connected_since(d: DaemonProcess, offset: int) -> bool:
    return any(r.get("event") == "mqtt.connected" for r in d.log_records()[offset:])


class Results:
    """Every result the producer received for the ids it waits for, in arrival order."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.by_id: dict[str, list[tuple[str, bytes]]] = {}

    def pump(self, quiet: float = 0.2) -> None:
        for m in self.client.drain(quiet):
            res = json.loads(m.payload)
            self.by_id.setdefault(res["id"], []).append((m.topic, bytes(m.payload)))

    def final(self, job_id: str) -> dict[str, Any] | None:
        """The job's answer that is not provisional (a provisional one is replaced)."""
        for _, payload in self.by_id.get(job_id, []):
            res = json.loads(payload)
            if not res.get("provisional"):
                return res  # type: ignore[no-any-return]
        return None

    def wait_final(self, ids: list[str], timeout: float = WAIT) -> dict[str, dict[str, Any]]:
        def done() -> bool:
            self.pump()
            return all(self.final(i) is not None for i in ids)

        try:
            wait_until("results", done, timeout)
        except TimeoutError:
            missing = [i for i in ids if self.final(i) is None]
            raise AssertionError(
                f"{len(missing)} of {len(ids)} jobs unanswered: {missing}"
            ) from None
        return {i: self.final(i) for i in ids}  # type: ignore[misc]

    def devices_of(self, job_id: str) -> set[str]:
        return {topic.split("/")[1] for topic, _ in self.by_id.get(job_id, [])}


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def running_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    broker = Broker(root / "broker", users=USERS, acl=acl())
    broker.start()
    standin_port = free_port()
    standin = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgeagent",
            "cloud-standin",
            "--listen",
            f"127.0.0.1:{standin_port}",
        ],
        stdout=(root / "standin.log").open("ab"),
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    producer = TestClient(broker.port, username="producer", password=USERS["producer"])
    observer = TestClient(broker.port, username="observer", password=USERS["observer"])
    f = Fleet(broker, root, standin, producer, observer)
    f.standin_port = standin_port
    try:
        producer.subscribe(f"{PREFIX}/+/results/#")
        observer.subscribe(f"{PREFIX}/cloud/#")
        observer.subscribe(f"{PREFIX}/+/cloud/replies")
        for d, policy in OFFLINE.items():
            f.daemon(d, f.device_config(d, ALARM.format(offline=policy)))
        wait_until("stand-in listening", lambda: _listening(standin_port))
        for w in WORKERS:
            f.worker(w)
        for w in f.workers.values():
            w.wait_for_log("cloud.connected", WAIT)
        f.heal()
        yield f
    finally:
        # SIGTERM everyone first: they drain in parallel.
        for proc in [p.proc for p in (*f.devices.values(), *f.workers.values())]:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for d in f.devices.values():
            d.stop()
        for w in f.workers.values():
            w.stop()
        if standin.poll() is None:
            standin.send_signal(signal.SIGCONT)
            standin.terminate()
            standin.wait(30)
        producer.close()
        observer.close()
        broker.stop()


@pytest.fixture
def fleet(running_fleet: Fleet) -> Fleet:
    """The module's fleet, with every device and worker running."""
    running_fleet.heal()
    return running_fleet


def _cloud_states(d: DaemonProcess) -> dict[str, str | None]:
    """The last state the daemon logged for each worker's status topic."""
    out: dict[str, str | None] = {}
    for r in d.log_records():
        if r.get("event") == "cloud.status":
            out[str(r["topic"]).rsplit("/", 1)[-1]] = r.get("state")
    return out


def _reachable(d: DaemonProcess) -> bool | None:
    found = [r["reachable"] for r in d.log_records() if r.get("event") == "cloud.status"]
    return found[-1] if found else None


def _check_replies_reach_the_asker(f: Fleet, escalation_ids: set[str]) -> None:
    """The observer saw every escalation's request and its replies: each reply went to the
    reply topic of the device that asked, never to another."""
    asked: dict[str, str] = {}
    replied: dict[str, set[str]] = {}
    for m in f.observed():
        if m.topic.startswith(f"{PREFIX}/cloud/requests/"):
            req = json.loads(m.payload)
            asked[req["escalation_id"]] = req["device"]
            assert m.properties.ResponseTopic == f"{PREFIX}/{req['device']}/cloud/replies"
        elif m.topic.endswith("/cloud/replies"):
            esc = json.loads(m.payload)["escalation_id"]
            replied.setdefault(esc, set()).add(m.topic.split("/")[1])
    for esc in escalation_ids:
        assert replied.get(esc) == {asked[esc]}, (esc, asked.get(esc), replied.get(esc))


# -- 1. device jobs and escalations ---------------------------------------------------


def test_each_device_gets_its_own_answers_and_its_own_cloud_replies(fleet: Fleet) -> None:
    tag = uuid.uuid4().hex[:6]
    target: dict[str, str] = {}
    for d in DEVICES:
        for i in range(4):
            for kind, text in (("L", local_text), ("C", cloud_text)):
                jid = f"{tag}-{d}-{kind}{i}"
                target[jid] = d
                fleet.submit(f"{PREFIX}/{d}/jobs/alarm", jid, text(f"{d} {i} {tag}"))
    fleet.producer.wait_published()
    results = Results(fleet.producer)
    got = results.wait_final(list(target))
    results.pump(1.0)  # a second answer to any job would arrive here

    for jid, d in target.items():
        # Once, on the device's own results topic.
        assert [t for t, _ in results.by_id[jid]] == [f"{PREFIX}/{d}/results/alarm"], jid
        res = got[jid]
        assert res["status"] == "ok", res
        if "-L" in jid:
            assert (res["source"], res["output"]) == ("local", {"label": "fire"}), res
        else:
            assert (res["source"], res["output"]) == ("cloud", {"label": "water_leak"}), res
            assert res["escalation"]["reason"] == "out_of_scope"
    escalations = {got[j]["escalation"]["id"] for j in target if "-C" in j}
    assert len(escalations) == 12
    _check_replies_reach_the_asker(fleet, escalations)
    # The two workers shared the requests (the broker's shared subscription).
    for w in fleet.workers.values():
        assert w.records("cloud.reply"), f"worker {w.worker} answered nothing"
    # A re-sent request may be answered again by the other worker (each remembers only its
    # own replies): the device uses the first reply and ignores the copy as a duplicate.
    for d in fleet.devices.values():
        ignored = [r for r in d.log_records() if r.get("event") == "cloud.reply_ignored"]
        assert all(r["known"] for r in ignored), ignored


# -- 2. fleet jobs across a SIGKILL ------------------------------------------------------


def test_fleet_jobs_are_answered_once_across_the_group_and_a_sigkill(fleet: Fleet) -> None:
    """Fleet jobs, half of them escalated.  The stand-in LLM is paused (SIGSTOP) so that
    every device holds journaled jobs waiting for the cloud when `garage-pi` is SIGKILLed;
    more jobs follow while it is dead; then the LLM resumes and the device restarts.

    Every job is answered, by one device only.  Duplicates PROTOCOL allows: the same result
    published again, byte for byte, by the same device (a result whose PUBACK the kill
    lost).  mosquitto 2.0.11 keeps dealing fleet jobs to the dead device's session (its
    shared subscription outlives the connection): those wait for its restart."""
    victim = "garage-pi"
    tag = uuid.uuid4().hex[:6]
    ids: list[str] = []

    def send(batch: str, n: int) -> None:
        for i in range(n):
            kind, text = ("C", cloud_text) if i % 2 else ("L", local_text)
            jid = f"{tag}-{batch}-{kind}{i}"
            ids.append(jid)
            fleet.submit(
                f"{PREFIX}/fleet/jobs/alarm", jid, text(f"{batch}{i} {tag}"), deadline_ms=300000
            )
        fleet.producer.wait_published()

    results = Results(fleet.producer)
    d = fleet.devices[victim]
    os.kill(fleet.standin.pid, signal.SIGSTOP)
    try:
        send("a", 24)
        first = [j for j in ids if "-L" in j]
        results.wait_final(first)

        def started() -> list[str]:
            return [
                r["job_id"]
                for r in d.log_records()
                if r.get("event") == "escalation.started" and str(r["job_id"]).startswith(tag)
            ]

        wait_until("the victim escalates fleet jobs", lambda: len(started()) >= 2)
        d.kill()  # no DISCONNECT: the broker publishes the last will
        journaled = started()
        send("b", 24)
    finally:
        os.kill(fleet.standin.pid, signal.SIGCONT)
    wait_until("last will", lambda: _status(fleet).get(victim) == "offline")
    others = [j for j in ids if j not in journaled]
    # The live devices answer what they were given; the victim's share waits.
    wait_until(
        "live devices answer",
        lambda: (
            (results.pump(), sum(results.final(j) is not None for j in others))[1]
            >= len(others) // 2
        ),
    )
    offset = len(d.log_records())
    d = fleet.restart(victim)
    wait_until("victim reconnects", lambda: connected_since(d, offset))
    got = results.wait_final(ids)
    results.pump(1.0)

    for jid in ids:
        res = got[jid]
        assert res["status"] == "ok", res
        label = "fire" if "-L" in jid else "water_leak"
        assert res["output"] == {"label": label}, res
        assert len(results.devices_of(jid)) == 1, (jid, results.by_id[jid])
        copies = {payload for _, payload in results.by_id[jid]}
        assert len(copies) == 1, (jid, copies)  # a duplicate is the same result again
    # The jobs the victim had journaled before the kill were finished by it after restart.
    for jid in journaled:
        assert results.devices_of(jid) == {victim}, jid
        assert got[jid]["source"] == "cloud"
    answered_by = {dev: sum(results.devices_of(j) == {dev} for j in ids) for dev in DEVICES}
    assert sum(answered_by.values()) == len(ids)
    print(
        f"fleet jobs per device: {answered_by}; duplicates: "
        f"{sum(len(v) - 1 for k, v in results.by_id.items() if k in ids)}"
    )


def test_a_device_stopped_on_purpose_leaves_fleet_jobs_to_the_others(fleet: Fleet) -> None:
    """SIGTERM: the daemon leaves the fleet group before it drains, so the broker deals new
    fleet jobs to the devices still running and none waits for the stopped one.  Its own
    jobs wait for it in its session; after the restart they reach the cloud although they
    arrive before the workers' retained statuses (its task's offline policy is `reject`)."""
    victim = "garage-pi"
    d = fleet.devices[victim]
    d.signal(signal.SIGTERM)
    assert d.wait() == 0
    tag = uuid.uuid4().hex[:6]
    ids = [f"{tag}-f{i}" for i in range(12)]
    for jid in ids:
        fleet.submit(f"{PREFIX}/fleet/jobs/alarm", jid, local_text(jid))
    own = [f"{tag}-own{i}" for i in range(8)]
    for jid in own:
        fleet.submit(f"{PREFIX}/{victim}/jobs/alarm", jid, cloud_text(jid))
    fleet.producer.wait_published()
    results = Results(fleet.producer)
    got = results.wait_final(ids)  # while the victim is still stopped
    assert all(r["output"] == {"label": "fire"} for r in got.values())
    wait_until("status stopped", lambda: _status(fleet).get(victim) == "stopped")
    offset = len(d.log_records())
    d = fleet.restart(victim)
    wait_until("victim reconnects", lambda: connected_since(d, offset))
    for res in results.wait_final(own).values():
        assert (res["status"], res["source"]) == ("ok", "cloud"), res
    results.pump(1.0)
    assert all(results.devices_of(j) <= {"kitchen-pi", "porch-pi"} for j in ids)
    assert not [r for r in d.log_records()[offset:] if str(r.get("job_id", "")) in ids]


# -- 3. cloud workers going away --------------------------------------------------------


def test_escalation_survives_one_worker_and_follows_offline_policy_without_any(
    fleet: Fleet,
) -> None:
    tag = uuid.uuid4().hex[:6]
    results = Results(fleet.producer)
    w1, w2 = fleet.workers["w1"], fleet.workers["w2"]
    w1.signal(signal.SIGTERM)
    assert w1.wait() == 0
    for d in fleet.devices.values():
        wait_until("w1 stopped", lambda d=d: _cloud_states(d).get("w1") == "stopped")
        assert _reachable(d) is True  # w2 is online
    answered_before = len(w2.records("cloud.reply"))

    ids = []
    for dev in DEVICES:
        for i in range(3):
            jid = f"{tag}-one-{dev}-{i}"
            ids.append(jid)
            fleet.submit(f"{PREFIX}/{dev}/jobs/alarm", jid, cloud_text(f"{dev} {i} {tag}"))
    fleet.producer.wait_published()
    got = results.wait_final(ids)
    for jid in ids:
        res = got[jid]
        assert (res["status"], res["source"], res["output"]) == (
            "ok",
            "cloud",
            {"label": "water_leak"},
        ), res
        assert [json.loads(p)["provisional"] for _, p in results.by_id[jid]] == [False]
    assert len(w2.records("cloud.reply")) >= answered_before + len(ids)

    # No worker left: each device follows its task's offline policy.
    w2.signal(signal.SIGTERM)
    assert w2.wait() == 0
    for d in fleet.devices.values():
        wait_until("cloud unreachable", lambda d=d: _reachable(d) is False)
    offline = {dev: f"{tag}-none-{dev}" for dev in DEVICES}
    for dev, jid in offline.items():
        fleet.submit(f"{PREFIX}/{dev}/jobs/alarm", jid, cloud_text(f"{dev} {tag}"))
    fleet.producer.wait_published()
    kitchen, garage, porch = (offline[d] for d in DEVICES)

    def first(jid: str) -> dict[str, Any] | None:
        results.pump()
        return json.loads(results.by_id[jid][0][1]) if results.by_id.get(jid) else None

    wait_until("provisional and rejected answers", lambda: bool(first(kitchen) and first(garage)))
    prov = first(kitchen)
    assert prov is not None and prov["provisional"] is True and prov["escalation"]["id"]
    rejected = results.final(garage)
    assert rejected is not None and rejected["status"] == "unrecognized"
    assert rejected["error"]["code"] == "cloud_unavailable"
    assert not results.by_id.get(porch)  # `wait`: held for the cloud (or its deadline)

    # A worker comes back: the waiting job and the provisional one get the cloud's answer.
    w1_offset = len(w1.records())
    for w in WORKERS:
        fleet.worker(w)
    got = results.wait_final([kitchen, porch])
    # The stopped w1 had left the group: no request of the one-worker phase waited for it.
    one_worker = {r["escalation"]["id"] for r in (results.final(j) for j in ids) if r}
    w1_asked = {r.get("escalation_id") for r in fleet.workers["w1"].records()[w1_offset:]}
    assert not one_worker & w1_asked
    assert got[porch]["source"] == "cloud" and got[porch]["output"] == {"label": "water_leak"}
    assert got[kitchen]["supersedes"] == kitchen and got[kitchen]["source"] == "cloud"
    assert len(results.by_id[garage]) == 1  # a rejected job stays answered
    for d in fleet.devices.values():
        wait_until("cloud reachable", lambda d=d: _reachable(d) is True)


# -- 4. status --fleet --------------------------------------------------------------------


def _status(fleet: Fleet) -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "edgeagent", "status", "--fleet", "--json", "--config",
         str(fleet.producer_config())],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    return {r["device"]: r["status"]["state"] for r in rows}


def test_status_fleet_lists_every_device_with_its_state(fleet: Fleet) -> None:
    """Every device with its state (a SIGKILLed device shows `offline`, its last will, in
    the SIGKILL test; one stopped with SIGTERM `stopped`, in the graceful-stop test)."""
    states = _status(fleet)
    assert {d: states.get(d) for d in DEVICES} == dict.fromkeys(DEVICES, "online")
    assert "cloud" not in states  # the workers' status has another shape


# -- 5. fleet learning ----------------------------------------------------------------------

MUSIC = ["put on some jazz music", "can you play some piano music", "play some music for dinner"]
"""Music is a label the base model never saw: the stand-in answers it (the shared stem)."""

INTENT = """
[tasks.intent]
kind = "classify"
labels = ["weather", "alarm", "balance", "transfer", "music", "oos"]
threshold = 0.5
budget_burst = 1000
[tasks.intent.backend]
type = "onnx"
bundle = "{bundle}"
intra_op_threads = 1
[tasks.intent.learn]
enabled = true
every_examples = 1000
"""
LEARN_CLOUD = "[cloud]\nenabled = true\nretry_min_s = 0.5\nretry_max_s = 2\n"


@pytest.fixture(scope="module")
def intent_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A classifier on four intents + out-of-scope, on the packaged INT8 encoder."""
    pytest.importorskip("onnxruntime")
    if not (ENCODER / "model.onnx").exists():
        pytest.skip(f"no INT8 encoder at {ENCODER} (models/build_default.sh)")
    from edgeagent.heads.fit import TrainOptions
    from edgeagent.modeltools.train import train_bundle
    from tests.test_onnx_backend import INTENTS, OOS, _quiet, _write_examples

    root = tmp_path_factory.mktemp("fleet-bundle")
    intents = {k: v for k, v in INTENTS.items() if k != "music"}
    examples = _write_examples(root / "base.jsonl", intents, OOS)
    return train_bundle(
        "intent", examples, ENCODER, root, TrainOptions(held_out=0.2, threads=1), log=_quiet
    )


@pytest.mark.slow
def test_what_one_device_learned_another_answers_after_learn_import(
    fleet: Fleet, intent_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Device A escalates music requests (its model has no `music`); the cloud's answers
    become A's learned examples.  `learn export` on A, `learn import` on B: B, which never
    asked the cloud, then answers those requests itself (its instant memory)."""
    tasks = INTENT.format(bundle=intent_bundle)
    cfg = {n: fleet.device_config(n, tasks, extra=LEARN_CLOUD) for n in LEARNERS}
    try:
        _learn_and_share(fleet, cfg, capsys)
    finally:
        for n in LEARNERS:  # not part of the fleet the other tests expect
            d = fleet.devices.pop(n, None)
            if d is not None:
                d.stop()


def _learn_and_share(
    fleet: Fleet, cfg: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from edgeagent.cli import main  # the commands an operator runs, in this process

    a = fleet.daemon("learn-a", cfg["learn-a"])
    a.wait_connected(WAIT)
    wait_until("A sees the cloud", lambda: _reachable(a) is True)
    tag = uuid.uuid4().hex[:6]
    results = Results(fleet.producer)
    ids = {f"{tag}-a{i}": text for i, text in enumerate(MUSIC)}
    for jid, text in ids.items():
        fleet.submit(f"{PREFIX}/learn-a/jobs/intent", jid, text)
    fleet.producer.wait_published()
    got = results.wait_final(list(ids))
    learned = [ids[j] for j, r in got.items() if r["source"] == "cloud"]
    assert learned, got  # the base model knows no music: at least one escalated
    assert all(got[j]["output"] == {"label": "music"} for j in ids if ids[j] in learned)

    exported = fleet.root / "learned-a.jsonl"
    assert main(["learn", "export", "intent", str(exported), "-c", str(cfg["learn-a"])]) == 0
    a.stop()
    assert main(["learn", "import", "intent", str(exported), "-c", str(cfg["learn-b"])]) == 0
    assert f"imported {len(learned)} examples" in capsys.readouterr().out

    b = fleet.daemon("learn-b", cfg["learn-b"])
    b.wait_connected(WAIT)
    b.wait_for_log("learn.remembered", WAIT)
    again = {f"{tag}-b{i}": text for i, text in enumerate(learned)}
    for jid, text in again.items():
        fleet.submit(f"{PREFIX}/learn-b/jobs/intent", jid, text)
    fleet.producer.wait_published()
    got_b = results.wait_final(list(again))
    for res in got_b.values():
        assert (res["status"], res["source"], res["output"]) == (
            "ok",
            "local",
            {"label": "music"},
        ), res
    assert not [r for r in b.log_records() if r.get("event") == "escalation.started"]
