"""The event bus: filters, and a slow subscriber never holds up the engine."""

from __future__ import annotations

import asyncio

import pytest

from dispoold.events import EventBus, SubscriberOverflow

pytestmark = pytest.mark.asyncio


async def test_subscribers_get_the_events_they_asked_for() -> None:
    bus = EventBus()
    everything = bus.subscribe()
    used_only = bus.subscribe(["used"])
    bus.publish("requested", {"name": "disp1"})
    bus.publish("used", {"name": "disp1"})
    everything.close()
    used_only.close()
    assert [e.name async for e in everything] == ["requested", "used"]
    assert [e.data async for e in used_only] == [{"name": "disp1"}]


async def test_unknown_event_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown events: nope"):
        EventBus().subscribe(["used", "nope"])


async def test_a_subscriber_that_stops_reading_is_cut_off() -> None:
    bus = EventBus(queue_size=3)
    slow = bus.subscribe()
    for i in range(10):
        bus.publish("used", {"i": i})  # never blocks
    received = []
    with pytest.raises(SubscriberOverflow):
        async for event in slow:
            received.append(event.data["i"])
    assert received == [0, 1, 2]


async def test_close_wakes_a_waiting_reader() -> None:
    bus = EventBus()
    subscription = bus.subscribe()

    async def read() -> list[str]:
        return [e.name async for e in subscription]

    reader = asyncio.create_task(read())
    await asyncio.sleep(0)
    subscription.close()
    assert await asyncio.wait_for(reader, 1) == []
