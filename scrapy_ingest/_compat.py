"""Differences between the Scrapy versions we support (2.13 and later), and every private name
of Scrapy, Twisted, scrapy-redis, prometheus_client and scrapyd the package uses, each with the
versions it holds for; tests/test_compat.py checks them against the installed versions, and
tests/test_private_names.py that no other module uses one."""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import sys
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar

import scrapy
from scrapy.downloadermiddlewares.retry import get_retry_request
from scrapy.utils.conf import build_component_list
from scrapy.utils.defer import deferred_from_coro, maybe_deferred_to_future
from scrapy.utils.misc import load_object
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from scrapy import Request, Spider
    from scrapy.crawler import Crawler
    from scrapy.pipelines import ItemPipelineManager
    from scrapy.settings import BaseSettings
    from scrapy.statscollectors import StatsCollector

_P = ParamSpec("_P")
_T = TypeVar("_T")


async def close_spider(crawler: Crawler, reason: str) -> None:
    """Close the crawler's spider with *reason*."""
    engine = crawler.engine
    assert engine is not None
    if hasattr(engine, "close_spider_async"):  # Scrapy 2.14+
        await engine.close_spider_async(reason=reason)
    else:
        assert crawler.spider is not None
        await maybe_deferred_to_future(engine.close_spider(crawler.spider, reason))


def _scrapy_version() -> tuple[int, int]:
    major, minor = scrapy.__version__.split(".")[:2]
    return int(major), int(minor)


#: Scrapy 2.13 awaits a Deferred, but not a coroutine, returned by a pipeline's
#: open_spider() and close_spider(); 2.14 and later await coroutines and warn
#: about Deferreds.
PIPELINE_HOOKS_RETURN_DEFERREDS = _scrapy_version() < (2, 14)


def pipeline_hook(method: Callable[_P, Coroutine[Any, Any, None]]) -> Callable[_P, Any]:
    """Make an ``async def`` open_spider/close_spider of a pipeline work on every Scrapy."""
    if not PIPELINE_HOOKS_RETURN_DEFERREDS:
        return method

    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> Any:
        return deferred_from_coro(method(*args, **kwargs))

    return wrapper


#: Scrapy 2.14 added ItemPipelineManager.process_item_async(item), which its scraper calls
#: instead of process_item(item, spider), which returns a Deferred (2.13)
ITEM_PROCESSOR_IS_ASYNC = _scrapy_version() >= (2, 14)


#: Scrapy 2.17 added RETRY_GIVE_UP_LOG_LEVEL, and get_retry_request()'s give_up_log_level
#: argument; 2.13 to 2.16 log a give-up as an error
GIVE_UP_LOG_LEVEL = "give_up_log_level" in inspect.signature(get_retry_request).parameters


def _scrapy_exceptions(*names: str) -> tuple[type[Exception], ...]:
    import scrapy.exceptions

    return tuple(
        getattr(scrapy.exceptions, name) for name in names if hasattr(scrapy.exceptions, name)
    )


#: Scrapy 2.19 raises exceptions of its own for failed downloads (DownloadConnectionRefusedError
#: and others) where 2.13 to 2.18 let Twisted's through
DOWNLOAD_CONNECTION_ERRORS = _scrapy_exceptions(
    "DownloadConnectionRefusedError",
    "DownloadFailedError",
    "CannotResolveHostError",
)


def _download_timeouts() -> tuple[type[Exception], ...]:
    from twisted.internet.error import TimeoutError as UserTimeoutError

    return (UserTimeoutError, *_scrapy_exceptions("DownloadTimeoutError"))


#: what DOWNLOAD_TIMEOUT raises: Twisted's TimeoutError (2.13 to 2.18), DownloadTimeoutError (2.19)
DOWNLOAD_TIMEOUTS = _download_timeouts()


def enabled_components(settings: BaseSettings, name: str) -> list[Any]:
    """The components a component priority dict setting (``DOWNLOADER_MIDDLEWARES``...) enables,
    in order, loaded. Scrapy 2.14+ merges the class and import-path keys of one component;
    2.13 does not, so there ``{RetryMiddleware: None}`` leaves the base's path key enabled."""
    with_base = getattr(settings, "get_component_priority_dict_with_base", None)
    components = with_base(name) if with_base is not None else settings.getwithbase(name)
    return [
        load_object(component) if isinstance(component, str) else component
        for component in build_component_list(components)
    ]


