"""The test broker behaves like the production one the daemon relies on.

Each test drives a real mosquitto (``tests/broker.py``) with paho-mqtt 2.x over MQTT v5.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import ssl
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.broker import Broker, BrokerError, free_port, mosquitto_available

pytestmark = pytest.mark.skipif(not mosquitto_available(), reason="mosquitto not installed")

WAIT = 10.0
"""Upper bound for any single network round trip in these tests (seconds)."""

BAD_CREDENTIALS = {134, 135}  # v5: Bad User Name or Password / Not authorized
NOT_AUTHORIZED = 135


class Peer:
    """A paho client run on its own network thread; callbacks only hand results over."""

    def __init__(self, broker: Broker, client_id: str | None = None) -> None:
        self.broker = broker
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.connack: queue.Queue[tuple[int, bool]] = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.subacks: queue.Queue[list[ReasonCode]] = queue.Queue()
        self._pubacks: dict[int, int] = {}
        self._puback_cond = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        if broker.ca_file is not None:
            self.client.tls_set(ca_certs=str(broker.ca_file))

    # paho network thread -------------------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        self.connack.put((rc.value, bool(flags.session_present)))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.put(msg)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, codes: list[ReasonCode], props: Any
    ) -> None:
        self.subacks.put(codes)

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, rc: ReasonCode, props: Any
    ) -> None:
        with self._puback_cond:
            self._pubacks[mid] = rc.value
            self._puback_cond.notify_all()

    # test thread ---------------------------------------------------------------------

    def connect(
        self,
        *,
        username: str | None = None,
        password: str | None = None,
        clean_start: bool = True,
        session_expiry: int = 0,
    ) -> tuple[int, bool]:
        """Connect and return ``(CONNACK reason code, session present)``."""
        if username is not None:
            self.client.username_pw_set(username, password)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = session_expiry
        self.client.connect(
            self.broker.host,
            self.broker.port,
            keepalive=30,
            clean_start=clean_start,
            properties=props,
        )
        self.client.loop_start()
        return self.connack.get(timeout=WAIT)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.client.subscribe(topic, qos=qos)
        codes = self.subacks.get(timeout=WAIT)
        assert [c.value for c in codes] == [qos], codes

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> int:
        """Publish and wait for the PUBACK (QoS 1); returns its reason code."""
        info = self.client.publish(topic, payload, qos=qos)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
        if qos == 0:
            return 0
        with self._puback_cond:
            ok = self._puback_cond.wait_for(lambda: info.mid in self._pubacks, timeout=WAIT)
            assert ok, f"no PUBACK for mid {info.mid}"
            return self._pubacks[info.mid]

    def receive(self) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=WAIT)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    """Collects the test's clients and closes them even when the test fails."""
    made: list[Peer] = []
    yield made
    for peer in made:
        peer.close()


def _peer(peers: list[Peer], broker: Broker, client_id: str | None = None) -> Peer:
    peer = Peer(broker, client_id)
    peers.append(peer)
    return peer


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_plain_broker_delivers_and_stops_cleanly(tmp_path: Path, peers: list[Peer]) -> None:
    broker = Broker(tmp_path)
    with broker:
        assert broker.host == "127.0.0.1"
        assert broker.port > 0
        assert broker.ca_file is None
        pid = broker.pid
        assert pid is not None
        sub, pub = _peer(peers, broker), _peer(peers, broker)
        assert sub.connect() == (0, False)
        assert pub.connect() == (0, False)
        sub.subscribe("edgeagent/dev1/jobs/#")
        assert pub.publish("edgeagent/dev1/jobs/intent", b'{"v":1}') == 0
        msg = sub.receive()
        assert (msg.topic, msg.payload, msg.qos) == ("edgeagent/dev1/jobs/intent", b'{"v":1}', 1)
        for peer in peers:
            peer.close()
        peers.clear()
    assert not broker.running
    assert not _running(pid)
    broker.stop()  # idempotent


