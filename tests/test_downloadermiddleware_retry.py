"""BackoffRetryMiddleware: Scrapy's retries, after a per-domain backoff or ``Retry-After``.

Unit tests build the middleware with ``get_crawler`` and drive it with a fake clock and a fake
random draw; crawl tests run ``_retry_crawl.py`` in a subprocess against the local site, on two
"domains" of it (``127.0.0.1`` and ``localhost``), and judge by the site's arrival times, the
crawl's log and the CPU time the crawl process spent.
"""

from __future__ import annotations

import email.utils
import inspect
import itertools
import json
import os
import secrets
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import pytest
from scrapy import Request
from scrapy.core.downloader.middleware import DownloaderMiddlewareManager
from scrapy.downloadermiddlewares.retry import RetryMiddleware
from scrapy.exceptions import NotConfigured
from scrapy.http import Response
from scrapy.utils.misc import build_from_crawler, load_object
from scrapy.utils.test import get_crawler
from twisted.internet.error import ConnectionRefusedError as TxConnectionRefusedError

from scrapy_ingest import BackoffRetryMiddleware, IngestAddon
from scrapy_ingest.downloadermiddlewares import retry as retry_module
from scrapy_ingest.downloadermiddlewares.retry import parse_retry_after
from scrapy_ingest.exceptions import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

    from scrapy.crawler import Crawler
    from services import LocalSite, Visit

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)
SCRIPT = os.path.join(TESTS_DIR, "_retry_crawl.py")
#: the meta key DelayedRequests(crawler, "retry") keeps the end of a request's wait in
NOT_BEFORE = "_ingest_retry_not_before"
SCRAPY_RETRY = "scrapy.downloadermiddlewares.retry.RetryMiddleware"
ASYNCIO_REACTOR = "twisted.internet.asyncioreactor.AsyncioSelectorReactor"
SELECT_REACTOR = "twisted.internet.selectreactor.SelectReactor"


# --------------------------------------------------------------------------------------------
# unit tests: a fake clock and a fake random draw
# --------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_700_000_000.0 + self.now


class FakeRandom:
    """``uniform(a, b)`` returns b (or a with ``low``), and records its arguments."""

    def __init__(self) -> None:
        self.low = False
        self.calls: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.calls.append((a, b))
        return a if self.low else b


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(retry_module, "time", fake)
    return fake


@pytest.fixture
def draw(monkeypatch: pytest.MonkeyPatch) -> FakeRandom:
    fake = FakeRandom()
    monkeypatch.setattr(retry_module, "random", fake)
    return fake


def _crawler(**settings: Any) -> Crawler:
    crawler = get_crawler(settings_dict=settings)
    crawler.spider = crawler._create_spider("retry_test")
    return crawler


def _middleware(**settings: Any) -> tuple[BackoffRetryMiddleware, Crawler]:
    crawler = _crawler(**settings)
    return build_from_crawler(BackoffRetryMiddleware, crawler), crawler


def _response(url: str, status: int, **headers: str) -> tuple[Request, Response]:
    request = Request(url)
    return request, Response(url, status=status, headers=headers, request=request)


def _fail(
    mw: BackoffRetryMiddleware, url: str = "http://a.example/x", status: int = 503, **headers: str
) -> Request:
    request, response = _response(url, status, **headers)
    retry = mw.process_response(request, response)
    assert isinstance(retry, Request), retry
    return retry


def _wait(request: Request, clock: FakeClock) -> float:
    return float(request.meta[NOT_BEFORE]) - clock.now


def test_backoff_doubles_per_failure_round_up_to_the_max(
    clock: FakeClock, draw: FakeRandom
) -> None:
    mw, crawler = _middleware(INGEST_RETRY_BACKOFF_BASE=0.4, INGEST_RETRY_BACKOFF_MAX=2.0)
    waits = []
    for _ in range(5):
        retry = _fail(mw, "http://a.example/x")
        waits.append(_wait(retry, clock))
        clock.now += waits[-1]  # the pause is over: the next failure is a new round
    assert waits == pytest.approx([0.4, 0.8, 1.6, 2.0, 2.0])
    assert [low for low, _ in draw.calls] == [0] * 5
    assert [high for _, high in draw.calls] == pytest.approx([0.4, 0.8, 1.6, 2.0, 2.0])
    assert crawler.stats is not None
    assert crawler.stats.get_value("ingest/retry/delayed") == 5
    assert crawler.stats.get_value("ingest/retry/delay_seconds") == pytest.approx(6.8)


