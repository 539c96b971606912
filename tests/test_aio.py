"""The asynchronous core (scrapy_ingest._aio) under each way Scrapy runs a crawl: the asyncio
reactor, a plain Twisted reactor, and an asyncio loop without a reactor.

Each runs one script in an interpreter of its own (a reactor is installed once per process):
coroutines started as Scrapy starts them (``deferred_from_coro``) await futures set later from
the loop, from a thread, and with an error; an Event; coroutines started by ``spawn``; a
``LoopingCall``-style API given ``as_deferred``.
"""

from __future__ import annotations

import textwrap

import pytest
from _helpers import REPO_DIR, last_json, run_python

from scrapy_ingest._aio import Event, Future, call
from scrapy_ingest._compat import _scrapy_version

_BODY = textwrap.dedent(
    """
    import asyncio, json, sys, threading

    from scrapy.utils.defer import deferred_from_coro

    from scrapy_ingest._aio import Event, Future, as_deferred, in_thread, settle, spawn
    from scrapy_ingest._compat import asyncio_available, call_later


    async def fails():
        await later_value(None)
        raise ValueError("bad")


    def later_value(value):
        future = Future()
        call_later(0.01, future.set_result, value)
        return future


    async def main():
        seen = {"asyncio": asyncio_available()}
        seen["later"] = await later_value(1)
        set_in_thread = Future()
        threading.Thread(target=lambda: call_from_thread(set_in_thread.set_result, 2)).start()
        seen["from_thread"] = await set_in_thread
        seen["in_thread"] = await in_thread(lambda: threading.current_thread().name != "MainThread")
        event = Event()
        waiters = [spawn(event.wait()) for _ in range(3)]
        call_later(0.01, event.fire)
        seen["event"] = await settle(waiters) is None and event.happened
        failed = spawn(fails())
        try:
            await failed
        except ValueError as exc:
            seen["error"] = str(exc)
        seen["settle"] = type(await settle([spawn(fails()), later_value(3)])).__name__
        # a Deferred where Twisted's API takes one, waited on as Scrapy waits
        seen["as_deferred"] = await wait_deferred(as_deferred(later_value(4)))
        return seen
    """
)

_ASYNCIO_REACTOR = textwrap.dedent(
    """
    from scrapy.utils.reactor import install_reactor
    install_reactor("twisted.internet.asyncioreactor.AsyncioSelectorReactor")
    from twisted.internet import defer, task, reactor
    from scrapy.utils.defer import maybe_deferred_to_future as wait_deferred
    call_from_thread = reactor.callFromThread
    """
)

_PLAIN_REACTOR = textwrap.dedent(
    """
    from twisted.internet import defer, task, reactor
    from scrapy.utils.defer import maybe_deferred_to_future as wait_deferred
    call_from_thread = reactor.callFromThread
    """
)

_REACTOR_RUN = textwrap.dedent(
    """
    def run(reactor):
        return deferred_from_coro(main()).addCallback(lambda seen: print(json.dumps(seen)))

    task.react(run)
    """
)

_NO_REACTOR = textwrap.dedent(
    """
    async def wait_deferred(deferred):
        return await deferred.asFuture(asyncio.get_running_loop())

    async def start():
        global call_from_thread
        call_from_thread = asyncio.get_running_loop().call_soon_threadsafe
        print(json.dumps(await main()))

    asyncio.run(start())
    assert "twisted.internet.reactor" not in sys.modules
    """
)

EXPECTED = {
    "later": 1,
    "from_thread": 2,
    "in_thread": True,
    "event": True,
    "error": "bad",
    "settle": "ValueError",
    "as_deferred": 4,
}


@pytest.mark.parametrize(
    ("loop", "script", "asyncio_tasks"),
    [
        ("asyncio reactor", _ASYNCIO_REACTOR + _BODY + _REACTOR_RUN, True),
        ("plain reactor", _PLAIN_REACTOR + _BODY + _REACTOR_RUN, False),
        pytest.param(
            "no reactor",
            _BODY + _NO_REACTOR,
            True,
            marks=pytest.mark.skipif(
                _scrapy_version() < (2, 15), reason="Scrapy runs without a reactor from 2.15 on"
            ),
        ),
    ],
)
def test_coroutines_await_the_cores_futures_on_every_loop(
    loop: str, script: str, asyncio_tasks: bool
) -> None:
    seen = last_json(run_python(script, cwd=REPO_DIR))
    assert seen == {"asyncio": asyncio_tasks, **EXPECTED}, loop


def test_callbacks_run_as_the_future_is_set_and_once_it_is() -> None:
    calls: list[str] = []
    future: Future[int] = Future()
    future.add_done_callback(lambda f: calls.append(f"first {f.result()}"))
    assert not future.done() and calls == []
    future.set_result(7)
    assert calls == ["first 7"]  # before set_result returned: no loop iteration in between
    future.add_done_callback(lambda f: calls.append("after"))
    assert calls == ["first 7", "after"]
    with pytest.raises(RuntimeError):
        future.set_result(8)


def test_an_error_raised_at_once_comes_as_the_futures_error() -> None:
    def refuses() -> Future[None]:
        raise OSError("no room in /dev/shm")

    failed = call(refuses)
    assert isinstance(failed.exception(), OSError)
    with pytest.raises(OSError, match="no room"):
        failed.result()


def test_an_event_keeps_its_first_outcome() -> None:
    event = Event()
    event.fire(ValueError("first"))
    event.fire()
    assert event.happened and isinstance(event.error, ValueError)
