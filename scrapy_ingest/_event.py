"""Something that happens once, which any number of coroutines wait for."""

from __future__ import annotations

from scrapy.utils.defer import maybe_deferred_to_future
from twisted.internet.defer import Deferred


class Event:
    """Happens once, with or without an error; :meth:`wait` returns once it has (at once
    after), raising that error. Works with or without the asyncio reactor, as Scrapy's own
    ``maybe_deferred_to_future`` does."""

    def __init__(self) -> None:
        self._waiters: list[Deferred[None]] | None = []
        self.error: BaseException | None = None

    @property
    def happened(self) -> bool:
        """Whether :meth:`fire` was called."""
        return self._waiters is None

    def fire(self, error: BaseException | None = None) -> None:
        """Wake every waiter (the first call only); with *error*, each raises it."""
        if self._waiters is None:
            return
        waiters, self._waiters, self.error = self._waiters, None, error
        for waiter in waiters:
            waiter.callback(None)

    async def wait(self) -> None:
        """Return once the event has happened; raise its error, if any."""
        if self._waiters is not None:
            waiter: Deferred[None] = Deferred()
            self._waiters.append(waiter)
            await maybe_deferred_to_future(waiter)
        if self.error is not None:
            raise self.error
