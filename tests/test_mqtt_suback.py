"""The adapter's SUBACK handling at its seam (paho's callback), without a network: which
refusals are fatal, which are reported, and the retry of refused filters."""

from __future__ import annotations

import asyncio

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from edgeagent.mqtt import ConnectOptions, MqttAdapter


def _rc(code: int) -> ReasonCode:
    return ReasonCode(PacketTypes.SUBACK, identifier=code)  # type: ignore[no-untyped-call]


def _adapter(loop: asyncio.AbstractEventLoop, events: list[tuple[str, object]]) -> MqttAdapter:
    return MqttAdapter(
        ConnectOptions(host="127.0.0.1", port=1, client_id="edgeagent-d1", username="d1"),
        loop=loop,
        subscriptions=lambda: ["edgeagent/d1/jobs/+", "edgeagent/d1/cloud/replies"],
        on_message=lambda m: None,
        on_connected=lambda sp: events.append(("connected", sp)),
        on_disconnected=lambda: None,
        on_puback=lambda mid: None,
        on_subscription_refused=lambda t, c, r: events.append(("refused", (t, c, r))),
    )


async def _settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def test_refusal_before_the_first_complete_subscription_is_fatal() -> None:
    async def main() -> None:
        events: list[tuple[str, object]] = []
        a = _adapter(asyncio.get_running_loop(), events)
        subs = ["edgeagent/d1/jobs/+", "edgeagent/d1/cloud/replies"]
        a._suback_pending[7] = (subs, False)
        a._on_subscribe(a._client, None, 7, [_rc(0x87), _rc(1)], None)
        await _settle()
        assert a.fatal.done()
        msg = a.fatal.result()
        assert "refused the subscription to 'edgeagent/d1/jobs/+'" in msg
        assert "Not authorized (reason code 135)" in msg and "'d1'" in msg
        assert events == []  # never "connected": no `online` status
        assert not a.connected

    asyncio.run(main())


def test_refusal_after_a_reconnect_is_reported_and_retried() -> None:
    async def main() -> None:
        events: list[tuple[str, object]] = []
        a = _adapter(asyncio.get_running_loop(), events)
        subs = ["edgeagent/d1/jobs/+", "edgeagent/d1/cloud/replies"]
        a._suback_pending[1] = (subs, False)
        a._on_subscribe(a._client, None, 1, [_rc(1), _rc(1)], None)  # the first connection
        a._suback_pending[2] = (subs, True)
        a._on_subscribe(a._client, None, 2, [_rc(0x87), _rc(1)], None)  # after a reconnect
        await _settle()
        assert not a.fatal.done()
        assert events == [
            ("connected", False),
            ("refused", ("edgeagent/d1/jobs/+", 0x87, "Not authorized")),
            ("connected", True),
        ]
        assert a.refused_subscriptions == {"edgeagent/d1/jobs/+"}
        assert a._resubscribe_at > 0  # asked again after reconnect_max_s
        # The retry's SUBACK: still refused, then granted.
        a._suback_pending[3] = (["edgeagent/d1/jobs/+"], None)
        a._on_subscribe(a._client, None, 3, [_rc(0x87)], None)
        assert a.refused_subscriptions == {"edgeagent/d1/jobs/+"} and a._resubscribe_at > 0
        a._resubscribe_at = 0.0
        a._suback_pending[4] = (["edgeagent/d1/jobs/+"], None)
        a._on_subscribe(a._client, None, 4, [_rc(1)], None)
        assert a.refused_subscriptions == frozenset() and a._resubscribe_at == 0.0
        await _settle()
        assert len(events) == 3  # a retry is not a new connection

    asyncio.run(main())
