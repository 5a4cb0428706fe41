"""MQTT adapter: the only module that imports paho.

Thread model: the asyncio event loop drives paho's socket (paho's "external event
loop" hooks: ``loop.add_reader`` runs ``loop_read``, a packet queued by :meth:`publish`
or :meth:`ack` is written at once by ``loop_write``, corked until the end of the loop's
turn (:meth:`MqttAdapter._cork`), a timer runs ``loop_misc`` for keepalive).  paho
callbacks run on the loop and hand events to the owner right after the paho step that
received them (a PUBACK nothing waits for rides with the next hand-off, or a sweep
within :data:`PUBACK_LINGER_S`): no network thread, no thread hop per packet.  Only the
blocking part of a connect (DNS, TCP connect, TLS handshake, queueing CONNECT) runs in
a short-lived helper thread; the loop takes the socket over once it is open.
:meth:`publish`, :meth:`ack` and :meth:`aclose` are for the event loop; :meth:`stop`
may be called from any thread.

Guarantees this adapter gives the daemon:
* jobs are acknowledged only when the daemon calls :meth:`ack` (manual ack),
  and only on the connection they arrived on (a stale packet id is never
  acknowledged on a new connection: the broker redelivers instead);
* every CONNACK re-subscribes; reconnects use capped, jittered backoff;
* a refused login (bad credentials, not authorised) or a TLS verification
  failure is fatal: :attr:`fatal` is set and no retry storm follows;
* the retained status topic carries a last will (``offline``);
* ``on_connected`` runs once the broker has answered the subscriptions (SUBACK), so
  "connected" means jobs can arrive.  A subscription the broker refuses (SUBACK reason
  code >= 0x80, e.g. 0x87 not authorized by its ACL) is fatal before the first complete
  subscription (``fatal`` names the topic filter and the reason) and is reported to
  ``on_subscription_refused`` after that (a reconnect into a changed ACL);
* a publish the broker refuses (MQTT v5 PUBACK reason code >= 0x80) is reported to
  ``on_publish_refused`` before ``on_puback`` (MQTT 3.1.1 brokers cannot say so: they
  acknowledge and drop it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib
import random
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt as paho_mqtt
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket, MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import (
    Properties,
    VariableByteIntegers,
    readBytes,
    readInt16,
    readInt32,
)
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgeagent.backoff import backoff_delays
from edgeagent.config import MqttConfig
from edgeagent.logs import get_logger

log = get_logger("edgeagent.mqtt")

PUBACK_LINGER_S = 0.02
"""Longest a PUBACK that nothing waits for lingers before the event loop runs it."""
_PAHO_CHECKED = str(getattr(paho_mqtt, "__version__", "")).startswith(("2.1.", "2.2."))
"""The paho releases :class:`_FastProperties` was checked against: there it stands in for
paho's ``Properties`` where paho decodes packets; any other release keeps paho's own (slower
decoding, nothing else changes)."""
_TCP_CORK: int | None = getattr(socket, "TCP_CORK", None)
"""Linux: hold partial segments until uncorked (:meth:`MqttAdapter._cork`)."""

# CONNACK reason codes that retrying cannot fix (v5 codes; paho maps v3 rc 4/5 to 134/135).
FATAL_CONNACK = {
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x8A: "banned",
    0x8C: "bad authentication method",
}


@dataclass(frozen=True, slots=True)
class Inbound:
    """A PUBLISH received from the broker, detached from paho."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    dup: bool
    generation: int
    response_topic: str | None = None
    correlation: bytes | None = None
    received_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    host: str
    port: int
    client_id: str
    protocol: str = "5"
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False
    keepalive_s: int = 30
    session_expiry_s: int = 86400
    receive_maximum: int = 64
    max_packet_bytes: int = 0
    max_inflight: int = 256
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    connect_timeout_s: float = 10.0
    clean_start: bool = False
    will_topic: str | None = None
    will_payload: bytes | None = None


def connect_options(
    m: MqttConfig,
    *,
    client_id: str,
    password: str | None,
    key_file: Path | None,
    **overrides: Any,
) -> ConnectOptions:
    """ConnectOptions from the `[mqtt]` config section; ``overrides`` win (e.g. a will)."""
    fields: dict[str, Any] = {
        "host": m.host,
        "port": m.port,
        "client_id": client_id,
        "protocol": m.protocol,
        "username": m.username,
        "password": password,
        "tls": m.tls.enabled,
        "ca_file": str(m.tls.ca_file) if m.tls.ca_file else None,
        "cert_file": str(m.tls.cert_file) if m.tls.cert_file else None,
        "key_file": str(key_file) if key_file else None,
        "tls_insecure": m.tls.insecure_skip_verify,
        "keepalive_s": m.keepalive_s,
        "session_expiry_s": m.session_expiry_s,
        "receive_maximum": m.receive_maximum,
        "max_packet_bytes": m.max_packet_bytes,
        "max_inflight": m.max_inflight,
        "reconnect_min_s": m.reconnect_min_s,
        "reconnect_max_s": m.reconnect_max_s,
        "connect_timeout_s": m.connect_timeout_s,
    }
    fields.update(overrides)
    return ConnectOptions(**fields)


def _code(reason_code: Any) -> int:
    """The number of a paho ReasonCode (or of a plain int)."""
    return int(getattr(reason_code, "value", reason_code))