def test_full_jitter_may_retry_at_once(clock: FakeClock, draw: FakeRandom) -> None:
    draw.low = True
    mw, _ = _middleware()
    assert _wait(_fail(mw), clock) == 0


def test_a_failure_while_paused_is_the_same_round(clock: FakeClock, draw: FakeRandom) -> None:
    mw, _ = _middleware(INGEST_RETRY_BACKOFF_BASE=1.0, INGEST_RETRY_BACKOFF_MAX=60.0)
    first = _fail(mw, "http://a.example/1")
    clock.now += 0.5  # a request that was in flight when the pause began fails too
    second = _fail(mw, "http://a.example/2")
    assert draw.calls == [(0, 1.0), (0, 1.0)]  # not a second round: no doubling
    assert first.meta[NOT_BEFORE] == 1001.0
    assert second.meta[NOT_BEFORE] == 1001.5  # max(pause end, now + delay)


def test_a_response_that_is_no_failure_resets_the_streak(
    clock: FakeClock, draw: FakeRandom
) -> None:
    mw, _ = _middleware(INGEST_RETRY_BACKOFF_BASE=1.0)
    clock.now += _wait(_fail(mw), clock)
    clock.now += _wait(_fail(mw), clock)
    assert draw.calls[-1] == (0, 2.0)
    request, response = _response("http://a.example/ok", 200)
    assert mw.process_response(request, response) is response
    clock.now += 10
    _fail(mw)
    assert draw.calls[-1] == (0, 1.0)


def test_a_paused_domain_holds_its_fresh_requests_only(clock: FakeClock, draw: FakeRandom) -> None:
    mw, crawler = _middleware(INGEST_RETRY_BACKOFF_BASE=3.0)
    assert mw.process_request(Request("http://a.example/fresh")) is None  # nothing paused
    _fail(mw, "http://a.example/x")
    held = mw.process_request(Request("http://a.example/fresh"))
    assert isinstance(held, Request)
    assert held.url == "http://a.example/fresh"
    assert held.meta[NOT_BEFORE] == 1003.0
    assert held.dont_filter
    assert mw.process_request(Request("http://b.example/fresh")) is None
    clock.now += 3
    assert mw.process_request(Request("http://a.example/fresh")) is None
    assert crawler.stats is not None
    assert crawler.stats.get_value("ingest/retry/delayed") == 2


def test_a_request_back_without_the_scheduler_waits_in_place(
    clock: FakeClock, draw: FakeRandom
) -> None:
    """engine.download_async() hands a request set aside straight back to the downloader: it
    waits then (a coroutine on a timer), it is not set aside again and again."""
    mw, crawler = _middleware(INGEST_RETRY_BACKOFF_BASE=3.0)
    _fail(mw, "http://a.example/x")
    held = mw.process_request(Request("http://a.example/fresh"))
    assert isinstance(held, Request)
    waiting = mw.process_request(held)
    assert inspect.iscoroutine(waiting), waiting
    waiting.close()
    assert crawler.stats is not None
    assert crawler.stats.get_value("ingest/retry/delayed") == 2  # the retry, the fresh one
    # a new request for the same URL, never set aside before, is set aside (not kept here)
    assert isinstance(mw.process_request(Request("http://a.example/fresh")), Request)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2", 2.0),
        (" 120 ", 120.0),
        ("1.5", 1.5),
        ("0", 0.0),
        ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # in the past
        ("-1", None),
        ("soon", None),
        ("nan", None),
        ("", None),
    ],
)
def test_parse_retry_after(value: str, expected: float | None) -> None:
    now = email.utils.parsedate_to_datetime("Wed, 21 Oct 2015 07:28:00 GMT").timestamp()
    assert parse_retry_after(value, now) == expected


