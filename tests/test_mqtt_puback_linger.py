"""A PUBACK that may wait for the loop's next wake-up (the publish window is less than half
full) still reaches the owner when it comes after the sweeps have seen nothing for a while:
no outbox row stays behind because its broker acknowledgement came late (seen after a
restart with a backlog: the last rows of the outbox stayed until the next job)."""

from __future__ import annotations

import asyncio
import threading

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from edgeagent.mqtt import PUBACK_LINGER_S, ConnectOptions, MqttAdapter


def test_a_late_puback_that_may_wait_is_still_delivered() -> None:
    async def main() -> None:
        acked: list[int] = []
        a = MqttAdapter(
            ConnectOptions(host="127.0.0.1", port=1, client_id="edgeagent-d1"),
            loop=asyncio.get_running_loop(),
            subscriptions=lambda: [],
            on_message=lambda m: None,
            on_connected=lambda sp: None,
            on_disconnected=lambda: None,
            on_puback=acked.append,
        )
        a.puback_may_wait = lambda: True
        a._connected.set()  # as after a CONNACK (paho queues the publish: no socket here)
        mid = a.publish("edgeagent/d1/results/t", b"{}")
        assert mid is not None
        await asyncio.sleep(10 * PUBACK_LINGER_S)  # the broker is slow to acknowledge
        assert acked == []
        ok = ReasonCode(PacketTypes.PUBACK, identifier=0)  # type: ignore[no-untyped-call]
        t = threading.Thread(target=a._on_publish, args=(a._client, None, mid, ok, None))
        t.start()  # paho's network thread
        t.join()
        for _ in range(20):
            await asyncio.sleep(PUBACK_LINGER_S)
            if acked:
                break
        assert acked == [mid]
        await asyncio.sleep(10 * PUBACK_LINGER_S)
        assert a._sweep is None  # nothing outstanding: the sweeps stop

    asyncio.run(main())