def requests_in_progress(crawler: Crawler) -> set[Any] | None:
    """The requests the engine has taken from the scheduler and not finished (downloaded, the
    callback or errback run, the items through the pipelines), or None when it has none open.

    Scrapy keeps them in its engine slot's ``inprogress`` set (2.13 to 2.19 at least) and has no
    public API or signal for "this request is done".
    """
    in_progress = getattr(_engine_slot(crawler), "inprogress", None)
    return in_progress if isinstance(in_progress, set) else None


def wake_engine(crawler: Crawler) -> None:
    """Make the engine ask the scheduler for requests now, rather than at its next heartbeat.

    The engine asks when one of its own downloads ends, or every 5 seconds; a worker whose
    requests are all done while the shared queue was empty would otherwise wait that long for
    the requests other workers push. Scrapy has no public API for it: the engine slot's
    ``nextcall`` (2.13 to 2.19 at least) is what it calls itself.
    """
    nextcall = getattr(_engine_slot(crawler), "nextcall", None)
    if nextcall is not None:
        nextcall.schedule()


def _engine_slot(crawler: Crawler) -> Any:
    """The engine's private slot (``inprogress``, ``nextcall``), or None while it has none."""
    return getattr(getattr(crawler, "engine", None), "_slot", None)


def drop_last_process_item(manager: ItemPipelineManager) -> bool:
    """Take the last pipeline's ``process_item`` out of the chain that *manager* (Scrapy's item
    pipeline manager, or a subclass) runs for each item; return whether the chain still has
    any.

    Scrapy has no public API for it: the chain is ``MiddlewareManager.methods["process_item"]``
    (2.13 to 2.19), a deque of the pipelines' ``process_item`` in order, wrapped on 2.13.
    """
    chain = manager.methods["process_item"]
    chain.pop()
    return bool(chain)


def time_downloads(
    crawler: Crawler,
    started: Callable[[Request], _T],
    ended: Callable[[Request, _T, bool], None],
) -> bool:
    """Call ``started(request)`` when the downloader hands a request to its download handler
    (after its wait in the per-domain queue), and ``ended(request, what started returned,
    failed)`` when the handler is done with it; return False on a Scrapy whose downloader this
    does not know (nothing is called then).

    Scrapy sends no signal at that moment (``request_reached_downloader`` comes before the
    queue). So the crawler's own download handlers object (``engine.downloader.handlers``,
    one per crawler, nothing global) gets the method the downloader calls replaced on the
    instance: ``download_request_async(request)``, a coroutine (2.14 to 2.19), or
    ``download_request(request, spider)``, which returns a Deferred (2.13).
    """
    engine = crawler.engine
    handlers = getattr(getattr(engine, "downloader", None), "handlers", None)
    original_async = getattr(handlers, "download_request_async", None)
    if original_async is not None and inspect.iscoroutinefunction(original_async):

        async def download_request_async(request: Request, *args: Any, **kwargs: Any) -> Any:
            token = started(request)
            try:
                response = await original_async(request, *args, **kwargs)
            except BaseException:
                ended(request, token, True)
                raise
            ended(request, token, False)
            return response

        handlers.download_request_async = download_request_async  # type: ignore[union-attr]
        return True
    original = getattr(handlers, "download_request", None)
    if original is not None:

        def download_request(request: Request, *args: Any, **kwargs: Any) -> Any:
            token = started(request)

            def done(result: Any) -> Any:
                ended(request, token, isinstance(result, Failure))
                return result

            return original(request, *args, **kwargs).addBoth(done)

        handlers.download_request = download_request  # type: ignore[union-attr]
        return True
    return False


def replace_stats_method(collector: StatsCollector, name: str, method: Callable[..., Any]) -> None:
    """Make *method* the *name* method (``set_value``, ``inc_value``...) of this one stats
    collector object.

    Scrapy 2.19's ``StatsCollector.__getattribute__`` (not 2.13's) wraps those methods, to
    warn about their ``spider`` argument, and keeps each wrapper as the instance attribute
    ``_cached_<name>``, which it returns before the method itself: a wrapper cached already
    must be replaced too.
    """
    setattr(collector, name, method)
    cached = f"_cached_{name}"
    if cached in vars(collector):
        setattr(collector, cached, method)


def encode_queued_request(queue: Any, request: Request) -> bytes | str:
    """*request* encoded as the scrapy-redis *queue* stores it (bytes, or str with a JSON
    serializer), by the queue's own ``_encode_request`` (scrapy-redis 0.7 to 0.9.1), which a
    queue class may override: scrapy-redis has no public API for it."""
    data: bytes | str = queue._encode_request(request)
    return data


