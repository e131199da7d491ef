"""A fresh start: a new domain created and booted for the request that waits for it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from dispoold.origins import Workshop
from dispoold.views import OriginName

if TYPE_CHECKING:
    from dispoold.books import Disposable


class FreshStart:
    name: OriginName = "fresh"
    last_resort = True
    repeat = False

    def __init__(self, pool: Workshop) -> None:
        self._pool = pool

    def claim(self, templates: Sequence[str]) -> Disposable:
        """A new disposable of the first of ``templates``, requested before it exists;
        its bring-up (create, boot) starts at once. Raises
        :class:`~dispoold.errors.DispidsExhausted`."""
        return self._pool.start_for_request(templates[0], self.name)

    def patience(self) -> None:
        return None
