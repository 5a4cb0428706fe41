"""Result PUBLISH properties packed once (edgeagent.mqtt._ReplyProperties) are the bytes
paho's own Properties would send."""

from __future__ import annotations

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeagent.mqtt import _ReplyProperties


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
