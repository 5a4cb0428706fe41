"""The shipped broker files (``examples/mosquitto/``) on a real mosquitto, and what the
daemon does under a tight ACL: reply-topic scope, refused publishes kept as dead letters
(``edgeagent results``), refused subscriptions fatal at start and counted at run time."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker import Broker, free_port, mosquitto_available
from tests.conftest import DaemonFactory
from tests.harness import REPO
from tests.test_broker_fixture import WAIT, Peer

pytestmark = pytest.mark.skipif(not mosquitto_available(), reason="mosquitto not installed")

DROPIN = REPO / "examples" / "mosquitto" / "edgeagent.conf"
ACL = REPO / "examples" / "mosquitto" / "edgeagent.acl"
NOT_AUTHORIZED = 0x87
GRANTED_QOS1 = 1
OK_CODES = {0, 0x10}  # success / no matching subscribers

USERS = {
    "d1": "pw-d1",
    "d2": "pw-d2",
    "edgeagent-cloud": "pw-cloud",
    "producer": "pw-prod",
    "admin": "pw-admin",
}
# Test scaffolding, not part of the template: an `admin` that may publish anywhere, and a
# sentinel topic per user, to tell "not delivered" from "not yet delivered".
TEST_ACL = "\npattern read sentinel/%u\nuser admin\ntopic readwrite #\n"


def dropin_settings() -> list[str]:
    """The drop-in's active lines (what mosquitto reads of it as shipped)."""
    lines = [ln.strip() for ln in DROPIN.read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def acl_text(escalating: tuple[str, ...] = ("d1", "d2")) -> str:
    """The template, with the per-device block filled in for ``escalating`` devices (as an
    operator does), and the test's scaffolding."""
    blocks = "".join(
        f"\nuser {d}\ntopic write edgeagent/cloud/requests/#\ntopic read edgeagent/fleet/jobs/#\n"
        for d in escalating
    )
    return ACL.read_text() + blocks + TEST_ACL


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(
        tmp_path / "acl-broker", users=USERS, acl=acl_text(), extra_config=dropin_settings()
    ) as b:
        yield b


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    made: list[Peer] = []
    yield made
    for p in made:
        p.close()


def login(peers: list[Peer], broker: Broker, user: str, client_id: str | None = None) -> Peer:
    p = Peer(broker, client_id)
    peers.append(p)
    code, _ = p.connect(username=user, password=USERS[user])
    assert code == 0, code
    return p


def suback(peer: Peer, topic: str) -> int:
    peer.client.subscribe(topic, qos=1)
    [code] = peer.subacks.get(timeout=WAIT)
    return int(code.value)


class Reader:
    """Whether ``user`` receives what is published on a topic.  mosquitto's acl_file
    grants every SUBSCRIBE and filters at delivery, so a read right shows only in what
    arrives: ``admin`` publishes the probe, then the user's sentinel; the probe, if
    delivered, arrives first (one publisher, one subscriber, QoS 1: in order)."""

    def __init__(self, peers: list[Peer], broker: Broker, user: str) -> None:
        self.user = user
        self.peer = login(peers, broker, user)
        self.admin = login(peers, broker, "admin")
        assert suback(self.peer, f"sentinel/{user}") == GRANTED_QOS1

    def can_read(self, topic: str) -> bool:
        assert suback(self.peer, topic) == GRANTED_QOS1
        assert self.admin.publish(topic, b"probe") in OK_CODES
        assert self.admin.publish(f"sentinel/{self.user}", b"s") in OK_CODES
        first = self.peer.receive()
        if first.topic == f"sentinel/{self.user}":
            return False
        assert self.peer.receive().topic == f"sentinel/{self.user}"
        return True


def test_dropin_is_valid_for_this_mosquitto(tmp_path: Path) -> None:
    """mosquitto starts with every line of the drop-in after a Debian-like main config
    (options repeated there are accepted), and it sets what the README promises."""
    settings = dropin_settings()
    keys = {ln.split()[0]: ln.split()[1] for ln in settings}
    assert keys["persistence"] == "true"
    assert int(keys["max_queued_messages"]) >= 100000
    assert keys["set_tcp_nodelay"] == "true"
    assert int(keys["max_inflight_messages"]) >= 20
    # Nothing here may clash with the operator's main file (string options cannot repeat).
    assert not {"persistence_location", "listener", "pid_file", "acl_file"} & set(keys)
    with Broker(tmp_path / "b", extra_config=settings) as b:
        assert b.running


def test_acl_template_device_rights(acl_broker: Broker, peers: list[Peer]) -> None:
    d1 = Reader(peers, acl_broker, "d1")
    for topic in (
        "edgeagent/d1/jobs/alarm",
        "edgeagent/d1/cloud/replies",
        "edgeagent/cloud/status",
        "edgeagent/cloud/status/w1",
        "edgeagent/fleet/jobs/alarm",  # the per-device block
    ):
        assert d1.can_read(topic), topic
    for topic in ("edgeagent/d2/jobs/alarm", "edgeagent/d2/cloud/replies", "edgeagent/x/results/a"):
        assert not d1.can_read(topic), topic
    for topic in (
        "edgeagent/d1/results/alarm",
        "edgeagent/d1/replies/producer/x",
        "edgeagent/d1/status",
        "edgeagent/d1/stats",
        "edgeagent/cloud/requests/alarm",
    ):
        assert d1.peer.publish(topic, b"{}") in OK_CODES, topic
    # The attack of issue 9: d1 publishing in d2's namespace or outside its own topics.
    for topic in (
        "edgeagent/d2/results/alarm",
        "edgeagent/d2/status",
        "edgeagent/victim/x",
        "edgeagent/d1/jobs/alarm",
        "edgeagent/d1/cloud/replies",
        "edgeagent/d1/other",
        "elsewhere/x",
    ):
        assert d1.peer.publish(topic, b"{}") == NOT_AUTHORIZED, topic


def test_acl_template_producer_and_cloud_rights(acl_broker: Broker, peers: list[Peer]) -> None:
    producer = Reader(peers, acl_broker, "producer")
    for topic in (
        "edgeagent/d1/results/alarm",
        "edgeagent/d2/status",
        "edgeagent/d1/replies/producer/r",
    ):
        assert producer.can_read(topic), topic
    for topic in (
        "edgeagent/d1/jobs/alarm",
        "edgeagent/cloud/requests/alarm",
        "edgeagent/d1/cloud/replies",
        "edgeagent/d1/replies/someone-else/r",
    ):
        assert not producer.can_read(topic), topic
    for topic in ("edgeagent/d1/jobs/alarm", "edgeagent/fleet/jobs/alarm"):
        assert producer.peer.publish(topic, b"{}") in OK_CODES, topic
    for topic in ("edgeagent/d1/results/a", "edgeagent/cloud/requests/x", "edgeagent/d1/status"):
        assert producer.peer.publish(topic, b"{}") == NOT_AUTHORIZED, topic

    cloud = Reader(peers, acl_broker, "edgeagent-cloud")
    assert cloud.can_read("edgeagent/cloud/requests/alarm")
    assert not cloud.can_read("edgeagent/d1/jobs/alarm")
    # Its shared subscription gets the requests too.
    assert suback(cloud.peer, "$share/cloud/edgeagent/cloud/requests/+") == GRANTED_QOS1
    for topic in ("edgeagent/d1/cloud/replies", "edgeagent/cloud/status/w1"):
        assert cloud.peer.publish(topic, b"{}") in OK_CODES, topic
    for topic in ("edgeagent/d1/jobs/alarm", "edgeagent/d1/results/alarm", "elsewhere/x"):
        assert cloud.peer.publish(topic, b"{}") == NOT_AUTHORIZED, topic


# -- the daemon under the template ACL --------------------------------------------------


def _daemon_cfg(broker: Broker, tmp_path: Path, user: str) -> dict[str, object]:
    pw = tmp_path / f"pw-{user}"
    pw.write_text(USERS[user] + "\n")
    return {"device": user, "mqtt_extra": f'username = "{user}"\npassword_file = "{pw}"\n'}


def _results_cli(config: Path, job_id: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "edgeagent", "results", "--config", str(config), job_id, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=True,
    )
    data: dict[str, object] = json.loads(out.stdout)
    return data


@pytest.mark.e2e
def test_daemon_under_template_acl_scope_and_dead_letter(
    acl_broker: Broker, daemon_factory: DaemonFactory, peers: list[Peer], tmp_path: Path
) -> None:
    d = daemon_factory(acl_broker.port, **_daemon_cfg(acl_broker, tmp_path, "d1"))
    d.wait_connected()
    producer = login(peers, acl_broker, "producer")
    assert suback(producer, "edgeagent/+/results/#") == GRANTED_QOS1
    assert suback(producer, "edgeagent/d1/replies/producer/#") == GRANTED_QOS1
    d2 = login(peers, acl_broker, "d2")
    assert suback(d2, "edgeagent/d2/jobs/+") == GRANTED_QOS1

    def job(job_id: str, reply_to: str) -> bytes:
        return json.dumps({"v": 1, "id": job_id, "input": "smoke", "reply_to": reply_to}).encode()

    # Refused by the daemon itself: answered on its own results topic.
    for i, topic in enumerate(["edgeagent/d2/results/alarm", "edgeagent/victim/x", "edgeagent//"]):
        assert producer.publish("edgeagent/d1/jobs/alarm", job(f"scope-{i}", topic)) in OK_CODES
    # Allowed by the daemon, allowed by the ACL.
    assert (
        producer.publish("edgeagent/d1/jobs/alarm", job("ok-1", "edgeagent/d1/replies/producer/r"))
        in OK_CODES
    )
    # Allowed by the daemon (its own namespace) but refused by the ACL: a dead letter.
    assert producer.publish("edgeagent/d1/jobs/alarm", job("dead-1", "edgeagent/d1/other/x")) in (
        OK_CODES
    )
    got: dict[str, tuple[str, dict[str, object]]] = {}
    while len(got) < 4:
        m = producer.receive()
        res = json.loads(m.payload)
        got[res["id"]] = (m.topic, res)
    for i in range(3):
        topic, res = got[f"scope-{i}"]
        assert topic == "edgeagent/d1/results/alarm"
        assert res["status"] == "rejected"
        assert res["error"]["code"] == "reply_topic_not_allowed"  # type: ignore[index]
    assert got["ok-1"][0] == "edgeagent/d1/replies/producer/r"
    assert got["ok-1"][1]["output"] == {"label": "fire"}
    rec = d.wait_for_log("outbox.dead_letter")
    assert rec["job_id"] == "dead-1" and rec["reason_code"] == NOT_AUTHORIZED
    assert "dead-1" not in got
    assert d2.messages.empty()  # nothing reached the other device

    report = _results_cli(d.config, "dead-1")
    assert report["state"] == "answered"
    assert report["result"]["output"] == {"label": "fire"}  # type: ignore[index]
    [dead] = report["dead_letters"]  # type: ignore[misc]
    assert dead["topic"] == "edgeagent/d1/other/x"
    assert dead["reason_code"] == NOT_AUTHORIZED
    # The outbox is not blocked behind it: later jobs are answered.
    assert producer.publish("edgeagent/d1/jobs/alarm", job("after", "edgeagent/d1/results/x")) in (
        OK_CODES
    )
    while True:
        m = producer.receive()
        if json.loads(m.payload)["id"] == "after":
            break


# -- refused subscriptions --------------------------------------------------------------
# mosquitto's acl_file never refuses a SUBSCRIBE (it filters at delivery); its dynamic
# security plugin does (SUBACK 0x87), as do EMQX, HiveMQ and the cloud brokers.

DYNSEC = Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")
needs_dynsec = pytest.mark.skipif(
    not DYNSEC.exists(), reason="mosquitto's dynamic security plugin is not installed"
)


def _dynsec_client(user: str, password: str) -> dict[str, object]:
    """A client entry of the plugin's JSON file (PBKDF2-SHA512, as the plugin hashes)."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    return {
        "username": user,
        "roles": [{"rolename": user}],
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": 101,
    }


def write_dynsec(path: Path, users: dict[str, str], acls: dict[str, list[str]]) -> None:
    """``acls`` maps a user to ACL entries "acltype topic" (all allow); the rest is denied."""
    path.write_text(
        json.dumps(
            {
                "defaultACLAccess": {
                    "publishClientSend": False,
                    "publishClientReceive": True,
                    "subscribe": False,
                    "unsubscribe": True,
                },
                "clients": [_dynsec_client(u, pw) for u, pw in users.items()],
                "groups": [],
                "roles": [
                    {
                        "rolename": u,
                        "acls": [
                            {"acltype": a.split()[0], "topic": a.split()[1], "allow": True}
                            for a in acls.get(u, [])
                        ],
                    }
                    for u in users
                ],
            }
        )
    )


def dynsec_broker(workdir: Path, dynsec: Path) -> Broker:
    return Broker(
        workdir,
        extra_config=[
            "allow_anonymous false",
            f"plugin {DYNSEC}",
            f"plugin_opt_config_file {dynsec}",
        ],
    )


def _device(tmp_path: Path, user: str, password: str) -> dict[str, str]:
    pw = tmp_path / f"pw-{user}"
    pw.write_text(password + "\n")
    return {"device": user, "mqtt_extra": f'username = "{user}"\npassword_file = "{pw}"\n'}


@needs_dynsec
@pytest.mark.e2e
def test_refused_subscription_is_fatal_at_start(
    tmp_path: Path, daemon_factory: DaemonFactory, peers: list[Peer]
) -> None:
    # d3 may publish in its namespace but may not subscribe to its jobs.
    dynsec = tmp_path / "dynsec.json"
    users = {"d3": "pw-d3", "watcher": "w"}
    write_dynsec(
        dynsec,
        users,
        {"d3": ["publishClientSend edgeagent/d3/#"], "watcher": ["subscribePattern #"]},
    )
    with dynsec_broker(tmp_path / "b", dynsec) as b:
        watcher = Peer(b)
        peers.append(watcher)
        assert watcher.connect(username="watcher", password="w")[0] == 0
        watcher.subscribe("edgeagent/d3/status")
        d = daemon_factory(b.port, **_device(tmp_path, "d3", "pw-d3"))
        assert d.wait(60) == 78
        rec = d.wait_for_log("mqtt.fatal")
        assert "refused the subscription to 'edgeagent/d3/jobs/+'" in rec["error"]
        assert "Not authorized (reason code 135)" in rec["error"]
        # It never claimed to be online: the only status is its last will, `offline`.
        status = json.loads(watcher.receive().payload)
        assert status["state"] == "offline"
        assert watcher.messages.empty()


@needs_dynsec
@pytest.mark.e2e
def test_refused_subscription_after_reconnect_is_counted_and_retried(
    tmp_path: Path, daemon_factory: DaemonFactory, peers: list[Peer]
) -> None:
    dynsec = tmp_path / "dynsec.json"
    users = {"d4": "pw-d4", "admin": "pw-admin"}
    rights = ["publishClientSend edgeagent/d4/#", "subscribePattern edgeagent/d4/#"]
    admin = [
        "publishClientSend $CONTROL/dynamic-security/#",
        "subscribePattern $CONTROL/dynamic-security/#",
        "publishClientSend edgeagent/#",
        "subscribePattern edgeagent/#",
    ]
    write_dynsec(dynsec, users, {"d4": rights, "admin": admin})
    with dynsec_broker(tmp_path / "b", dynsec) as b:
        port = free_port()
        d = daemon_factory(
            b.port,
            env={"EDGEAGENT_METRICS__LISTEN": f"127.0.0.1:{port}"},
            **_device(tmp_path, "d4", "pw-d4"),
        )
        d.wait_connected()
        # The operator takes the subscribe right away and restarts the broker.
        b.stop()
        write_dynsec(dynsec, users, {"d4": rights[:1], "admin": admin})
        b.start()
        rec = d.wait_for_log("mqtt.subscription_refused")
        assert rec["topic"] == "edgeagent/d4/jobs/+" and rec["reason_code"] == NOT_AUTHORIZED
        assert d.proc is not None and d.proc.poll() is None  # still serving its outbox
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        line = next(
            ln for ln in body.decode().splitlines()
            if ln.startswith("edgeagent_subscriptions_refused_total{")
        )  # fmt: skip
        assert 'topic="edgeagent/d4/jobs/+"' in line and float(line.split()[-1]) >= 1
        # The operator gives the right back, live, through the plugin's control topic (the
        # plugin then disconnects the role's clients): the daemon takes jobs again by itself.
        op = Peer(b)
        peers.append(op)
        assert op.connect(username="admin", password="pw-admin")[0] == 0
        command = {
            "command": "addRoleACL",
            "rolename": "d4",
            "acltype": "subscribePattern",
            "topic": "edgeagent/d4/#",
            "allow": True,
        }
        op.publish("$CONTROL/dynamic-security/v1", json.dumps({"commands": [command]}).encode())
        op.subscribe("edgeagent/d4/results/#")
        job = {"v": 1, "id": "after-fix", "input": "smoke"}
        op.publish("edgeagent/d4/jobs/alarm", json.dumps(job).encode())
        assert json.loads(op.receive().payload)["id"] == "after-fix"