def test_queued_qos1_message_survives_restart(tmp_path: Path, peers: list[Peer]) -> None:
    """A persistent v5 session's queued jobs outlive a broker restart, in order.

    The session is created with Clean Start = 0.  Mosquitto 2.0.11 writes a v5 session
    to its database only when the client's latest CONNECT had Clean Start = 0: one
    created with Clean Start = 1 and a Session Expiry Interval survives disconnects
    but is gone after a broker restart (checked by hand).  The daemon must therefore
    never connect with Clean Start = 1, not even the first time.
    """
    with Broker(tmp_path) as broker:
        port = broker.port
        daemon = _peer(peers, broker, "edgeagent-dev1")
        assert daemon.connect(clean_start=False, session_expiry=3600) == (0, False)
        daemon.subscribe("edgeagent/dev1/jobs/+")
        daemon.close()  # offline; the broker keeps the session and queues for it

        producer = _peer(peers, broker)
        producer.connect()
        sent = [f"job-{i}".encode() for i in range(50)]
        for payload in sent:
            assert producer.publish("edgeagent/dev1/jobs/intent", payload) == 0
        producer.close()

        broker.restart()
        assert broker.port == port
        assert (tmp_path / "data" / "mosquitto.db").is_file()

        again = _peer(peers, broker, "edgeagent-dev1")
        assert again.connect(clean_start=False, session_expiry=3600) == (0, True)
        got = [again.receive().payload for _ in sent]
        assert got == sent


def test_tls_with_password(tmp_path: Path, peers: list[Peer]) -> None:
    with Broker(tmp_path, tls=True, users={"dev1": "s3cret", "cloud": "other"}) as broker:
        assert broker.ca_file is not None and broker.ca_file.is_file()
        good = _peer(peers, broker)
        assert good.connect(username="dev1", password="s3cret") == (0, False)
        good.subscribe("t/#")
        assert good.publish("t/x", b"over tls") == 0
        assert good.receive().payload == b"over tls"

        wrong, code = _peer(peers, broker), 0
        code, _ = wrong.connect(username="dev1", password="wrong")
        assert code in BAD_CREDENTIALS

        anonymous = _peer(peers, broker)
        code, _ = anonymous.connect()
        assert code in BAD_CREDENTIALS


def test_tls_verifies_the_broker_certificate(tmp_path: Path) -> None:
    """A client that does not trust the throwaway CA is refused at the handshake."""
    with Broker(tmp_path, tls=True) as broker:
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.tls_set()  # system CAs only
        with pytest.raises(ssl.SSLCertVerificationError):
            client.connect(broker.host, broker.port)
        # And with the CA, the names in the certificate match both ways we connect.
        for host in ("127.0.0.1", "localhost"):
            ctx = ssl.create_default_context(cafile=str(broker.ca_file))
            with (
                socket.create_connection((host, broker.port), timeout=WAIT) as raw,
                ctx.wrap_socket(raw, server_hostname=host) as tls,
            ):
                assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_acl_denies_publish_outside_allowed_topics(tmp_path: Path, peers: list[Peer]) -> None:
    # Lines before any `user` line apply to anonymous clients.
    acl = "topic read #\ntopic write edgeagent/dev1/#\n"
    with Broker(tmp_path, acl=acl) as broker:
        watcher, producer = _peer(peers, broker), _peer(peers, broker)
        watcher.connect()
        watcher.subscribe("#")
        producer.connect()

        assert producer.publish("elsewhere/jobs/intent", b"denied") == NOT_AUTHORIZED
        assert producer.publish("edgeagent/dev1/jobs/intent", b"allowed") == 0
        # Same connection, so had the denied one been forwarded it would arrive first.
        assert watcher.receive().payload == b"allowed"
        assert watcher.messages.empty()


def test_start_failure_reports_the_log(tmp_path: Path) -> None:
    broker = Broker(tmp_path, extra_config=["no_such_option on"])
    with pytest.raises(BrokerError, match="no_such_option"):
        broker.start()
    assert not broker.running


def test_leftover_broker_from_a_dead_run_is_replaced(tmp_path: Path) -> None:
    """A broker orphaned by a test process that died is killed by the next start()."""
    # Started from a non-main thread, so no parent-death signal: the orphan survives.
    script = (
        "import os, sys, threading\n"
        "from pathlib import Path\n"
        f"sys.path.insert(0, {str(Path(__file__).parent.parent)!r})\n"
        "from tests.broker import Broker\n"
        "b = Broker(Path(sys.argv[1]))\n"
        "t = threading.Thread(target=b.start)\n"
        "t.start(); t.join()\n"
        "print(b.pid, flush=True)\n"
        "os._exit(0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    orphan = int(out.stdout)
    try:
        assert _running(orphan)
        with Broker(tmp_path) as broker:
            assert broker.running
            assert not _running(orphan)
    finally:
        if _running(orphan):
            os.kill(orphan, signal.SIGKILL)


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
