"""Result PUBLISH properties packed once (edgeagent.mqtt._ReplyProperties) are the bytes
paho's own Properties would send, and the faster Properties paho decodes packets with
(edgeagent.mqtt._FastProperties) behaves as paho's own."""

from __future__ import annotations

import functools
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.exception import MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeagent.mqtt import _FastProperties, _ReplyProperties, _varint


@pytest.mark.parametrize(
    ("correlation", "response_topic"),
    [
        (b"\x00corr", "bench/replies/x"),
        (None, "a/b"),
        (b"x" * 300, None),
        (b"", "\u00fc/" + "t" * 200),
        (b"y" * 65535, "t"),
    ],
)
def test_reply_properties_pack_like_paho(
    correlation: bytes | None, response_topic: str | None
) -> None:
    ref = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if correlation is not None:
        ref.CorrelationData = correlation
    if response_topic is not None:
        ref.ResponseTopic = response_topic
    fast = _ReplyProperties(correlation, response_topic)
    assert fast.pack() == ref.pack()
    assert str(fast) == str(ref)
    assert getattr(fast, "CorrelationData", None) == correlation


def test_reply_properties_cannot_change_after_packing() -> None:
    props = _ReplyProperties(b"c", None)
    with pytest.raises(AttributeError):
        props.ResponseTopic = "late"


# -- _FastProperties: paho's Properties with tables built once (decoding every packet) ------

DECODE_ERRORS = (struct.error, IndexError, KeyError, ValueError, MQTTException)
"""What paho's decoders turn into MalformedPacket (paho.mqtt._packet.DECODE_ERRORS, 2.2)."""
_PACKET_TYPES = [*range(1, 16), PacketTypes.WILLMESSAGE]
_SAMPLES = {  # a valid value of each of paho's property types
    0: 1,  # Byte
    1: 300,  # Two Byte Integer
    2: 70000,  # Four Byte Integer
    3: 200,  # Variable Byte Integer
    4: b"\x00bin",  # Binary Data
    5: "t\u00fcpic/x",  # UTF-8 Encoded String
    6: ("key", "v\u00e4lue"),  # UTF-8 String Pair
}
_STOCK = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
_COMPACT = {ident: name.replace(" ", "") for name, ident in _STOCK.names.items()}


