"""A bare MQTT v5 echo service: the baseline round trip for bench_daemon.py.

Subscribes to ``bench/echo/req`` (QoS 1) and republishes each payload to the
message's Response Topic with its Correlation Data, like the daemon does with
results, but with no parsing, journal or inference.
"""

from __future__ import annotations

import socket
import sys
import threading

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def main(port: int) -> None:
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="bench-echo",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    client.max_inflight_messages_set(65535)
    ready = threading.Event()

    def on_connect(c: paho.Client, u: object, f: object, rc: object, p: object) -> None:
        c.subscribe("bench/echo/req", qos=1)

    def on_subscribe(*_: object) -> None:
        ready.set()
        print("ready", flush=True)

    def on_message(c: paho.Client, u: object, m: paho.MQTTMessage) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = m.properties.CorrelationData
        c.publish(m.properties.ResponseTopic, m.payload, qos=1, properties=props)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.loop_forever()


if __name__ == "__main__":
    main(int(sys.argv[1]))