def decode_queued_request(queue: Any, data: bytes | str) -> Request:
    """The request that the scrapy-redis *queue* stored as *data*, decoded by the queue's own
    ``_decode_request`` (scrapy-redis 0.7 to 0.9.1): see :func:`encode_queued_request`."""
    request: Request = queue._decode_request(data)
    return request


def scrapyd_job_id(spider: Spider) -> str | None:
    """The job id scrapyd gave this crawl, or None when scrapyd did not start it.

    scrapyd has no documented API for it: it passes the id as the ``_job`` spider argument
    (``-a _job=...``, 1.0 to 1.6), which Scrapy makes a spider attribute; scrapyd 1.3 and
    older also set ``SCRAPY_JOB`` in the environment.
    """
    job = os.environ.get("SCRAPY_JOB") or getattr(spider, "_job", None)
    return str(job) if job else None


def scrapy_command() -> tuple[str, list[str]] | None:
    """The ``scrapy`` command this process runs, and its arguments (``("shell", ["-c",
    "..."])``); None when no ``scrapy`` command line runs it (a script with CrawlerProcess,
    a test, ``scrapy.cmdline.execute(argv)`` given its own list).

    ``scrapy.cmdline.execute()`` takes the command's name out of ``sys.argv`` (the first
    argument that is not an option: ``_pop_command_name`` in Scrapy 2.13 to 2.19), while the
    interpreter's own copy, ``sys.orig_argv``, keeps it: the name is the one argument that
    ``sys.argv`` lost, where the program (``argv[0]``) stands just before the original
    arguments, as itself or as ``-m module``.
    """
    argv, orig = sys.argv, getattr(sys, "orig_argv", None)
    if not argv or not orig:
        return None
    rest = argv[1:]
    start = len(orig) - len(rest) - 1  # where the original arguments began
    if start < 1:
        return None
    program_shown = orig[start - 1] == argv[0] or (start >= 2 and orig[start - 2] == "-m")
    if not program_shown:
        return None
    original = orig[start:]
    at = next((i for i, arg in enumerate(original) if not arg.startswith("-")), None)
    if at is None or original[:at] + original[at + 1 :] != rest:
        return None
    return original[at], rest


def fail_crawl(crawler: Crawler) -> None:
    """Make the process that runs *crawler* exit non-zero, once its spider has closed.

    Scrapy has no public API for it: ``scrapy crawl`` exits with 1 when
    ``CrawlerRunner.bootstrap_failed`` (or ``AsyncCrawlerRunner``'s) is true, which Scrapy sets
    when a crawl ends with ``crawler.spider`` unset (2.13 to 2.19), or, from 2.14, when the
    crawl raised. A component of a crawl that must not count as a success (its database
    refused it) unsets the spider at the end of its ``spider_closed`` handler, after which
    nothing of the crawl asks for it. tests/test_backend_refused.py breaks if that changes.
    """
    crawler.spider = None


async def close_spider_before_start(crawler: Crawler, reason: str) -> None:
    """Close the crawler's spider from an ``engine_started`` handler, before any request.

    Scrapy 2.14 and later return from ``ExecutionEngine.start_async`` when the spider is gone
    after ``engine_started``: the spider is closed at once. Closing it ends with
    ``Crawler.stop()``, which fails (logged as an error) while the engine is not running yet:
    the crawler is marked as no longer crawling first, as ``stop()`` itself would have.

    Scrapy 2.13's ``start()`` goes on whatever happened: it sets ``running``, starts the
    start-request processing (which needs the spider's slot) and waits for a stop. There the
    engine is paused (no request is downloaded while paused), and the spider is closed once
    the engine runs, which stops it the usual way.
    """
    if not ENGINE_RETURNS_WITHOUT_SPIDER:
        engine = crawler.engine
        assert engine is not None
        engine.pause()
        _close_once_running(crawler, reason, tries=1000)
        return
    crawler.crawling = False
    await close_spider(crawler, reason)


#: Scrapy 2.14 and later: ExecutionEngine.start_async() returns when the spider closed during
#: engine_started; 2.13's start() runs (and waits) on
ENGINE_RETURNS_WITHOUT_SPIDER = _scrapy_version() >= (2, 14)