def test_retry_after_replaces_the_backoff_and_is_capped(clock: FakeClock, draw: FakeRandom) -> None:
    mw, crawler = _middleware(INGEST_RETRY_AFTER_MAX=30.0)
    assert _wait(_fail(mw, "http://a.example/1", 429, **{"Retry-After": "7"}), clock) == 7
    assert _wait(_fail(mw, "http://b.example/1", 429, **{"Retry-After": "3600"}), clock) == 30
    date = email.utils.formatdate(clock.time() + 12, usegmt=True)
    assert _wait(_fail(mw, "http://c.example/1", 503, **{"Retry-After": date}), clock) == 12
    assert draw.calls == []
    assert _wait(_fail(mw, "http://d.example/1", 429, **{"Retry-After": "later"}), clock) == 0.5
    assert crawler.stats is not None
    assert crawler.stats.get_value("ingest/retry/retry_after") == 3


def test_meta_keys_are_honoured(clock: FakeClock, draw: FakeRandom) -> None:
    mw, crawler = _middleware(RETRY_TIMES=5)
    request = Request("http://a.example/x", meta={"dont_retry": True})
    response = Response(request.url, status=503, request=request)
    assert mw.process_response(request, response) is response
    assert mw.process_exception(request, TxConnectionRefusedError()) is None
    request = Request("http://a.example/x", meta={"max_retry_times": 0})
    response = Response(request.url, status=503, request=request)
    assert mw.process_response(request, response) is response
    assert crawler.stats is not None
    assert crawler.stats.get_value("retry/max_reached") == 1
    assert crawler.stats.get_value("retry/count") is None
    request = Request("http://a.example/x", priority=3, meta={"priority_adjust": 10})
    retry = mw.process_response(request, Response(request.url, status=503, request=request))
    assert isinstance(retry, Request)
    assert retry.priority == 13
    assert retry.meta["retry_times"] == 1


def test_is_scrapys_retry_middleware_and_honours_its_attributes(
    clock: FakeClock, draw: FakeRandom
) -> None:
    """A subclass of Scrapy's RetryMiddleware: the instance attributes Scrapy's __init__ sets
    decide what is retried, and a project may change them on the instance."""
    mw, crawler = _middleware(RETRY_TIMES=5)
    assert isinstance(mw, RetryMiddleware)
    assert (mw.max_retry_times, mw.priority_adjust) == (5, -1)
    assert 503 in mw.retry_http_codes
    assert crawler.stats is not None
    mw.max_retry_times = 0
    request, response = _response("http://a.example/x", 503)
    assert mw.process_response(request, response) is response
    assert crawler.stats.get_value("retry/max_reached") == 1
    mw.max_retry_times = 5
    mw.retry_http_codes = {418}
    request, response = _response("http://a.example/x", 503)
    assert mw.process_response(request, response) is response
    request, response = _response("http://a.example/teapot", 418)
    assert isinstance(mw.process_response(request, response), Request)
    mw.exceptions_to_retry = (KeyError,)
    assert isinstance(mw.process_exception(request, KeyError("no")), Request)
    assert mw.process_exception(request, TxConnectionRefusedError()) is None
    mw.priority_adjust = -7
    retry = mw.process_response(*_response("http://b.example/teapot", 418))
    assert isinstance(retry, Request)
    assert retry.priority == -7


def test_one_retrying_line_per_retry(
    clock: FakeClock, draw: FakeRandom, caplog: pytest.LogCaptureFixture
) -> None:
    """Scrapy's "Retrying ..." line is the only one per retry; the delay has its own line."""
    mw, _ = _middleware(RETRY_TIMES=1)
    with caplog.at_level("DEBUG"):
        retry = _fail(mw, "http://a.example/x")
        clock.now += _wait(retry, clock)
        mw.process_response(retry, Response(retry.url, status=503, request=retry))
    messages = [record.getMessage() for record in caplog.records]
    assert sum("Retrying" in m for m in messages) == 1, messages
    assert sum(m.startswith("Backing off a.example for ") for m in messages) == 1, messages
    assert sum("Gave up retrying" in m for m in messages) == 1, messages


def test_retry_exceptions_as_classes_or_paths(clock: FakeClock, draw: FakeRandom) -> None:
    mw, _ = _middleware()  # Scrapy's default RETRY_EXCEPTIONS, import paths
    request = Request("http://a.example/x")
    assert isinstance(mw.process_exception(request, TxConnectionRefusedError()), Request)
    assert mw.process_exception(request, KeyError("no")) is None
    mw, _ = _middleware(RETRY_EXCEPTIONS=[KeyError, "builtins.IndexError"])
    assert isinstance(mw.process_exception(request, KeyError("no")), Request)
    assert isinstance(mw.process_exception(request, IndexError("no")), Request)
    assert mw.process_exception(request, TxConnectionRefusedError()) is None


