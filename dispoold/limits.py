"""The limits that decide how many preloads a template gets: the configured maxima and
threshold, and the operator's run-time overrides of them (``set_max``, ``set_threshold``).

Overrides are kept in the journal and survive restarts; the configuration file stays the
baseline, and dropping an override (setting it to nil) brings the file's value back.
The rules are Qubes' (``preload-dispvm-max``, ``preload-dispvm-threshold``): the global
maximum applies to the default disposable template only, and wins whenever it is set,
even to 0.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable

from dispoold.config import Config
from dispoold.errors import BadRequest
from dispoold.journal import Journal

#: The largest maximum anyone may set (the protocol refuses more, too).
MAX_PRELOAD = 1000

GLOBAL_MAX = "max"
THRESHOLD = "threshold"
TEMPLATE_MAX_PREFIX = "max:"


class Limits:
    def __init__(self, config: Config, journal: Journal) -> None:
        self._config = config
        self._journal = journal
        self._overrides: dict[str, int] = {}

    def load(self) -> None:
        """Read the overrides the journal holds for the configured templates."""
        keys = [
            GLOBAL_MAX,
            THRESHOLD,
            *(TEMPLATE_MAX_PREFIX + name for name in self._config.templates),
        ]
        self._overrides = {
            key: value for key in keys if (value := self._journal.get_setting(key)) is not None
        }

    def reconfigure(self, config: Config) -> None:
        self._config = config
        self.load()

    def maximum(self, template: str) -> int:
        """How many preloads ``template`` should have: 0 for what is not a disposable
        template; the global maximum for the default one when it is set; else the
        template's own (run-time override first)."""
        settings = self._config.templates.get(template)
        if settings is None or not settings.dispvm_template:
            return 0
        if template == self._config.pool.default_dispvm:
            global_max = self._overrides.get(GLOBAL_MAX, self._config.pool.max)
            if global_max is not None:
                return global_max
        return self._overrides.get(TEMPLATE_MAX_PREFIX + template, settings.preload_max)

    def threshold_mib(self) -> int:
        """Free memory (MiB) that preloading must never use."""
        return self._overrides.get(THRESHOLD, self._config.pool.threshold_mib or 0)

    def set_max(self, template: str | None, value: int | None) -> None:
        """Override (or, with None, drop the override of) a template's maximum, or the
        global one when ``template`` is None. Raises :class:`BadRequest`."""
        if value is not None and not (0 <= value <= MAX_PRELOAD):
            raise BadRequest(f"max must be between 0 and {MAX_PRELOAD}")
        self._set(GLOBAL_MAX if template is None else TEMPLATE_MAX_PREFIX + template, value)

    def set_threshold(self, mib: int | None) -> None:
        """Override (or drop the override of) the threshold. Raises :class:`BadRequest`."""
        if mib is not None and mib < 0:
            raise BadRequest("the threshold must not be negative")
        self._set(THRESHOLD, mib)

    def _set(self, key: str, value: int | None) -> None:
        self._journal.set_setting(key, value)
        if value is None:
            self._overrides.pop(key, None)
        else:
            self._overrides[key] = value


class StartSlots:
    """At most ``capacity`` preloads starting (created and booting) at once.

    One template may take them all only while it is the only one that wants preloads;
    otherwise it holds at most ``capacity - 1``, so that a template whose guests never
    become ready cannot hold up another's refill for a whole startup timeout (seen on
    real Xen: 68 s instead of about 11).
    """

    def __init__(self, capacity: int, templates_wanting: Callable[[], int]) -> None:
        self.capacity = capacity
        self._templates_wanting = templates_wanting
        self._held: collections.Counter[str] = collections.Counter()
        self._changed = asyncio.Condition()

    def held(self, template: str) -> int:
        return self._held[template]

    def _cap(self) -> int:
        if self.capacity == 1 or self._templates_wanting() <= 1:
            return self.capacity
        return self.capacity - 1

    def _free_for(self, template: str) -> bool:
        return sum(self._held.values()) < self.capacity and self._held[template] < self._cap()

    @contextlib.asynccontextmanager
    async def taken(self, template: str) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: self._free_for(template))
            self._held[template] += 1
        try:
            yield
        finally:
            self._held[template] -= 1
            async with self._changed:
                self._changed.notify_all()

    async def wake(self) -> None:
        """Look again (the number of templates that want preloads changed)."""
        async with self._changed:
            self._changed.notify_all()
