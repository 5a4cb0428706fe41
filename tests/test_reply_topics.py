"""Reply-topic scope (issue 9, item 6): a job may only name reply topics in its own device's
namespace or under the operator's prefixes; never another device's, never a protocol topic."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent.config import Settings
from edgeagent.protocol import MAX_REPLY_TOPIC_BYTES, Topics

T = Topics("edgeagent", "d1", "fleet")
RESERVED_LEVELS = {"jobs", "cloud", "status", "stats", "fleet"}

# Topic levels a producer might well use: short, printable, never reserved or wild.
plain_level = st.text(
    alphabet=st.characters(
        codec="utf-8",
        categories=("L", "N", "Pd", "Pc"),
        exclude_characters="+#/$",
    ),
    min_size=1,
    max_size=12,
).filter(lambda s: s not in RESERVED_LEVELS)
any_level = plain_level | st.sampled_from(
    [
        "",
        "+",
        "#",
        "$SYS",
        "jobs",
        "status",
        "stats",
        "cloud",
        "fleet",
        "d1",
        "d2",
        "\x00",
        "\ud800",
    ]
)


@pytest.mark.parametrize(
    "topic",
    [
        # The attack that was reproduced: a client allowed only to write edgeagent/d1/jobs/#.
        "edgeagent/d2/results/alarm",
        "edgeagent/victim/anything",
        "edgeagent/",
        "edgeagent//",
        "edgeagent",
        # Empty levels, wildcards, broker topics.
        "edgeagent/d1/",
        "edgeagent/d1//x",
        "/edgeagent/d1/x",
        "edgeagent/d1/+",
        "edgeagent/d1/replies/#",
        "$SYS/broker/x",
        "$share/g/edgeagent/d1/x",
        # The protocol's own topics, of this device and of others.
        "edgeagent/d1/jobs/alarm",
        "edgeagent/d1/status",
        "edgeagent/d1/stats",
        "edgeagent/d1/cloud/replies",
        "edgeagent/d1/replies/status",
        "edgeagent/cloud/requests/alarm",
        "edgeagent/cloud/status/w1",
        "edgeagent/fleet/jobs/alarm",
        # Text mosquitto would treat as a malformed packet (it disconnects the publisher).
        "edgeagent/d1/replies/a\x00b",
        "edgeagent/d1/replies/\x07",
        "edgeagent/d1/replies/\x85",
        "edgeagent/d1/replies/\ud800",
        "edgeagent/d1/replies/\ufffe",
        "edgeagent/d1/replies/" + "x" * MAX_REPLY_TOPIC_BYTES,
        "",
        # A prefix that only looks like ours.
        "edgeagent/d10/results/alarm",
        "other/x",
    ],
)
def test_default_scope_refuses(topic: str) -> None:
    assert T.reply_refusal(topic, []) is not None
    assert not T.reply_allowed(topic, [])


@pytest.mark.parametrize(
    "topic",
    [
        "edgeagent/d1/results/alarm",
        "edgeagent/d1/results/alarm/me",
        "edgeagent/d1/replies/producer-7",
        "edgeagent/d1/replies/producer-7/req/42",
        "edgeagent/d1/résultats/ü",
    ],
)
def test_default_scope_allows_own_namespace(topic: str) -> None:
    assert T.reply_allowed(topic, []), T.reply_refusal(topic, [])


def test_operator_prefixes_are_matched_on_whole_levels() -> None:
    prefixes = ["app/replies", "ops/"]
    assert T.reply_allowed("app/replies/x", prefixes)
    assert T.reply_allowed("ops/a/b", prefixes)
    assert not T.reply_allowed("app/replies-evil/x", prefixes)
    assert not T.reply_allowed("app/replies", prefixes)  # the prefix itself has no level left
    assert not T.reply_allowed("app/replies/", prefixes)
    # Reserved topics stay refused even under an operator's prefix.
    for topic in ("ops/jobs/x", "ops/x/status", "ops/cloud/x"):
        assert not T.reply_allowed(topic, prefixes), topic
    # An operator may open another device's namespace on purpose, never its protocol topics.
    assert T.reply_allowed("edgeagent/d2/results/alarm", ["edgeagent/d2/results"])
    assert not T.reply_allowed("edgeagent/d2/jobs/alarm", ["edgeagent/"])


def test_settings_default_is_the_device_namespace_only() -> None:
    s = Settings.model_validate({"device_id": "d1"})
    assert s.reply_prefixes == []
    topics = Topics(s.topics.prefix, s.device_id)
    assert topics.reply_allowed("edgeagent/d1/replies/x", s.reply_prefixes)
    assert not topics.reply_allowed("edgeagent/d2/replies/x", s.reply_prefixes)


@pytest.mark.parametrize("bad", ["a//b", "/a", "a/+", "$SYS/", "a\x00"])
def test_config_refuses_malformed_prefixes(bad: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        Settings.model_validate({"device_id": "d1", "topics": {"allowed_reply_prefixes": [bad]}})


@settings(max_examples=1000)
@given(
    st.lists(any_level, min_size=1, max_size=6).map("/".join) | st.text(max_size=60),
    st.lists(st.lists(plain_level, min_size=1, max_size=3).map("/".join), max_size=2),
)
def test_every_allowed_topic_is_safe(topic: str, prefixes: list[str]) -> None:
    """Whatever the topic and the operator's prefixes: an allowed topic is a well-formed,
    wildcard-free topic name with no empty level and no protocol level, and it lies in
    this device's namespace or under one of the prefixes (on a level boundary)."""
    if not T.reply_allowed(topic, prefixes):
        return
    levels = topic.split("/")
    assert "" not in levels
    assert not topic.startswith("$")
    assert "+" not in topic and "#" not in topic
    assert "jobs" not in levels and "cloud" not in levels
    assert levels[-1] not in ("status", "stats")
    assert levels[:2] not in (["edgeagent", "fleet"], ["edgeagent", "cloud"])
    encoded = topic.encode("utf-8")  # no lone surrogate
    assert len(encoded) <= MAX_REPLY_TOPIC_BYTES
    assert all(ord(c) >= 0x20 and not 0x7F <= ord(c) <= 0x9F for c in topic)
    assert topic.startswith("edgeagent/d1/") or any(
        topic.startswith(p.rstrip("/") + "/") for p in prefixes
    )


@settings(max_examples=500)
@given(
    plain_level.filter(lambda d: d != "d1"),
    st.lists(plain_level, min_size=1, max_size=4).map("/".join),
)
def test_no_other_device_namespace_by_default(other: str, rest: str) -> None:
    assert not T.reply_allowed(f"edgeagent/{other}/{rest}", [])


@settings(max_examples=500)
@given(st.lists(plain_level, min_size=1, max_size=4).map("/".join))
def test_own_namespace_is_allowed_by_default(rest: str) -> None:
    assert T.reply_allowed(f"edgeagent/d1/{rest}", []), T.reply_refusal(f"edgeagent/d1/{rest}", [])