def test_same_retry_stats_as_scrapy(clock: FakeClock, draw: FakeRandom) -> None:
    """The same failures through Scrapy's middleware and ours give the same retry/* stats."""
    settings = {"RETRY_TIMES": 2, "RETRY_HTTP_CODES": [503, 429]}
    crawlers = []
    for cls in (RetryMiddleware, BackoffRetryMiddleware):
        crawler = _crawler(**settings)
        mw = build_from_crawler(cls, crawler)
        # Scrapy 2.13's methods require the spider; 2.14+ warn when given one
        spider = {"spider": crawler.spider} if _requires_spider(mw.process_response) else {}
        for status in (503, 429, 503, 500):
            request = Request(f"http://a.example/{status}")
            while True:
                response = Response(request.url, status=status, request=request)
                result = mw.process_response(request, response, **spider)
                if not isinstance(result, Request):
                    break
                request = result
        refused = Request("http://a.example/refused")
        mw.process_exception(refused, TxConnectionRefusedError(), **spider)
        crawlers.append(crawler)
    scrapy_stats, our_stats = (
        {k: v for k, v in c.stats.get_stats().items() if k.startswith("retry/")}  # type: ignore[union-attr]
        for c in crawlers
    )
    assert scrapy_stats == our_stats
    assert scrapy_stats["retry/count"] == 7
    assert scrapy_stats["retry/max_reached"] == 3


def _requires_spider(method: Any) -> bool:
    parameter = inspect.signature(method).parameters.get("spider")
    return parameter is not None and parameter.default is inspect.Parameter.empty


def test_not_configured_when_retry_is_disabled() -> None:
    with pytest.raises(NotConfigured):
        _middleware(RETRY_ENABLED=False)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"INGEST_RETRY_BACKOFF_BASE": -1},
            "INGEST_RETRY_BACKOFF_BASE (-1) is invalid: it must be a positive number of seconds."
            " Fix: set INGEST_RETRY_BACKOFF_BASE to e.g. 0.5.",
        ),
        (
            {"INGEST_RETRY_BACKOFF_MAX": "soon"},
            "INGEST_RETRY_BACKOFF_MAX ('soon') is invalid: it must be a positive number of "
            "seconds, at least INGEST_RETRY_BACKOFF_BASE. Fix: set INGEST_RETRY_BACKOFF_MAX to "
            "e.g. 60.0.",
        ),
        (
            {"INGEST_RETRY_BACKOFF_BASE": 2.0, "INGEST_RETRY_BACKOFF_MAX": 1.0},
            "INGEST_RETRY_BACKOFF_MAX (1.0) is invalid: it must be a positive number of seconds,"
            " at least INGEST_RETRY_BACKOFF_BASE. Fix: set INGEST_RETRY_BACKOFF_MAX to e.g. 60.0."
            " (INGEST_RETRY_BACKOFF_BASE is 2.0)",
        ),
        (
            {"INGEST_RETRY_AFTER_MAX": -5},
            "INGEST_RETRY_AFTER_MAX (-5) is invalid: it must be a number of seconds, 0 or more."
            " Fix: set INGEST_RETRY_AFTER_MAX to e.g. 300.0.",
        ),
    ],
)
def test_bad_settings_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _middleware(**settings)
    assert str(caught.value) == message


def test_refuses_to_run_next_to_scrapys_retry_middleware() -> None:
    with pytest.raises(ConfigError, match="every failure would be retried by both"):
        _middleware(DOWNLOADER_MIDDLEWARES={BackoffRetryMiddleware: 550, SCRAPY_RETRY: 560})

    class ProjectRetry(RetryMiddleware):
        pass

    with pytest.raises(ConfigError, match="ProjectRetry and BackoffRetryMiddleware"):
        _middleware(
            DOWNLOADER_MIDDLEWARES={
                SCRAPY_RETRY: None,
                BackoffRetryMiddleware: 550,
                ProjectRetry: 560,
            }
        )
    # itself alone, though a subclass of RetryMiddleware, is no second retry middleware
    mw, _ = _middleware(DOWNLOADER_MIDDLEWARES={SCRAPY_RETRY: None, BackoffRetryMiddleware: 550})
    assert isinstance(mw, BackoffRetryMiddleware)


