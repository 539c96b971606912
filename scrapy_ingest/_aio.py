"""The add-on's asynchronous core: coroutines, and one future that fits every loop.

Scrapy runs a crawl on the asyncio reactor, on another Twisted reactor, or (2.15 on) on an
asyncio loop without a reactor, and runs coroutines the way the loop can: as asyncio tasks
where asyncio is available, with ``Deferred.fromCoroutine`` under any other reactor (Scrapy's
``deferred_from_coro``). Inside, the add-on's asynchronous work is coroutines and the
:class:`Future` here: a result set once on the crawl's thread, with callbacks that run as it
is set (the buffer budget is released as a batch is answered, not a loop iteration later).
A coroutine that awaits one waits, at that moment, on what its runner can wait on: an
asyncio future, or, under a reactor without asyncio, a Deferred. Deferreds appear nowhere
else, except where Scrapy's or Twisted's API takes one (:func:`as_deferred`).
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from twisted.internet.defer import Deferred

from scrapy_ingest._compat import asyncio_available, reactor_installed, thread_caller

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine, Generator
    from concurrent.futures import Executor
    from concurrent.futures import Future as ThreadFuture

_T = TypeVar("_T")

_PENDING, _DONE, _FAILED = 0, 1, 2


class Future(Generic[_T]):
    """A result or an error, set once on the crawl's thread; awaitable by any number of
    coroutines, whichever loop runs them."""

    __slots__ = ("_callbacks", "_state", "_value")

    def __init__(self) -> None:
        self._state = _PENDING
        self._value: Any = None
        self._callbacks: list[Callable[[Future[_T]], None]] = []

    @classmethod
    def of(cls, value: _T) -> Future[_T]:
        """A future that has *value* already."""
        future: Future[_T] = cls()
        future.set_result(value)
        return future

    def done(self) -> bool:
        return self._state != _PENDING

    def set_result(self, value: _T) -> None:
        self._settle(_DONE, value)

    def set_exception(self, error: BaseException) -> None:
        self._settle(_FAILED, error)

    def _settle(self, state: int, value: Any) -> None:
        if self._state != _PENDING:
            raise RuntimeError("the future is done already")
        self._state, self._value = state, value
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    def result(self) -> _T:
        """The result; raise the error, if it failed (call it once :meth:`done`)."""
        if self._state == _FAILED:
            raise self._value
        if self._state == _PENDING:
            raise RuntimeError("the future is not done yet")
        return self._value  # type: ignore[no-any-return]

    def exception(self) -> BaseException | None:
        """The error, if it failed (call it once :meth:`done`)."""
        return self._value if self._state == _FAILED else None

    def add_done_callback(self, callback: Callable[[Future[_T]], None]) -> None:
        """Call ``callback(self)`` once done (at once if it is)."""
        if self._state == _PENDING:
            self._callbacks.append(callback)
        else:
            callback(self)

    def __await__(self) -> Generator[Any, Any, _T]:
        if self._state == _PENDING:
            yield from _waiter(self)
        return self.result()


def _waiter(future: Future[Any]) -> Generator[Any, Any, None]:
    """Wait for *future* the way the running coroutine's runner waits."""
    if asyncio_available():
        waiter = asyncio.get_running_loop().create_future()

        def wake(_: Future[Any]) -> None:
            if not waiter.done():  # else its task was cancelled
                waiter.set_result(None)

        future.add_done_callback(wake)
        yield from waiter
    else:
        deferred: Deferred[None] = Deferred()
        future.add_done_callback(lambda _: deferred.callback(None))
        yield from deferred


class Event(Future[None]):
    """Happens once, with or without an error; waiting returns once it has (at once after),
    raising that error."""

    __slots__ = ()

    @property
    def happened(self) -> bool:
        return self.done()

    @property
    def error(self) -> BaseException | None:
        return self.exception()

    def fire(self, error: BaseException | None = None) -> None:
        """Wake every waiter (the first call only); with *error*, each raises it."""
        if self.done():
            return
        if error is None:
            self.set_result(None)
        else:
            self.set_exception(error)

    async def wait(self) -> None:
        await self


def call(fn: Callable[..., Future[_T]], *args: Any) -> Future[_T]:
    """``fn(*args)``; an error it raises at once comes as the future's error."""
    try:
        return fn(*args)
    except Exception as exc:
        failed: Future[_T] = Future()
        failed.set_exception(exc)
        return failed


def in_thread(fn: Callable[..., _T], *args: Any, executor: Executor | None = None) -> Future[_T]:
    """Run ``fn(*args)`` in *executor*, or else in the loop's thread pool (the reactor's, or
    asyncio's default executor without a reactor); the future is set on the crawl's thread.
    Call it on that thread."""
    future: Future[_T] = Future()
    if executor is None and reactor_installed():
        from twisted.internet.threads import deferToThread

        deferToThread(fn, *args).addCallbacks(
            future.set_result, lambda failure: future.set_exception(failure.value)
        )
        return future
    if executor is None:
        running = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        _running.add(running)
        running.add_done_callback(partial(_from_thread, future))
        return future
    call_from_thread = thread_caller()
    executor.submit(fn, *args).add_done_callback(
        lambda done: call_from_thread(_from_thread, future, done)
    )
    return future


def _from_thread(future: Future[_T], done: ThreadFuture[_T] | asyncio.Future[_T]) -> None:
    _running.discard(done)
    error = done.exception()
    if error is None:
        future.set_result(done.result())
    else:
        future.set_exception(error)


#: coroutines started by spawn() and not ended yet: asyncio keeps only weak references to
#: its tasks
_running: set[Any] = set()


def spawn(coro: Coroutine[Any, Any, _T]) -> Future[_T]:
    """Run *coro* on the crawl's loop from now on, as Scrapy runs coroutines there; its
    outcome comes as the returned future's."""
    future: Future[_T] = Future()
    if asyncio_available():
        task = asyncio.ensure_future(coro)
        _running.add(task)

        def done(task: asyncio.Future[_T]) -> None:
            _running.discard(task)
            if task.cancelled():
                future.set_exception(asyncio.CancelledError())
            elif (error := task.exception()) is not None:
                future.set_exception(error)
            else:
                future.set_result(task.result())

        task.add_done_callback(done)
    else:
        deferred = Deferred.fromCoroutine(coro)
        _running.add(deferred)

        def succeeded(result: _T) -> None:
            _running.discard(deferred)
            future.set_result(result)

        def failed(failure: Any) -> None:
            _running.discard(deferred)
            future.set_exception(failure.value)

        deferred.addCallbacks(succeeded, failed)
    return future


async def settle(awaitables: list[Awaitable[Any]]) -> BaseException | None:
    """Wait for each of *awaitables* (started already) to end; return the first one's error,
    if any."""
    first: BaseException | None = None
    for awaitable in awaitables:
        try:
            await awaitable
        except BaseException as exc:
            first = first or exc
    return first


def as_deferred(awaitable: Awaitable[_T]) -> Deferred[_T]:
    """A Deferred of *awaitable*'s outcome, for an API that takes one (a ``LoopingCall``'s
    function, a signal handler on Scrapy 2.13)."""
    from scrapy.utils.defer import deferred_from_coro

    async def outcome() -> _T:
        return await awaitable

    return deferred_from_coro(outcome())