def _outcome(props: Properties, fn: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(props)
    except Exception as exc:  # both must fail alike
        return type(exc).__name__, str(exc)


def _set(props: Properties, name: str, value: Any) -> None:
    setattr(props, name, value)


def _view(props: Properties) -> tuple[Any, ...]:
    return (props.pack(), str(props), props.json(), props.isEmpty())


@pytest.mark.parametrize("packet_type", _PACKET_TYPES)
def test_fast_properties_set_and_pack_like_paho(packet_type: int) -> None:
    for ident, (kind, _packets) in _STOCK.properties.items():
        name = _COMPACT[ident]
        ref = Properties(packet_type)  # type: ignore[no-untyped-call]
        fast = _FastProperties(packet_type)
        for _ in range(2):  # twice: multiples accumulate, others are replaced
            set_it = functools.partial(_set, name=name, value=_SAMPLES[kind])
            assert _outcome(fast, set_it) == _outcome(ref, set_it), name
        assert _view(fast) == _view(ref), name
        assert fast.allowsMultiple(name) == ref.allowsMultiple(name)  # type: ignore[no-untyped-call]
        assert fast.getIdentFromName(name) == ref.getIdentFromName(name)  # type: ignore[no-untyped-call]
        fast.clear()
        ref.clear()  # type: ignore[no-untyped-call]
        assert _view(fast) == _view(ref)


@pytest.mark.parametrize(
    ("packet_type", "name", "value"),
    [
        (PacketTypes.CONNECT, "ReceiveMaximum", 0),
        (PacketTypes.CONNECT, "ReceiveMaximum", 65536),
        (PacketTypes.CONNECT, "TopicAliasMaximum", -1),
        (PacketTypes.CONNECT, "MaximumPacketSize", 0),
        (PacketTypes.SUBSCRIBE, "SubscriptionIdentifier", 268435456),
        (PacketTypes.CONNECT, "RequestProblemInformation", 2),
        (PacketTypes.PUBLISH, "PayloadFormatIndicator", 1),
        (PacketTypes.PUBLISH, "NoSuchProperty", 1),
        (PacketTypes.PUBLISH, "Response Topic", "with/space"),
        (PacketTypes.PUBLISH, "UserProperty", [("a", "1"), ("b", "2")]),
    ],
)
def test_fast_properties_checks_like_paho(packet_type: int, name: str, value: Any) -> None:
    ref = Properties(packet_type)  # type: ignore[no-untyped-call]
    fast = _FastProperties(packet_type)
    assert _outcome(fast, lambda p: setattr(p, name, value)) == _outcome(
        ref, lambda p: setattr(p, name, value)
    )
    assert _view(fast) == _view(ref)


def _unpacked(cls: Any, packet_type: int, buf: bytes) -> tuple[str, Any]:
    props = cls(packet_type)
    try:
        _, length = props.unpack(buf)
    except DECODE_ERRORS:  # paho's decoders turn each into MalformedPacket
        return "error", None
    return "ok", (props.json(), length)


def _encoded(ident: int, kind: int, value: Any) -> bytes:
    return bytes(Properties(PacketTypes.PUBLISH).writeProperty(ident, kind, value))  # type: ignore[no-untyped-call]


_PROPERTY = st.sampled_from(sorted(_STOCK.properties)).flatmap(
    lambda ident: st.just(
        _encoded(ident, _STOCK.properties[ident][0], _SAMPLES[_STOCK.properties[ident][0]])
    )
)


@settings(max_examples=400, deadline=None)
@given(
    packet_type=st.sampled_from(_PACKET_TYPES),
    parts=st.lists(st.one_of(_PROPERTY, st.binary(max_size=6)), max_size=5),
    slack=st.integers(-3, 3),
)
def test_fast_properties_unpack_like_paho(packet_type: int, parts: list[bytes], slack: int) -> None:
    """Well-formed, duplicated, foreign, truncated and random properties: the same attributes,
    or both fail (paho's decoders turn either failure into MalformedPacket).  A Property
    Length shorter than the properties (``slack < 0``) is where they may differ: paho reads
    on into the bytes behind (the payload), _FastProperties calls the packet malformed."""
    body = b"".join(parts)
    buf = _varint(max(0, len(body) + slack)) + body
    fast = _unpacked(_FastProperties, packet_type, buf)
    ref = _unpacked(Properties, packet_type, buf)
    if slack >= 0 or fast[0] == "ok":
        assert fast == ref


def test_fast_properties_decode_a_publish_like_paho() -> None:
    _packet = pytest.importorskip("paho.mqtt._packet")  # paho 2.2 (2.1 decodes in client.py)
    from paho.mqtt.enums import MQTTProtocolVersion

    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = "reply/here"
    props.CorrelationData = b"\x01\x02"
    props.UserProperty = [("k", "v"), ("k", "w")]
    props.MessageExpiryInterval = 30
    topic = b"edgeagent/dev/jobs/alarm"
    body = len(topic).to_bytes(2, "big") + topic + (7).to_bytes(2, "big") + props.pack()
    body += b'{"input": "smoke"}'
    decoded = _packet.decode_publish(0x32, body, MQTTProtocolVersion.MQTTv5)
    assert isinstance(decoded.properties, _FastProperties)  # installed where paho decodes
    assert decoded.properties.json() == props.json()
    assert decoded.payload == b'{"input": "smoke"}'
    assert decoded.mid == 7 and decoded.topic == topic


def _read(fn: Any, buf: bytes, maxlen: int) -> tuple[str, Any]:
    try:
        return "ok", fn(buf, maxlen)
    except DECODE_ERRORS as exc:
        return type(exc).__name__, str(exc)


@settings(max_examples=500, deadline=None)
@given(
    text=st.text(alphabet=st.sampled_from("ab/\x00\ufeff\u00e4\U0001f600"), max_size=8),
    raw=st.binary(max_size=12),
    cut=st.integers(-2, 3),
)
def test_read_utf_like_paho(text: str, raw: bytes, cut: int) -> None:
    """The strings of properties (a Response Topic, a User Property) are read with the same
    checks and errors as paho's readUTF: NUL and U+FEFF refused, whichever comes first."""
    from paho.mqtt.properties import readUTF

    from edgeagent.mqtt import _read_utf

    data = text.encode()
    for buf in (len(data).to_bytes(2, "big") + data, raw):
        maxlen = len(buf) + cut
        assert _read(_read_utf, buf, maxlen) == _read(readUTF, buf, maxlen)


def test_paho_decodes_with_the_fast_properties_only_on_checked_releases() -> None:
    import paho.mqtt.client as paho_client

    from edgeagent import mqtt

    installed = paho_client.Properties is _FastProperties  # type: ignore[attr-defined]
    assert installed == mqtt._PAHO_CHECKED


def test_a_flood_of_user_properties_is_read_in_one_pass_and_capped() -> None:
    """A producer may send hundreds of thousands of User Properties in one PUBLISH (the
    broker forwards them): the first MAX_USER_PROPERTIES are kept, the rest skipped, and
    what follows them (the Response Topic here) is still read; their framing is checked."""
    from edgeagent.mqtt import MAX_USER_PROPERTIES

    pair = _encoded(38, 6, ("k", "v"))
    topic = _encoded(8, 5, "reply/here")
    body = pair * (MAX_USER_PROPERTIES * 20) + topic
    props = _FastProperties(PacketTypes.PUBLISH)
    _, length = props.unpack(_varint(len(body)) + body + b"payload")
    assert length == len(_varint(len(body))) + len(body)
    assert props.UserProperty == [("k", "v")] * MAX_USER_PROPERTIES
    assert props.ResponseTopic == "reply/here"
    broken = pair * (MAX_USER_PROPERTIES + 1) + b"\x26\x00\x05ab"  # a string cut short
    with pytest.raises(MQTTException):
        _FastProperties(PacketTypes.PUBLISH).unpack(_varint(len(broken)) + broken)