def _enabled_middlewares(**settings: Any) -> list[type]:
    crawler = get_crawler(
        settings_dict={"ADDONS": {IngestAddon: 300}, "INGEST_DATABASE_URL": "sqlite://", **settings}
    )
    # the list Scrapy's downloader builds its middlewares from
    components = DownloaderMiddlewareManager._get_mwlist_from_settings(crawler.settings)
    return [load_object(c) if isinstance(c, str) else c for c in components]


def _order(middlewares: list[type], cls: type) -> int:
    return middlewares.index(cls) if cls in middlewares else -1


def test_addon_places_it_only_when_enabled() -> None:
    enabled = _enabled_middlewares()
    assert BackoffRetryMiddleware not in enabled
    assert RetryMiddleware in enabled
    enabled = _enabled_middlewares(INGEST_RETRY_ENABLED=True)
    assert RetryMiddleware not in enabled
    crawler = get_crawler(
        settings_dict={
            "ADDONS": {IngestAddon: 300},
            "INGEST_DATABASE_URL": "sqlite://",
            "INGEST_RETRY_ENABLED": True,
        }
    )
    placed = {
        (load_object(k) if isinstance(k, str) else k): v
        for k, v in crawler.settings.getdict("DOWNLOADER_MIDDLEWARES").items()
    }
    assert placed[BackoffRetryMiddleware] == 550
    assert placed[RetryMiddleware] is None


def test_addon_leaves_the_projects_placements() -> None:
    # the project disabled ours: Scrapy's keeps retrying
    enabled = _enabled_middlewares(
        INGEST_RETRY_ENABLED=True, DOWNLOADER_MIDDLEWARES={BackoffRetryMiddleware: None}
    )
    assert BackoffRetryMiddleware not in enabled
    assert RetryMiddleware in enabled
    # the project placed ours elsewhere
    enabled = _enabled_middlewares(
        INGEST_RETRY_ENABLED=True,
        DOWNLOADER_MIDDLEWARES={"scrapy_ingest.BackoffRetryMiddleware": 560},
    )
    assert RetryMiddleware not in enabled
    assert BackoffRetryMiddleware in enabled
    # the project placed Scrapy's itself: left alone (and the middleware then says both run)
    enabled = _enabled_middlewares(
        INGEST_RETRY_ENABLED=True, DOWNLOADER_MIDDLEWARES={SCRAPY_RETRY: 600}
    )
    assert RetryMiddleware in enabled
    assert BackoffRetryMiddleware in enabled


# --------------------------------------------------------------------------------------------
# crawl tests: _retry_crawl.py in a subprocess, judged by the site's arrival times
# --------------------------------------------------------------------------------------------


