"""Lifecycle events, published by the engine and streamed to subscribers.

Publishing never blocks and never fails: a subscriber that stops reading is cut off
(:class:`SubscriberOverflow`) rather than allowed to hold up the engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

#: Every event the engine publishes; ``subscribe`` filters by these names.
EVENT_NAMES = frozenset(
    {
        "preload-started",
        "preload-ready",
        "preload-failed",
        "requested",
        "used",
        "tainted",
        "removed",
        "refreshed",
        "gap",
        "savefile-preparing",
        "savefile-ready",
        "savefile-failed",
        "savefile-discarded",
    }
)


class SubscriberOverflow(Exception):
    """The subscriber fell too far behind; its stream has ended."""


@dataclass(frozen=True, slots=True)
class PoolEvent:
    name: str
    data: dict[str, Any]
    time: float = field(default_factory=time.time)


class Subscription:
    """One subscriber's queue of events; iterate it to receive them."""

    def __init__(self, bus: EventBus, names: frozenset[str] | None, maxsize: int) -> None:
        self._bus = bus
        self.names = names
        self._queue: asyncio.Queue[PoolEvent | None] = asyncio.Queue(maxsize)
        self.overflowed = False

    def offer(self, event: PoolEvent) -> None:
        if self.overflowed or (self.names is not None and event.name not in self.names):
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
            self._bus.unsubscribe(self)

    def close(self) -> None:
        self._bus.unsubscribe(self)
        # A None wakes a reader blocked on an empty queue; a full queue is drained anyway.
        if not self._queue.full():
            self._queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[PoolEvent]:
        while True:
            if self.overflowed and self._queue.empty():
                raise SubscriberOverflow("too many events not read; subscribe again")
            event = await self._queue.get()
            if event is None:
                return
            yield event


class EventBus:
    def __init__(self, *, queue_size: int = 1024) -> None:
        self._subscribers: set[Subscription] = set()
        self._queue_size = queue_size

    def publish(self, name: str, data: dict[str, Any]) -> PoolEvent:
        if name not in EVENT_NAMES:
            raise ValueError(f"unknown event {name!r}")
        event = PoolEvent(name, data)
        for subscriber in list(self._subscribers):
            subscriber.offer(event)
        return event

    def subscribe(self, names: Iterable[str] | None = None) -> Subscription:
        """Start receiving events (all of them, or only ``names``).

        Raises ValueError naming an unknown event.
        """
        wanted = None if names is None else frozenset(names)
        if wanted is not None and (unknown := wanted - EVENT_NAMES):
            raise ValueError(f"unknown events: {', '.join(sorted(unknown))}")
        subscription = Subscription(self, wanted, self._queue_size)
        self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)