def _with_length(data: bytes) -> bytes:
    """MQTT binary data / UTF-8 string: a two-byte length, then the bytes."""
    return len(data).to_bytes(2, "big") + data


def _varint(n: int) -> bytes:
    """MQTT variable byte integer."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


# -- paho's Properties, faster ------------------------------------------------------------
#
# paho builds two dicts of 27 entries (with 27 ``list.index`` calls) in every ``Properties()``,
# and its ``__setattr__``, ``unpack``, ``clear`` and ``pack`` scan the 27 names with string
# operations per attribute.  It makes one for every PUBLISH and two for every PUBACK it
# receives: ~50 µs of decoding per job received and ~25 µs per result acknowledged, in
# the thread that reads the socket (the event loop).  ``_FastProperties``
# does the same with tables built once; :func:`_install_fast_properties` puts it where paho
# decodes packets.

_STOCK = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
_TYPES: list[str] = _STOCK.types
_NAMES: dict[str, int] = _STOCK.names
_SPECS: dict[int, tuple[int, list[int]]] = _STOCK.properties
_IDENT_OF: dict[str, int] = {name.replace(" ", ""): ident for name, ident in _NAMES.items()}
_COMPACT_OF: dict[int, str] = {ident: name for name, ident in _IDENT_OF.items()}
_FULL_NAME_OF: dict[int, str] = {ident: name for name, ident in _NAMES.items()}
_PACKETS_OF: dict[int, frozenset[int]] = {i: frozenset(spec[1]) for i, spec in _SPECS.items()}
_ORDER: tuple[tuple[str, int], ...] = tuple(_IDENT_OF.items())  # paho's order: the same bytes
_MULTIPLE = frozenset({11, 38})  # Subscription Identifier, User Property
_USER_PROPERTY = 38
MAX_USER_PROPERTIES = 1000
"""User Properties read from one packet; more are skipped (nothing here reads them, and a
producer may send hundreds of thousands in one PUBLISH, which the broker forwards)."""
_PRIVATE = frozenset({"packetType", "types", "names", "properties"})
_RANGES: dict[str, tuple[int, int, str]] = {
    "ReceiveMaximum": (1, 65535, "1-65535"),
    "TopicAlias": (1, 65535, "1-65535"),
    "TopicAliasMaximum": (0, 65535, "0-65535"),
    "MaximumPacketSize": (1, 268435455, "1-268435455"),
    "SubscriptionIdentifier": (1, 268435455, "1-268435455"),
}
_BOOLEANS = frozenset(
    {"RequestResponseInformation", "RequestProblemInformation", "PayloadFormatIndicator"}
)
_BYTE, _INT16, _INT32, _VBI, _BINARY, _UTF8, _PAIR = range(7)  # paho's ``types`` order
# paho's own readers (untyped there), so that malformed packets fail as they do in paho:
_read_int16: Callable[[Any], int] = readInt16
_read_int32: Callable[[Any], int] = readInt32
_read_vbi: Callable[[Any], tuple[int, int]] = VariableByteIntegers.decode
_read_bytes: Callable[[Any, int], tuple[bytes, int]] = readBytes


def _read_utf(buffer: Any, maxlen: int) -> tuple[str, int]:
    """paho's ``readUTF`` (same checks and errors) with its per-character scan done by
    ``str.find``.  (Its D800-DFFF check cannot fire: strict UTF-8 decoding refuses them.)"""
    if maxlen < 2:
        raise MalformedPacket("Not enough data to read string length")
    length = _read_int16(buffer)
    if length > maxlen - 2:
        raise MalformedPacket("Length delimited string too long")
    text = bytes(buffer[2 : 2 + length]).decode("utf-8")
    null, bom = text.find("\x00"), text.find("\ufeff")
    if null >= 0 and (bom < 0 or null < bom):
        raise MalformedPacket("[MQTT-1.5.4-2] Null found in UTF-8 data")
    if bom >= 0:
        raise MalformedPacket("[MQTT-1.5.4-3] U+FEFF in UTF-8 data")
    return text, length + 2


class _FastProperties(Properties):
    """paho's ``Properties`` with its tables built once: the same attributes, checks,
    errors and packed bytes (tests/test_mqtt_properties.py compares them)."""

    def __init__(self, packetType: int) -> None:
        d = self.__dict__
        d["packetType"] = packetType
        d["types"] = _TYPES  # shared and read-only, as paho's own code uses them
        d["names"] = _NAMES
        d["properties"] = _SPECS

    def __setattr__(self, name: str, value: Any) -> None:
        name = name.replace(" ", "")
        if name in _PRIVATE:
            object.__setattr__(self, name, value)
            return
        ident = _IDENT_OF.get(name)
        if ident is None:
            raise MQTTException(f"Property name must be one of {_NAMES.keys()}")
        if self.packetType not in _PACKETS_OF[ident]:
            raise MQTTException(
                f"Property {name} does not apply to packet type "
                f"{PacketTypes.Names[self.packetType]}"
            )
        if not isinstance(value, list):
            bounds = _RANGES.get(name)
            if bounds is not None and (value < bounds[0] or value > bounds[1]):
                raise MQTTException(f"{name} property value must be in the range {bounds[2]}")
            if name in _BOOLEANS and value != 0 and value != 1:
                raise MQTTException(f"{name} property value must be 0 or 1")
        if ident in _MULTIPLE:
            if not isinstance(value, list):
                value = [value]
            if name in self.__dict__:
                value = self.__dict__[name] + value
        self.__dict__[name] = value

    def getIdentFromName(self, compressedName: str) -> int:
        return _IDENT_OF.get(compressedName, -1)

    def getNameFromIdent(self, identifier: int) -> str | None:
        return _FULL_NAME_OF.get(identifier)

    def allowsMultiple(self, compressedName: str) -> bool:
        return _IDENT_OF.get(compressedName, -1) in _MULTIPLE

    def isEmpty(self) -> bool:
        return not any(name in _IDENT_OF for name in self.__dict__)

    def clear(self) -> None:
        d = self.__dict__
        for name in [name for name in d if name in _IDENT_OF]:
            del d[name]

    def pack(self) -> bytes:
        d = self.__dict__
        parts: list[bytes] = []  # joined once: paho's ``+=`` per property is quadratic
        for name, ident in _ORDER:
            if name in d:
                kind = _SPECS[ident][0]
                values = d[name] if ident in _MULTIPLE else (d[name],)
                for value in values:
                    parts.append(self.writeProperty(ident, kind, value))  # type: ignore[no-untyped-call]
        buf = b"".join(parts)
        return _varint(len(buf)) + buf

    def readProperty(self, buffer: Any, type: int, propslen: int) -> tuple[Any, int]:
        if type == _BYTE:
            return buffer[0], 1
        if type == _INT16:
            return _read_int16(buffer), 2
        if type == _INT32:
            return _read_int32(buffer), 4
        if type == _VBI:
            return _read_vbi(buffer)
        if type == _BINARY:
            data, n = _read_bytes(buffer, propslen)
            return bytes(data), n
        if type == _UTF8:
            return _read_utf(buffer, propslen)
        key, n = _read_utf(buffer, propslen)  # UTF-8 string pair
        value, n2 = _read_utf(buffer[n:], propslen - n)
        return (key, value), n + n2

    def unpack(self, buffer: Any) -> tuple[_FastProperties, int]:
        """As paho's, in time linear in the size of the properties (paho's copies the rest of
        the packet at every property and rebuilds the list of User Properties at each one:
        a packet of 20,000 took it 1.8 s, of a megabyte minutes, with the event loop stalled).
        Differences, on purpose: a property that runs past the Property Length is malformed
        (paho's reads on into the payload); User Properties after the first
        :data:`MAX_USER_PROPERTIES` are skipped, their strings unread."""
        self.clear()
        propslen, vbi_len = _read_vbi(buffer)
        region = memoryview(buffer)[vbi_len : vbi_len + propslen]  # slices without copies
        pos = 0
        d = self.__dict__
        while pos < propslen:
            start = pos
            ident = region[pos]
            if ident < 0x80:  # every property id is one byte; paho's reader for the rest
                pos += 1
            else:
                ident, n = _read_vbi(region[pos:])
                pos += n
            kind = _SPECS[ident][0]  # an unknown id: KeyError, as paho (MalformedPacket)
            if ident == _USER_PROPERTY and self.packetType in _PACKETS_OF[ident]:
                pairs = d.setdefault("UserProperty", [])
                if len(pairs) >= MAX_USER_PROPERTIES and region[start] == _USER_PROPERTY:
                    pos = _skip_pairs(region, start, propslen)  # this one and those after
                    continue
                value, n = self.readProperty(region[pos:], kind, propslen - pos)
                pairs.append(value)
                pos += n
                continue
            value, n = self.readProperty(region[pos:], kind, propslen - pos)
            pos += n
            name = _COMPACT_OF[ident]
            if ident not in _MULTIPLE and name in d:
                raise MQTTException(f"Property '{name}' must not exist more than once")
            self.__setattr__(name, value)
        return self, propslen + vbi_len


def _skip_pairs(region: Any, pos: int, end: int) -> int:
    """Past the User Properties (UTF-8 string pairs) from ``pos`` on, their strings unread
    (framing checked as paho's would): the position of the next other property, or ``end``."""
    while pos < end and region[pos] == _USER_PROPERTY:
        n = pos + 1
        for _ in range(2):
            if end - n < 2:
                raise MalformedPacket("Not enough data to read string length")
            (length,) = _UINT16.unpack_from(region, n)
            if length > end - n - 2:
                raise MalformedPacket("Length delimited string too long")
            n += 2 + length
        pos = n
    return pos


_UINT16 = struct.Struct("!H")


def _install_fast_properties() -> None:
    """Make paho decode packets with :class:`_FastProperties` (its modules look the class up
    by name at each packet).  Only where paho still uses its own class there."""
    for module_name in ("paho.mqtt.client", "paho.mqtt._packet"):
        with contextlib.suppress(ImportError):
            module = importlib.import_module(module_name)
            if getattr(module, "Properties", None) is Properties:
                module.Properties = _FastProperties  # type: ignore[attr-defined]


if _PAHO_CHECKED:
    _install_fast_properties()


class _ReplyProperties(_FastProperties):
    """The properties of a result PUBLISH (Response Topic and/or Correlation Data), packed
    once here.  paho's ``Properties.pack`` scans all 27 property names with string
    operations at every send, and its ``__setattr__`` scans them again per attribute:
    about a tenth of the daemon's CPU per job.  It reads like any paho ``Properties``
    (attributes, ``str``) and packs to the same bytes."""

    def __init__(self, correlation: bytes | None, response_topic: str | None) -> None:
        super().__init__(PacketTypes.PUBLISH)
        buf = b""
        if response_topic is not None:  # property ids: 8 Response Topic, 9 Correlation Data
            object.__setattr__(self, "ResponseTopic", response_topic)
            buf += b"\x08" + _with_length(response_topic.encode())
        if correlation is not None:
            object.__setattr__(self, "CorrelationData", correlation)
            buf += b"\x09" + _with_length(correlation)
        object.__setattr__(self, "_packed", _varint(len(buf)) + buf)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("result properties are packed once: build a new one")

    def pack(self) -> bytes:
        packed: bytes = object.__getattribute__(self, "_packed")
        return packed


class TakeoverDetector:
    """Detects a client-id clash from its symptom: connections the broker ends soon after
    they start, again and again.  (The v5 reason "session taken over", 0x8E, is not
    reliable: mosquitto 2.0.11 sent 128 to two daemons that kicked each other off 10 times
    in 8 s.)  Not thread-safe: the event loop owns it.
    """

    SHORT_S = 10.0
    """A connection that ends sooner than this (seconds) counts as short."""
    WINDOW = 3
    """This many short connections in a row mean a clash."""
    STABLE_S = 120.0
    """A connection that lasts this long (seconds) clears the clash."""
    BACKOFF_S = (30.0, 60.0)
    """Reconnect delay range while clashing (seconds, jittered)."""

    def __init__(self) -> None:
        self.count = 0
        self.active = False
        self._announced = False

    def connection_ended(self, lasted_s: float) -> bool:
        """Record one connection that lasted ``lasted_s``; True while a clash is detected."""
        if lasted_s >= self.STABLE_S:
            self.count, self.active, self._announced = 0, False, False
        elif lasted_s < self.SHORT_S:
            self.count += 1
        else:
            self.count = 0
        if self.count >= self.WINDOW:
            self.active = True
        return self.active

    def newly_detected(self) -> bool:
        """True once per clash (log it once, not at every reconnect)."""
        if self.active and not self._announced:
            self._announced = True
            return True
        return False

    def backoff_s(self, u: float) -> float:
        """The reconnect delay while clashing, for ``u`` uniform in [0, 1)."""
        lo, hi = self.BACKOFF_S
        return lo + (hi - lo) * u


READS_PER_TURN = 256
"""Most packets read in one wake-up of the event loop (then other work gets a turn)."""
MISC_INTERVAL_S = 0.5
"""How often the loop runs paho's keepalive check and retries refused subscriptions (s)."""
DISCONNECT_FLUSH_S = 0.5
"""How long :meth:`MqttAdapter.aclose` lets a DISCONNECT go out before it drops the socket."""


class MqttAdapter:
    """One broker connection.  Create in the event loop thread, then :meth:`start`."""

    def __init__(
        self,
        options: ConnectOptions,
        *,
        loop: asyncio.AbstractEventLoop,
        subscriptions: Callable[[], list[str]],
        on_message: Callable[[Inbound], None],
        on_connected: Callable[[bool], None],
        on_disconnected: Callable[[], None],
        on_puback: Callable[[int], None],
        name: str = "mqtt",
        on_publish_refused: Callable[[int, int, str], None] | None = None,
        on_subscription_refused: Callable[[str, int, str], None] | None = None,
    ) -> None:
        self.options = options
        self._loop = loop
        self._subscriptions = subscriptions
        self._on_message_cb = on_message
        self._on_connected_cb = on_connected
        self._on_disconnected_cb = on_disconnected
        self._on_puback_cb = on_puback
        self._on_publish_refused_cb = on_publish_refused
        self._on_subscription_refused_cb = on_subscription_refused
        # SUBSCRIBE packet id -> (filters, session present; None for a retry of refused ones)
        self._suback_pending: dict[int, tuple[list[str], bool | None]] = {}
        self._resubscribe_at = 0.0  # monotonic; 0 = nothing to retry
        self._subscribed_once = False
        self.refused_subscriptions: frozenset[str] = frozenset()
        """Topic filters the broker refused at the latest SUBACK (empty while all granted)."""
        self._name = name
        self._stopping = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self._sock: Any = None
        """The socket the event loop drives (None between connections)."""
        self._changed = asyncio.Event()  # the socket closed, or a stop was asked for
        self._writer_added = False
        self._in_paho = False
        """Inside one of paho's network steps (its callbacks may run): hand-offs and writes
        wait for its end (:meth:`_drive`)."""
        self._generation = 0
        self._was_up = False
        self._connected = threading.Event()
        self.subscriptions_refused: list[str] | None = None
        """After a SUBACK: the filters the broker refused ([] = all granted); None before."""
        self.takeover = TakeoverDetector()
        """Connections the broker keeps ending soon after they start (a client id clash)."""
        self.fatal: asyncio.Future[str] = loop.create_future()
        self._v5 = options.protocol == "5"
        self._handoffs: collections.deque[tuple[Callable[..., None], tuple[Any, ...]]] = (
            collections.deque()
        )
        self._drain_scheduled = False
        self._corked: socket.socket | None = None  # held until the end of the loop turn
        self.puback_may_wait: Callable[[], bool] | None = None
        """Set by the owner: True while a PUBACK may wait (up to :data:`PUBACK_LINGER_S`)
        for the event loop's next hand-off instead of its own (so that its outbox delete shares
        the next job's commit; called inside paho's read: must only read)."""
        self._sweep: asyncio.TimerHandle | None = None
        self._sent_since_sweep = False
        self._outstanding = 0
        """QoS 1 publishes whose PUBACK the event loop has not run yet (event loop only):
        the sweep goes on while there are any, so that a PUBACK that may wait is never
        left behind by a sweep that found nothing yet."""
        self._client = self._build_client()

    # -- construction -------------------------------------------------------------

    def _build_client(self) -> paho.Client:
        o = self.options
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=o.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self._v5 else o.clean_start,
            reconnect_on_failure=False,
            manual_ack=True,
        )
        client.max_inflight_messages_set(o.max_inflight)
        client.max_queued_messages_set(0)
        client.connect_timeout = o.connect_timeout_s
        if o.username is not None:
            client.username_pw_set(o.username, o.password)
        if o.tls:
            client.tls_set(
                ca_certs=o.ca_file,
                certfile=o.cert_file,
                keyfile=o.key_file,
                cert_reqs=ssl.CERT_NONE if o.tls_insecure else ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
            client.tls_insecure_set(o.tls_insecure)
        if o.will_topic is not None:
            client.will_set(o.will_topic, o.will_payload, qos=1, retain=True)
        # The event loop drives the socket: with these set, paho queues each packet and asks
        # for a write (:meth:`_on_socket_register_write` writes it at once, or after the
        # paho step under way), and says when a socket closes.
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        client.on_socket_close = self._on_socket_close
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        return client

    # -- lifecycle (event loop thread) --------------------------------------------

    def start(self) -> None:
        """Connect and keep connected, in a task of the event loop (call on the loop)."""
        self._task = self._loop.create_task(self._run(), name=self._name)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def unsubscribe(self, topics: list[str]) -> None:
        """Stop receiving on ``topics`` (queued; the broker answers with an UNSUBACK).  For a
        shared subscription before a planned stop: mosquitto 2.0 keeps dealing a group's
        messages to a disconnected member's persistent session, where they wait for it."""
        if topics and self._connected.is_set():
            self._client.unsubscribe(topics)

    async def aclose(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (no last will) and end the connection task (event loop)."""
        self._request_stop()
        task = self._task
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=timeout)
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._drop_socket()

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (no last will) and end the connection task, from any thread.

        Off the event loop (e.g. ``await asyncio.to_thread(adapter.stop)``) it waits up to
        ``timeout`` for :meth:`aclose` on the loop.  On the loop thread itself, where it
        cannot wait, it writes the DISCONNECT at once (best effort) and drops the socket.
        """
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self._loop and self._loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self.aclose(timeout), self._loop)
            with contextlib.suppress(Exception):
                fut.result(timeout + 1.0)
            return
        self._request_stop()
        if self._sock is not None:
            with contextlib.suppress(Exception):
                self._client.loop_write()  # the DISCONNECT: small, the socket takes it
        self._drop_socket()
        if self._task is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                self._task.cancel()

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation: bytes | None = None,
        response_topic: str | None = None,
    ) -> int | None:
        """Queue a publish; return its packet id (QoS 1: wait for on_puback), None if refused."""
        props = None
        if self._v5 and (correlation is not None or response_topic is not None):
            props = _ReplyProperties(correlation, response_topic)
        self._cork()
        if qos and self.puback_may_wait is not None:
            self._sent_since_sweep = True
            if self._sweep is None:
                self._sweep = self._loop.call_later(PUBACK_LINGER_S, self._swept)
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.warning("mqtt.publish_refused", topic=topic, rc=int(info.rc))
            return None
        if qos:
            self._outstanding += 1
        return int(info.mid)

    def ack(self, message: Inbound) -> None:
        """Acknowledge a job to the broker (only on the connection that delivered it)."""
        if message.qos == 0 or message.generation != self._generation or self._sock is None:
            return
        self._cork()
        self._client.ack(message.mid, message.qos)

    def _cork(self) -> None:
        """Hold what the event loop sends until the end of its turn, then send it at once
        (``TCP_CORK``, Linux): the acknowledgements and results of one group commit leave
        in one segment, not one each (one wake-up of the broker, not one per packet).
        The cork comes off at the next loop iteration, and after 200 ms at the latest."""
        if self._corked is not None or _TCP_CORK is None:
            return
        sock = self._client.socket()
        if not isinstance(sock, socket.socket):
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, 1)
        except OSError:
            return
        self._corked = sock
        self._loop.call_soon(self._uncork)

    def _swept(self) -> None:
        """Run the PUBACKs that waited (event loop); again later while publishes go out or
        wait for their PUBACK on a live connection (after a reconnect paho sends them
        again, and :meth:`_arm_sweep` starts the sweeps again)."""
        self._sweep = None
        if self._handoffs and not self._drain_scheduled:
            self._drain()
        waiting = self._outstanding > 0 and self._connected.is_set()
        if self._sent_since_sweep or self._handoffs or waiting:
            self._sent_since_sweep = False
            self._sweep = self._loop.call_later(PUBACK_LINGER_S, self._swept)

    def _arm_sweep(self) -> None:
        """Sweep while publishes wait for their PUBACK (event loop; on each connection)."""
        if self._outstanding and self._sweep is None and self.puback_may_wait is not None:
            self._sweep = self._loop.call_later(PUBACK_LINGER_S, self._swept)

    def _puback(self, mid: int) -> None:
        """A PUBACK reaches the owner (event loop)."""
        self._outstanding = max(0, self._outstanding - 1)
        self._on_puback_cb(mid)

    def _uncork(self) -> None:
        sock, self._corked = self._corked, None
        if sock is not None and _TCP_CORK is not None:
            with contextlib.suppress(OSError):  # closed meanwhile (a reconnect)
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, 0)

    # -- the connection task (event loop) -------------------------------------------

    async def _run(self) -> None:
        o = self.options
        delay = backoff_delays(o.reconnect_min_s, o.reconnect_max_s, random.Random())
        attempt = 0
        while not self._stopping.is_set():
            try:
                await self._open()
            except ssl.SSLCertVerificationError as exc:
                self._set_fatal(
                    f"TLS verification of {o.host}:{o.port} failed: {exc.verify_message}"
                )
                return
            except (OSError, ssl.SSLError) as exc:
                wait = delay(attempt)
                attempt += 1
                log.warning(
                    "mqtt.connect_failed",
                    host=o.host,
                    port=o.port,
                    error=str(exc),
                    retry_in_s=round(wait, 2),
                )
                await self._pause(wait)
                continue
            while self._sock is not None and not self._stopping.is_set():
                await self._pause(MISC_INTERVAL_S)
                if self._sock is not None:  # keepalive: PINGREQ, or drop a dead connection
                    self._drive(self._client.loop_misc)
                if self._resubscribe_at and time.monotonic() >= self._resubscribe_at:
                    self._retry_refused()
            if self._stopping.is_set():
                until = time.monotonic() + DISCONNECT_FLUSH_S
                while self._disconnecting and self._sock is not None and time.monotonic() < until:
                    await self._pause(until - time.monotonic(), stop=False)  # DISCONNECT out
                self._drop_socket()
                return
            if self.fatal.done() or self._fatal_pending:
                return
            self._mark_disconnected()
            if self._was_up:
                attempt = 0
            wait = delay(attempt)
            attempt += 1
            if self._was_up and self.takeover.connection_ended(time.monotonic() - self._up_since):
                wait = max(wait, self.takeover.backoff_s(random.random()))
                if self.takeover.newly_detected():
                    log.error(
                        "mqtt.client_id_conflict",
                        client_id=o.client_id,
                        short_connections=self.takeover.count,
                        backoff_s=round(wait, 1),
                        hint="another client connects with the same client id (two daemons "
                        "with one device_id?): give each its own device_id or mqtt.client_id",
                    )
            log.warning("mqtt.disconnected", retry_in_s=round(wait, 2))
            await self._pause(wait)

    _fatal_pending = False
    _disconnecting = False
    _up_since = 0.0

    async def _pause(self, seconds: float, *, stop: bool = True) -> None:
        """Wait ``seconds``, or less if the socket closes or (``stop``) a stop is asked for."""
        self._changed.clear()
        if (stop and self._stopping.is_set()) or seconds <= 0:
            return
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):  # distinct on 3.10
            await asyncio.wait_for(self._changed.wait(), seconds)

    async def _open(self) -> None:
        """Connect in a helper thread (DNS, TCP, TLS handshake and CONNECT block), then let
        the event loop drive the socket."""
        fut: asyncio.Future[Any] = self._loop.create_future()

        def land(sock: Any, error: BaseException | None) -> None:  # event loop
            if fut.done():  # given up meanwhile (stop): nobody will drive this socket
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()
            elif error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(sock)

        def connect() -> None:  # helper thread
            try:
                sock = self._connect()
            except BaseException as exc:  # handed to the loop as it is
                result: tuple[Any, BaseException | None] = (None, exc)
            else:
                result = (sock, None)
            try:
                self._loop.call_soon_threadsafe(land, *result)
            except RuntimeError:  # the loop is closed: nobody will drive this socket
                if result[0] is not None:
                    with contextlib.suppress(OSError):
                        result[0].close()

        threading.Thread(target=connect, name=f"{self._name}-connect", daemon=True).start()
        sock = await fut
        if self._stopping.is_set():
            with contextlib.suppress(OSError):
                sock.close()
            raise ConnectionAbortedError("stopping")
        self._attach(sock)

    def _connect(self) -> Any:
        """paho's blocking connect (helper thread): the socket, CONNECT queued on it."""
        o = self.options
        props = None
        if self._v5:
            props = _FastProperties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = o.session_expiry_s
            props.ReceiveMaximum = o.receive_maximum
            if o.max_packet_bytes:  # the broker discards bigger packets for us (v5 3.1.2.11.4)
                props.MaximumPacketSize = o.max_packet_bytes
        self._client.connect(
            o.host,
            o.port,
            keepalive=o.keepalive_s,
            clean_start=o.clean_start if self._v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
        )
        # Small messages must not wait for Nagle + delayed ACK (~40 ms each way); paho
        # leaves TCP_NODELAY off.
        sock = self._client.socket()
        if isinstance(sock, socket.socket):  # ssl.SSLSocket is one too
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _attach(self, sock: Any) -> None:
        """The event loop drives ``sock`` from now on (a new connection)."""
        self._sock = sock
        self._generation += 1  # what arrives from now on is acknowledged on this one
        self._was_up = False
        self._writer_added = False
        self._loop.add_reader(sock, self._readable)
        self._write()  # the CONNECT paho queued

    def _detach(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._generation += 1  # nothing of the old connection is acknowledged any more
        with contextlib.suppress(Exception):
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        self._writer_added = False
        self._changed.set()

    def _drop_socket(self) -> None:
        """Stop driving the socket and close it (no DISCONNECT: one was sent already, or
        none is wanted)."""
        sock = self._sock
        self._detach()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def _request_stop(self) -> None:
        first = not self._stopping.is_set()
        self._stopping.set()
        self._changed.set()
        if first and self._connected.is_set() and self._sock is not None:
            self._disconnecting = True
            self._client.disconnect()  # queued: written by the loop, then paho closes

    def _readable(self) -> None:
        """The socket has data (event loop)."""
        self._drive(self._read)

    def _read(self) -> MQTTErrorCode:
        """paho's ``loop_read`` until nothing is left to read now (it reads at most one packet
        more than the messages it has in flight: one per loop turn, while idle), at most
        :data:`READS_PER_TURN` packets."""
        sock = self._sock
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        for _ in range(READS_PER_TURN):
            rc = self._client.loop_read()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or sock is not self._sock:
                break
            # TLS: a record may hold more than paho read; the kernel socket then has nothing
            # left to wake the selector for.
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                continue
            if not select.select([sock], [], [], 0)[0]:
                break
        return rc

    def _drive(self, step: Callable[[], MQTTErrorCode]) -> MQTTErrorCode:
        """Run one of paho's network steps (``loop_read``, ``loop_write``, ``loop_misc``) on
        the event loop; then the owner's callbacks it queued (outside paho's callbacks, so
        that they may publish and acknowledge), then write what it left queued."""
        self._in_paho = True
        try:
            rc = step()
        except Exception:  # our callbacks guard themselves; this is paho's own trouble
            log.exception("mqtt.network_step_failed", step=getattr(step, "__name__", "?"))
            rc = MQTTErrorCode.MQTT_ERR_UNKNOWN
        finally:
            self._in_paho = False
        if self._drain_scheduled:
            self._drain()
        if self._sock is not None and self._client.want_write():
            self._write()
        return rc

    def _write(self) -> None:
        """Write what paho queued; what the socket does not take now waits for it to drain."""
        armed = self._drain_scheduled
        self._in_paho = True
        try:
            self._client.loop_write()
        except Exception:
            log.exception("mqtt.write_failed")
        finally:
            self._in_paho = False
        if self._drain_scheduled and not armed:  # a lost connection: its callbacks, later
            self._loop.call_soon(self._drain)  # (the caller may be one of them)
        sock = self._sock
        if sock is not None and self._client.want_write() and not self._writer_added:
            self._writer_added = True
            self._loop.add_writer(sock, self._write)

    # paho socket callbacks (event loop; during a connect also the helper thread, which
    # they ignore: the loop takes the socket over afterwards).

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        """paho queued a packet: from the owner (publish, ack) it is written at once (corked
        until the end of the loop's turn); inside a paho step, right after it."""
        if sock is self._sock and sock is not None and not self._in_paho:
            self._write()

    def _on_socket_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if sock is self._sock and sock is not None and self._writer_added:
            self._writer_added = False
            self._loop.remove_writer(sock)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if sock is self._sock and sock is not None:
            self._detach()  # before paho closes it: the selector needs its descriptor

    def _mark_disconnected(self) -> None:
        if self._connected.is_set():
            self._connected.clear()
            self._call(self._on_disconnected_cb)

    def _set_fatal(self, reason: str) -> None:
        self._fatal_pending = True
        self._stopping.set()
        self._changed.set()
        if not self.fatal.done():
            self.fatal.set_result(reason)

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        """Hand ``fn(*args)`` to the owner, in order: run after the paho step that queued it
        (outside paho's callbacks), or at the loop's next turn."""
        self._handoffs.append((fn, args))
        if not self._drain_scheduled:
            self._drain_scheduled = True
            if not self._in_paho:
                self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        """Run the handed-off callbacks (event loop)."""
        self._drain_scheduled = False  # cleared before draining: a later append re-arms it
        while self._handoffs:
            fn, args = self._handoffs.popleft()
            try:
                fn(*args)
            except Exception:  # one callback's failure must not cost the others theirs
                log.exception("mqtt.callback_failed", callback=getattr(fn, "__name__", "?"))

    # paho callbacks (event loop, inside loop_read/loop_misc).

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: Any,
        properties: Properties | None,
    ) -> None:
        code = int(getattr(reason_code, "value", reason_code))
        if code != 0:
            if code in FATAL_CONNACK:
                self._set_fatal(
                    f"broker {self.options.host}:{self.options.port} refused the connection: "
                    f"{FATAL_CONNACK[code]} (reason code {code})"
                )
            else:
                log.warning("mqtt.connack_refused", reason_code=code, reason=str(reason_code))
            return
        self._suback_pending.clear()  # SUBACKs of an earlier connection never come
        self._resubscribe_at = 0.0  # every filter is subscribed again below
        session_present = bool(flags.session_present)
        self._up_since = time.monotonic()
        subs = self._subscriptions()
        self.subscriptions_refused = None
        if subs:
            if self._v5:
                opts = SubscribeOptions(qos=1, noLocal=False)
                rc, mid = client.subscribe([(t, opts) for t in subs])
            else:
                rc, mid = client.subscribe([(t, 1) for t in subs])
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                # Connected once the SUBACK says what was granted (see _on_subscribe).
                self._suback_pending[int(mid)] = (subs, session_present)
                return
        self._set_connected(session_present)

    def _set_connected(self, session_present: bool) -> None:
        self._was_up = True
        self._connected.set()
        self._call(self._arm_sweep)
        self._call(self._on_connected_cb, session_present)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[Any],
        properties: Properties | None,
    ) -> None:
        pending = self._suback_pending.pop(int(mid), None)
        if pending is None:
            return
        subs, session_present = pending
        if session_present is None:
            self._retried(subs, reason_codes)
            return
        refused: list[tuple[str, int, str]] = []
        for topic, rc in zip(subs, reason_codes, strict=False):
            code = int(getattr(rc, "value", rc))
            if code >= 0x80:
                refused.append((topic, code, str(rc)))
            elif code < 1:
                # Granted QoS 0 (a broker's max_qos): messages on it may be lost in transit.
                log.warning("mqtt.subscription_downgraded", topic=topic, granted_qos=code)
        self.refused_subscriptions = frozenset(t for t, _, _ in refused)
        self.subscriptions_refused = sorted(self.refused_subscriptions)
        if refused and not self._subscribed_once:
            topic, code, reason = refused[0]
            self._set_fatal(
                f"broker {self.options.host}:{self.options.port} refused the subscription to "
                f"{topic!r}: {reason} (reason code {code}); check the broker's ACL for user "
                f"{self.options.username or '(anonymous)'!r}, client id {self.options.client_id!r}"
            )
            return
        for topic, code, reason in refused:
            log.error("mqtt.subscription_refused", topic=topic, reason_code=code, reason=reason)
            if self._on_subscription_refused_cb is not None:
                self._call(self._on_subscription_refused_cb, topic, code, reason)
        if refused:
            self._resubscribe_at = time.monotonic() + self.options.reconnect_max_s
        else:
            self._subscribed_once = True
        self._set_connected(session_present)

    def _retry_refused(self) -> None:
        """Ask again for filters the broker refused (its ACL may have been fixed since);
        every ``reconnect_max_s`` while any stays refused."""
        self._resubscribe_at = 0.0
        subs = sorted(self.refused_subscriptions)
        if not subs or not self._connected.is_set():
            return
        if self._v5:
            opts = SubscribeOptions(qos=1, noLocal=False)
            rc, mid = self._client.subscribe([(t, opts) for t in subs])
        else:
            rc, mid = self._client.subscribe([(t, 1) for t in subs])
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            self._suback_pending[int(mid)] = (subs, None)
        else:
            self._resubscribe_at = time.monotonic() + self.options.reconnect_max_s

    def _retried(self, subs: list[str], reason_codes: list[Any]) -> None:
        still = {t for t, rc in zip(subs, reason_codes, strict=False) if _code(rc) >= 0x80}
        for topic in sorted(set(subs) - still):
            log.info("mqtt.subscription_granted", topic=topic)
        self.refused_subscriptions = frozenset(still)
        self.subscriptions_refused = sorted(still)
        if still:
            self._resubscribe_at = time.monotonic() + self.options.reconnect_max_s

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: Any,
        properties: Properties | None,
    ) -> None:
        code = int(getattr(reason_code, "value", reason_code) or 0)
        if code == 0x8E:
            log.warning(
                "mqtt.session_taken_over",
                client_id=self.options.client_id,
                hint="another client uses the same client id",
            )
        elif code:
            log.warning("mqtt.disconnect_reason", reason_code=code, reason=str(reason_code))
        self._mark_disconnected()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            self._hand_off(msg)
        except Exception as exc:
            # An exception here would abort paho's read of the rest of the packet.  Only
            # a broker that forwards what MQTT forbids (a topic that is not UTF-8) gets here:
            # such a message has no topic to answer on; acknowledge it so it is not resent.
            log.error("mqtt.bad_message", error=repr(exc)[:200], mid=msg.mid, qos=msg.qos)
            if msg.qos > 0:
                with contextlib.suppress(Exception):
                    client.ack(msg.mid, msg.qos)

    def _hand_off(self, msg: paho.MQTTMessage) -> None:
        response_topic = None
        correlation = None
        props = getattr(msg, "properties", None)
        if props is not None:
            response_topic = getattr(props, "ResponseTopic", None)
            corr = getattr(props, "CorrelationData", None)
            correlation = bytes(corr) if corr is not None else None
        inbound = Inbound(
            topic=msg.topic,
            payload=bytes(msg.payload),
            qos=int(msg.qos),
            mid=int(msg.mid),
            dup=bool(msg.dup),
            generation=self._generation,
            response_topic=response_topic,
            correlation=correlation,
        )
        self._call(self._on_message_cb, inbound)

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: Any,
        properties: Properties | None,
    ) -> None:
        code = int(getattr(reason_code, "value", reason_code) or 0)
        if code >= 0x80:
            # The broker refused the message (e.g. 0x87: the ACL forbids the topic).  Resending
            # cannot help, so it still completes; the owner is told which one (dead letter).
            log.error(
                "mqtt.publish_refused_by_broker", mid=mid, reason_code=code, reason=str(reason_code)
            )
            if self._on_publish_refused_cb is not None:
                self._call(self._on_publish_refused_cb, int(mid), code, str(reason_code))
        may_wait = self.puback_may_wait
        if code < 0x80 and may_wait is not None and may_wait():
            # Nothing waits for it (its row is published; only its delete is left): it
            # goes with the next wake-up of the loop, or the sweep, not a wake-up of its own.
            self._handoffs.append((self._puback, (int(mid),)))
            return
        self._call(self._puback, int(mid))