def _crawl(
    tmp_path: Path,
    requests: list[dict[str, Any]],
    instance: dict[str, Any] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    result = tmp_path / f"result-{secrets.token_hex(4)}.json"
    args = {
        "requests": requests,
        "settings": settings,
        "instance": instance or {},
        "result": str(result),
    }
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [REPO_DIR, os.environ.get("PYTHONPATH")])),
        "PYTHONWARNINGS": "",
    }
    env.pop("SCRAPY_SETTINGS_MODULE", None)
    out = subprocess.run(
        [sys.executable, SCRIPT, json.dumps(args)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    assert "Traceback" not in log, log[-6000:]
    data: dict[str, Any] = json.loads(result.read_text(encoding="utf-8"))
    data["log"] = log
    return data


def _other_domain(site: LocalSite, path: str) -> str:
    """*path* on the site, by the name ``localhost`` instead of ``127.0.0.1``."""
    return site.url(path).replace("://127.0.0.1:", "://localhost:", 1)


def _visits(site: LocalSite, host: str, prefix: str) -> list[Visit]:
    return [v for v in site.visits if v.host.startswith(f"{host}:") and v.path.startswith(prefix)]


def _rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


def test_retry_after_pauses_only_the_failing_domain(site: LocalSite, tmp_path: Path) -> None:
    """A: 127.0.0.1 answers 429 with Retry-After: 2 once. B: localhost, 80 pages of 100 ms,
    two at a time. Two downloads at a time in all, so a retry that held a downloader slot
    while waiting would halve B's rate."""
    b_pages = 80
    fresh_a = [{"url": site.url(f"/items?n=0&fresh={j}"), "priority": 20} for j in range(3)]
    b_requests: list[dict[str, Any]] = [
        {"url": _other_domain(site, f"/delay?ms=100&b={k}")} for k in range(b_pages)
    ]
    b_requests[10]["then"] = fresh_a  # sent to A while A is paused
    requests = [{"url": site.url("/ratelimit?key=a&after=2"), "priority": 10}, *b_requests]
    result = _crawl(tmp_path, requests, CONCURRENT_REQUESTS=2, CONCURRENT_REQUESTS_PER_DOMAIN=2)

    stats = result["stats"]
    assert stats["finish_reason"] == "finished"
    limited = _visits(site, "127.0.0.1", "/ratelimit")
    assert len(limited) == 2, result["log"][-4000:]
    start, end = limited[0].time, limited[1].time
    assert end - start >= 2.0  # the retry waited for Retry-After
    assert end - start < 3.5
    fresh = _visits(site, "127.0.0.1", "/items")
    assert len(fresh) == 3
    assert all(v.time >= start + 2.0 for v in fresh)  # fresh requests to A waited too
    assert stats["retry/count"] == 1
    assert stats["ingest/retry/retry_after"] == 1
    assert stats["ingest/retry/delayed"] == 4  # the retry and the three fresh requests

    b_times = [v.time for v in _visits(site, "localhost", "/delay")]
    assert len(b_times) == b_pages
    during = [t for t in b_times if start < t < end]
    after = [t for t in b_times if t > end + 0.3]
    # two at a time, 100 ms each: 20 pages/s, ~40 during the 2 s wait
    assert len(during) >= 28, (len(during), end - start)
    assert len(after) >= 10
    assert _rate(during) >= 0.8 * _rate(after), (_rate(during), _rate(after))


def test_retry_after_as_an_http_date(site: LocalSite, tmp_path: Path) -> None:
    # the site answers with the HTTP date 3 s after the first hit, in whole seconds
    url = site.url("/ratelimit?key=date&after=3&date=1")
    result = _crawl(tmp_path, [{"url": url}])
    limited = _visits(site, "127.0.0.1", "/ratelimit")
    assert len(limited) == 2, result["log"][-4000:]
    not_before = int(limited[0].time + 3)
    assert not_before <= limited[1].time < not_before + 1.5, (limited[0].time, limited[1].time)
    assert result["stats"]["ingest/retry/retry_after"] == 1
    assert result["seen"] == [[url, 200]]


@pytest.mark.exclusive
def test_backoff_between_attempts_and_scrapys_stats(site: LocalSite, tmp_path: Path) -> None:
    """Four attempts (RETRY_TIMES = 3) at a failing URL: the gap before retry n is within
    [0, base * 2 ** (n - 1)] plus the crawl's own latency, the waits the stats count are
    real, and the retry stats are what Scrapy's RetryMiddleware gives for the same crawl."""
    base = 0.4
    requests = [{"url": site.url("/status/503")}]
    settings = {"RETRY_TIMES": 3, "INGEST_RETRY_BACKOFF_BASE": base}
    ours = _crawl(tmp_path, requests, **settings)
    attempts = [v.time for v in _visits(site, "127.0.0.1", "/status/503")]
    assert len(attempts) == 4, ours["log"][-4000:]
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    for n, gap in enumerate(gaps, start=1):
        assert 0 <= gap <= base * 2 ** (n - 1) + 0.3, gaps
    stats = ours["stats"]
    assert stats["ingest/retry/delayed"] == 3
    assert sum(gaps) >= stats["ingest/retry/delay_seconds"] - 0.01, (gaps, stats)

    site.reset()
    scrapys = _crawl(tmp_path, requests, INGEST_RETRY_ENABLED=False, **settings)
    assert len(site.hits) == 4
    assert not any(key.startswith("ingest/retry/") for key in scrapys["stats"])
    retry_stats = [
        {k: v for k, v in crawl["stats"].items() if k.startswith("retry/")}
        for crawl in (ours, scrapys)
    ]
    assert retry_stats[0] == retry_stats[1]
    assert retry_stats[0]["retry/count"] == 3
    assert retry_stats[0]["retry/max_reached"] == 1
    # one "Retrying ..." line per retry, Scrapy's, as without us; the delays have lines of
    # their own that do not read like one
    for crawl in (ours, scrapys):
        assert crawl["log"].count("Retrying") == 3, crawl["log"][-4000:]
        assert crawl["log"].count("Gave up retrying") == 1
    assert ours["log"].count("] DEBUG: Backing off 127.0.0.1 for ") == 3, ours["log"][-4000:]


def test_a_crawl_whose_last_request_waits_does_not_close(site: LocalSite, tmp_path: Path) -> None:
    url = site.url("/ratelimit?key=last&after=2")
    result = _crawl(tmp_path, [{"url": url}])
    assert result["stats"]["finish_reason"] == "finished"
    assert result["seen"] == [[url, 200]]
    assert len(site.hits) == 2
    assert "ingest/retry/waiting_dropped" not in result["stats"]


def test_get_downloader_middleware_finds_it(site: LocalSite, tmp_path: Path) -> None:
    """``crawler.get_downloader_middleware(RetryMiddleware)`` finds the add-on's middleware,
    and ``max_retry_times = 0`` set on that instance switches retries off."""
    url = site.url("/status/503")
    result = _crawl(tmp_path, [{"url": url}], instance={"max_retry_times": 0}, RETRY_TIMES=3)
    assert (
        result["retry_middleware"]
        == "scrapy_ingest.downloadermiddlewares.retry.BackoffRetryMiddleware"
    )
    assert site.hits == ["/status/503"], result["log"][-4000:]
    assert result["seen"] == [[url, 503]]
    stats = result["stats"]
    assert stats["retry/max_reached"] == 1
    assert "retry/count" not in stats
    assert "ingest/retry/delayed" not in stats


@pytest.mark.exclusive
@pytest.mark.parametrize("reactor", [ASYNCIO_REACTOR, SELECT_REACTOR])
def test_robots_txt_retry_after_waits_without_spinning(
    site: LocalSite, tmp_path: Path, reactor: str
) -> None:
    """robots.txt comes through engine.download_async(), not the scheduler: under
    ROBOTSTXT_OBEY, a 503 with ``Retry-After: 2`` on it is retried once, 2 s later, the wait
    costing next to no CPU (measured against the same crawl without the 503), and the other
    domain is crawled meanwhile."""
    requests = [
        {"url": site.url("/items?n=0")},
        *({"url": _other_domain(site, f"/delay?ms=50&k={k}")} for k in range(10)),
    ]
    settings = {"ROBOTSTXT_OBEY": True, "TWISTED_REACTOR": reactor}
    site.fail_robots("2")
    paused = _crawl(tmp_path, requests, **settings)
    visits = site.visits
    site.reset()
    plain = _crawl(tmp_path, requests, **settings)

    robots = [v for v in visits if v.path == "/robots.txt"]
    assert len(robots) == 3, paused["log"][-4000:]  # one domain's twice, the other's once
    hosts = [v.host for v in robots]
    failing = max(hosts, key=hosts.count)
    first, retried = (v.time for v in robots if v.host == failing)
    assert 2.0 <= retried - first < 3.5
    assert paused["cpu"] - plain["cpu"] < 0.1, (paused["cpu"], plain["cpu"])
    pages = [v for v in visits if v.path != "/robots.txt"]
    assert len(pages) == 11
    # the failing domain waited for its robots.txt; the other one did not wait for it
    assert all(v.time > retried for v in pages if v.host == failing)
    assert all(v.time < retried for v in pages if v.host != failing)
    stats = paused["stats"]
    assert stats["finish_reason"] == "finished"
    assert stats["retry/count"] == 1
    assert stats["ingest/retry/retry_after"] == 1
    assert stats["ingest/retry/delayed"] == 1, stats  # the retry, set aside once: no spin
    assert stats["ingest/retry/delay_seconds"] == pytest.approx(2.0, abs=0.1)
    assert "ingest/retry/waiting_dropped" not in stats
    assert len(paused["seen"]) == len(plain["seen"]) == 11
