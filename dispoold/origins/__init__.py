"""Where a disposable comes from: the ways the engine can answer a request.

A request never says how its disposable is made. The engine asks its origins in order,
fastest first (:data:`dispoold.pool.Pool.origins`), and the first that can claim one for
the request's templates provides it:

- :class:`~dispoold.origins.preload.Preloads`: a preload from the pool, paused and ready
  (or still booting: the request then waits for it, within limits);
- :class:`~dispoold.origins.restore.Restores`: a new domain restored from the template's
  savefile, when it has a ready one (:mod:`dispoold.savefile`);
- :class:`~dispoold.origins.fresh.FreshStart`: a new domain created and booted for this
  request; it can always claim, so it comes last.

A claim happens without an ``await`` between choosing a disposable and marking it
``requested``, so two requests never get the same one. The request then waits for the
claimed disposable's bring-up; if it cannot be handed over, the request asks the origin
again (another preload), and when the origin is the last resort, it fails.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

from dispoold.config import Config
from dispoold.views import OriginName

if TYPE_CHECKING:
    from dispoold.books import Disposable
    from dispoold.origins.restore import Keeper


class Workshop(Protocol):
    """What the origins use of the engine (:class:`dispoold.pool.Pool` is one)."""

    @property
    def config(self) -> Config: ...

    @property
    def books(self) -> Iterable[Disposable]: ...

    @property
    def keeper(self) -> Keeper: ...

    def is_current(self, d: Disposable) -> bool:
        """``d`` was made from its template as it is now."""

    def fingerprint_of(self, template: str) -> str | None: ...

    def notice_changes(self, templates: Sequence[str]) -> None:
        """Outdate at once the preloads of templates whose files changed (no await)."""

    def take(self, d: Disposable) -> None:
        """A request takes ``d`` from the pool; no await."""

    def start_for_request(self, template: str, origin: OriginName) -> Disposable:
        """A new disposable, requested before it exists, with its bring-up started."""


class Origin(Protocol):
    #: How the protocol names disposables from here (``origin`` in replies and status).
    name: OriginName
    #: True when a disposable this origin claimed cannot be handed over: the request
    #: fails, rather than asking the next origin.
    last_resort: bool
    #: True when, after a claimed disposable could not be handed over, the request asks
    #: this origin again (another preload); else it moves on to the next origin.
    repeat: bool

    def claim(self, templates: Sequence[str]) -> Disposable | None:
        """A disposable of one of ``templates`` for a request, now ``requested``; None
        when this origin has none. Never awaits."""

    def patience(self) -> float | None:
        """How long a request waits, at most, for a claimed disposable that is not ready
        yet before asking again; None: for as long as the request's own timeout."""