def _close_once_running(crawler: Crawler, reason: str, tries: int) -> None:
    from twisted.internet import reactor

    engine = crawler.engine
    if engine is None or crawler.spider is None:
        return
    if engine.running:
        deferred_from_coro(close_spider(crawler, reason))
    elif tries:
        reactor.callLater(0.001, _close_once_running, crawler, reason, tries - 1)  # type: ignore[arg-type]


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class _DelayedCall:
    """A Twisted DelayedCall whose cancel() may be called after the call, like Scrapy's
    CallLaterResult (2.14+)."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def cancel(self) -> None:
        if self._call.active():
            self._call.cancel()


def call_later(delay: float, func: Callable[..., object], *args: Any) -> Cancellable:
    """Call *func(\\*args)* in *delay* seconds, without blocking.

    Scrapy 2.14 and later: ``scrapy.utils.asyncio.call_later``, the asyncio loop's timer where
    asyncio is available (the asyncio reactor, or no reactor at all), the reactor's otherwise;
    2.13: the reactor's ``callLater``.
    """
    if _scrapy_version() >= (2, 14):
        from scrapy.utils.asyncio import call_later as scrapy_call_later

        return scrapy_call_later(delay, func, *args)
    from twisted.internet import reactor

    return _DelayedCall(reactor.callLater(delay, func, *args))  # type: ignore[arg-type]


# Without a reactor (TWISTED_REACTOR_ENABLED = False, Scrapy 2.15+), Scrapy forbids importing
# twisted.internet.reactor: the crawl runs on an asyncio loop. Deferreds still work (they need
# no reactor); what needs one (calls from other threads, timers, loops, Twisted's thread pool)
# goes through these, which use the reactor when one is installed and the running asyncio loop
# otherwise. With a reactor, nothing changes.


def reactor_installed() -> bool:
    """Whether the crawl runs on a Twisted reactor (else on an asyncio loop without one)."""
    return "twisted.internet.reactor" in sys.modules


def thread_caller() -> Callable[..., Any]:
    """On the crawl's thread: what other threads call to have ``f(*args)`` run on it, the
    reactor's ``callFromThread`` or the running asyncio loop's ``call_soon_threadsafe``."""
    if reactor_installed():
        from twisted.internet import reactor

        return reactor.callFromThread  # type: ignore[no-any-return]
    return asyncio.get_running_loop().call_soon_threadsafe


def asyncio_available() -> bool:
    """Whether coroutines run as asyncio tasks here: on a running asyncio loop (the asyncio
    reactor's, or the loop of a crawl without a reactor), or, before it runs, under the
    asyncio reactor. Scrapy 2.14+ has it as ``is_asyncio_available``; 2.13 decides by the
    reactor alone, as this does before the loop runs."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        if not reactor_installed():
            return False  # nothing runs yet: Deferreds work without a loop
        from twisted.internet import reactor
        from twisted.internet.asyncioreactor import AsyncioSelectorReactor

        return isinstance(reactor, AsyncioSelectorReactor)
    return True


class Looping(Protocol):
    running: bool

    def start(self, interval: float, now: bool = True) -> Deferred[Any]: ...

    def stop(self) -> None: ...


def looping_call(func: Callable[..., Any], *args: Any) -> Looping:
    """A ``LoopingCall`` of ``func(*args)``, or its like on the asyncio loop without a
    reactor."""
    if reactor_installed():
        return LoopingCall(func, *args)
    return _LoopWithoutReactor(func, *args)


class _LoopWithoutReactor:
    """LoopingCall's ``start``/``stop``/``running`` on the running asyncio loop. As with
    LoopingCall, a call that returns a Deferred (or a coroutine) is waited for before the next
    one; the Deferred ``start`` returns fires when the loop stops, or fails with the error that
    stopped it (which is logged too, if nobody handles it)."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self._func = func
        self._args = args
        self.running = False
        self._task: asyncio.Task[None] | None = None
        self._done: Deferred[Any] | None = None

    def start(self, interval: float, now: bool = True) -> Deferred[Any]:
        assert not self.running, "already running"
        self.running = True
        self._done = Deferred()
        self._task = asyncio.get_running_loop().create_task(self._run(interval, now))
        return self._done

    def stop(self) -> None:
        assert self.running, "not running"
        self.running = False
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._finish(self)

    def _finish(self, result: Any) -> None:
        done, self._done = self._done, None
        if done is None:
            return
        if isinstance(result, Failure):
            done.errback(result)
        else:
            done.callback(result)

    async def _run(self, interval: float, now: bool) -> None:
        loop = asyncio.get_running_loop()
        if not now:
            await asyncio.sleep(interval)
        while self.running:
            started = loop.time()
            try:
                result = self._func(*self._args)
                if isinstance(result, Deferred):
                    await result.asFuture(loop)
                elif inspect.isawaitable(result):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception:
                self.running = False
                self._task = None
                self._finish(Failure())  # type: ignore[no-untyped-call]
                return
            await asyncio.sleep(max(0.0, interval - (loop.time() - started)))
