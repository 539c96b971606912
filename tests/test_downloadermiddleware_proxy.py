"""ProxyMiddleware: the pool's rules on their own, then real crawls through several real
HTTP proxies (Debian's tinyproxy) on localhost, and one through Chromium (scrapy-playwright)."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import sqlite3
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from _helpers import (
    finish_list_crawl,
    run_list_crawl,
    start_list_crawl,
    wait_for_log,
    wait_for_round,
)
from conftest import service_missing
from scrapy.utils.test import get_crawler
from services import Proxy, free_port, running_tinyproxy

from scrapy_ingest.downloadermiddlewares._proxypool import ProxyPool, proxy_name
from scrapy_ingest.downloadermiddlewares.proxy import ProxyMiddleware
from scrapy_ingest.exceptions import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from services import LocalSite


# --------------------------------------------------------------------------------------------
# the pool
# --------------------------------------------------------------------------------------------

URLS = [f"http://u:pw{i}@10.0.0.{i}:3128" for i in range(3)]


def pool(**kwargs: Any) -> ProxyPool:
    new = ProxyPool(rng=random.Random(7), **kwargs)
    new.set_urls(URLS)
    return new


def take(p: ProxyPool, n: int, session: Any = None, now: float = 0.0) -> list[int]:
    ids = []
    for _ in range(n):
        proxy = p.choose(session, now, http=True)
        assert proxy is not None
        p.done(proxy, session)
        ids.append(proxy.id)
    return ids


def test_round_robin_takes_each_proxy_in_turn() -> None:
    assert take(pool(), 7) == [0, 1, 2, 0, 1, 2, 0]


def test_random_spreads_and_least_used_takes_the_least_busy() -> None:
    assert set(take(pool(policy="random"), 30)) == {0, 1, 2}
    p = pool(policy="least_used")
    busy = p.choose(None, 0.0, http=True)  # stays in flight
    assert busy is not None
    assert busy.id not in take(p, 4)


def test_a_benched_proxy_is_skipped_until_its_time_is_over() -> None:
    p = pool(backoff_base=10, backoff_max=100)
    first = p.proxies[0]
    seconds = p.bench(first, now=0.0)
    assert 5.0 <= seconds <= 10.0  # base * 2**0, times a factor in [0.5, 1]
    assert 0 not in take(p, 6, now=1.0)
    assert p.states(1.0) == {"good": 0, "unchecked": 2, "benched": 1}
    assert p.reanimate(seconds + 0.01) == [first]
    assert 0 in take(p, 3, now=seconds + 0.01)


def test_backoff_doubles_with_each_failure_and_stops_at_the_cap() -> None:
    p = pool(backoff_base=10, backoff_max=35)
    proxy, now, delays = p.proxies[0], 0.0, []
    for _ in range(5):
        delays.append(p.bench(proxy, now))
        now += delays[-1] + 0.01
    for failures, delay in enumerate(delays, 1):
        cap = min(35.0, 10.0 * 2 ** (failures - 1))
        assert cap / 2 <= delay <= cap
    # benched again while benched (two requests failed at once): one failure, not two
    assert p.bench(proxy, now - 0.02) <= delays[-1]
    assert proxy.failures == 5
    p.reanimate(now)
    p.succeeded(proxy, sent=now)
    assert proxy.failures == 0 and proxy.good


def test_answers_of_requests_sent_before_a_ban_do_not_reset_its_count() -> None:
    """Three bans in a row, each of a request that was under way beside another one, which
    succeeds after the ban (and another after the reanimation): benched for the base, twice
    and four times the base, times [0.5, 1]."""
    p = pool(backoff_base=10, backoff_max=100)
    proxy, now, delays = p.proxies[0], 0.0, []
    for _ in range(3):
        sent = now  # two requests through the proxy at once
        delays.append(p.bench(proxy, now + 1, sent))  # one is banned
        p.succeeded(proxy, sent)  # the other one is answered while the proxy is benched
        now += 1 + delays[-1] + 0.01
        assert p.reanimate(now) == [proxy]
        p.succeeded(proxy, sent)  # a third one, answered after the reanimation
    for bans, delay in enumerate(delays):
        assert 10 * 2**bans / 2 <= delay <= 10 * 2**bans, delays
    assert proxy.failures == 3 and not proxy.good
    # a ban of a request sent before the last ban, answered after the reanimation: that ban's
    assert p.bench(proxy, now + 1, sent) == 0.0
    assert proxy.failures == 3 and proxy.benched_until is None
    # a request sent after the reanimation that is not banned: the proxy works again
    p.succeeded(proxy, sent=now)
    assert proxy.failures == 0 and proxy.good


def test_sticky_sessions_keep_their_proxy_until_it_is_benched() -> None:
    p = pool()
    assert len(set(take(p, 5, session="a.example"))) == 1
    [mine] = set(take(p, 1, session="a.example"))
    p.bench(p.proxies[mine], now=0.0)
    assert set(take(p, 3, session="a.example", now=1.0)) == {(mine + 1) % 3}


def test_exclusive_sessions_do_not_share_a_proxy_and_end_when_idle() -> None:
    p = pool(exclusive=True, session_idle=60)
    owners = {s: take(p, 1, session=s)[0] for s in ("a", "b", "c")}
    assert sorted(owners.values()) == [0, 1, 2]
    assert p.choose("d", 10.0, http=True) is None  # every proxy has its session
    assert p.choose(None, 10.0, http=True) is None
    assert p.next_change(10.0) == 60.0  # when the first session may end
    assert p.choose("d", 61.0, http=True) is not None


def test_socks_proxies_serve_playwright_requests_only() -> None:
    p = ProxyPool()
    p.set_urls(["socks5://10.0.0.9:1080"])
    assert p.choose(None, 0.0, http=True) is None
    proxy = p.choose(None, 0.0, http=False)
    assert proxy is not None
    assert proxy.playwright_proxy() == {"server": "socks5://10.0.0.9:1080"}


def test_a_new_list_keeps_the_state_of_the_proxies_that_stay() -> None:
    p = pool()
    p.bench(p.proxies[1], now=0.0)
    take(p, 1, session="s")
    added, removed = p.set_urls([URLS[1], "http://10.0.0.7:3128"])
    assert [a.name for a in added] == ["http://10.0.0.7:3128"]
    assert [r.id for r in removed] == [0, 2]
    assert p.proxies[0].benched_until is not None  # the same Proxy, bench and all
    assert p.proxies[1].id == 3
    assert proxy_name(URLS[1]) == "http://u:***@10.0.0.1:3128"


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------


def test_the_middleware_needs_a_proxy_list_or_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="INGEST_PROXY_LIST and INGEST_PROXY_FILE are both"):
        ProxyMiddleware.from_crawler(get_crawler())
    bad = tmp_path / "proxies.txt"
    bad.write_text("# ours\nhttp://u:secret@10.0.0.1:3128\n\nftp://u:secret@10.0.0.2:21\n")
    with pytest.raises(ConfigError) as error:
        ProxyMiddleware.from_crawler(get_crawler(settings_dict={"INGEST_PROXY_FILE": str(bad)}))
    message = str(error.value)
    assert "line 4" in message and "its scheme must be one of" in message
    assert "secret" not in message
    with pytest.raises(ConfigError, match="cannot be read"):
        ProxyMiddleware.from_crawler(
            get_crawler(settings_dict={"INGEST_PROXY_FILE": str(tmp_path / "missing.txt")})
        )
    with pytest.raises(ConfigError, match=r"INGEST_PROXY_LIST\[1\] \('http://u:\*\*\*@x'\)"):
        ProxyMiddleware.from_crawler(
            get_crawler(settings_dict={"INGEST_PROXY_LIST": [URLS[0], "http://u:secret@x"]})
        )
    with pytest.raises(ConfigError, match=r"INGEST_PROXY_BAN_POLICY .* cannot be imported"):
        ProxyMiddleware.from_crawler(
            get_crawler(
                settings_dict={"INGEST_PROXY_LIST": URLS, "INGEST_PROXY_BAN_POLICY": "no.Such"}
            )
        )


def test_the_addon_places_the_middleware_only_with_proxies() -> None:
    from scrapy_ingest.addon import IngestAddon

    def middlewares(settings: dict[str, Any]) -> dict[Any, Any]:
        crawler = get_crawler(settings_dict={"ADDONS": {IngestAddon: 300}, **settings})
        return dict(crawler.settings.getdict("DOWNLOADER_MIDDLEWARES"))

    assert ProxyMiddleware not in middlewares({})
    assert middlewares({"INGEST_PROXY_LIST": URLS})[ProxyMiddleware] == 740
    assert middlewares({"INGEST_PROXY_FILE": "proxies.txt"})[ProxyMiddleware] == 740


# --------------------------------------------------------------------------------------------
# crawls through real proxies
# --------------------------------------------------------------------------------------------


@pytest.fixture
def proxies() -> Iterator[list[Proxy]]:
    """Three tinyproxies, p1 p2 p3, with passwords; the site tells them apart."""
    with ExitStack() as stack:
        started = []
        try:
            for n in (1, 2, 3):
                started.append(
                    stack.enter_context(running_tinyproxy(f"user{n}", f"secret-pw-{n}", f"p{n}"))
                )
        except Exception as exc:  # ServiceUnavailable
            service_missing(str(exc))
        yield started


def via(site: LocalSite) -> Counter[str]:
    """How many requests reached the site through each proxy ("direct": through none)."""
    return Counter(v.headers.get("X-Test-Proxy", "direct") for v in site.visits)


def requests_to(site: LocalSite, n: int, path: str = "/via") -> list[dict[str, Any]]:
    joiner = "&" if "?" in path else "?"
    return [{"url": site.url(f"{path}{joiner}n={i}")} for i in range(n)]


@pytest.mark.crawl
def test_round_robin_through_three_proxies(
    site: LocalSite, proxies: list[Proxy], tmp_path: Path
) -> None:
    settings = {"INGEST_PROXY_LIST": [p.url for p in proxies], "CONCURRENT_REQUESTS": 1}
    result = run_list_crawl({"requests": requests_to(site, 9), "settings": settings}, tmp_path)
    assert [a["status"] for a in result["answers"]] == [200] * 9
    assert via(site) == {"p1": 3, "p2": 3, "p3": 3}
    # no password in any answer's proxy, nor in the stats or the log
    assert {a["proxy"] for a in result["answers"]} == {
        f"http://user{n}:***@127.0.0.1:{p.port}" for n, p in enumerate(proxies, 1)
    }
    assert "secret-pw" not in json.dumps(result)
    assert result["stats"]["ingest/proxy/good"] == 9
    assert result["stats"]["ingest/proxy/state/good"] == 3
    # the request log's proxy column, credentials removed
    with sqlite3.connect(tmp_path / "ingest.sqlite3") as db:
        stored = Counter(row[0] for row in db.execute("SELECT proxy FROM ingest_requests"))
    assert stored == {f"http://user{n}:***@127.0.0.1:{p.port}": 3 for n, p in enumerate(proxies, 1)}


@pytest.mark.crawl
def test_least_used_and_random_spread_requests(
    site: LocalSite, proxies: list[Proxy], tmp_path: Path
) -> None:
    for policy in ("least_used", "random"):
        site.reset()
        settings = {"INGEST_PROXY_LIST": [p.url for p in proxies], "INGEST_PROXY_POLICY": policy}
        run_list_crawl({"requests": requests_to(site, 30), "settings": settings}, tmp_path)
        counts = via(site)
        assert set(counts) == {"p1", "p2", "p3"}, (policy, counts)
        assert sum(counts.values()) == 30


@pytest.mark.crawl
def test_a_banned_proxy_is_benched_and_the_request_retried_through_another(
    site: LocalSite, proxies: list[Proxy], tmp_path: Path
) -> None:
    settings = {"INGEST_PROXY_LIST": [p.url for p in proxies], "CONCURRENT_REQUESTS": 2}
    result = run_list_crawl(
        {"requests": requests_to(site, 12, "/via?ban=p1"), "settings": settings}, tmp_path
    )
    answers = result["answers"]
    assert [a["status"] for a in answers] == [200] * 12
    assert not any("p1" in a["body"] for a in answers)
    counts = via(site)
    assert 1 <= counts["p1"] <= 2  # banned once (twice if two requests were in flight)
    assert "direct" not in counts
    stats = result["stats"]
    p1 = proxy_name(proxies[0].url)
    assert stats["ingest/proxy/bans/403"] == counts["p1"]
    assert stats[f"ingest/proxy/{p1}/bans/403"] == counts["p1"]
    assert stats["ingest/proxy/benched"] == stats[f"ingest/proxy/{p1}/benched"] == 1
    assert stats["ingest/proxy/retried"] == counts["p1"]
    assert {a["tries"] for a in answers if a["proxy"] != p1} >= {1, 2}
    assert stats["ingest/proxy/state/benched"] == 1  # base 60 s: still benched at the end


@pytest.mark.crawl
def test_a_request_banned_everywhere_gives_up_after_max_tries(
    site: LocalSite, proxies: list[Proxy], tmp_path: Path
) -> None:
    settings = {
        "INGEST_PROXY_LIST": [p.url for p in proxies],
        "INGEST_PROXY_MAX_TRIES": 2,
        "INGEST_PROXY_ALL_DEAD_TIMEOUT": 1,
    }
    plan = {"requests": requests_to(site, 1, "/via?ban=p1,p2,p3"), "settings": settings}
    result = run_list_crawl(plan, tmp_path)
    [answer] = result["answers"]
    assert answer["status"] == 403 and answer["tries"] == 2
    assert result["stats"]["ingest/proxy/gave_up"] == 1
    assert via(site) == {"p1": 1, "p2": 1}


@pytest.mark.crawl
def test_a_stopped_proxy_is_benched_then_reanimated_once_it_is_back(
    site: LocalSite, proxies: list[Proxy], tmp_path: Path
) -> None:
    pause = tmp_path / "pause"
    settings = {
        "INGEST_PROXY_LIST": [p.url for p in proxies],
        "INGEST_PROXY_BACKOFF_BASE": 1.0,
        "INGEST_PROXY_BACKOFF_MAX": 1.0,
        "CONCURRENT_REQUESTS": 1,
    }
    plan = {
        "requests": requests_to(site, 6),
        "settings": settings,
        "rounds": 3,
        "pause_file": str(pause),
    }
    p2 = proxy_name(proxies[1].url)
    crawl = start_list_crawl(plan, tmp_path)
    try:
        wait_for_round(pause, crawl, 0)
        proxies[1].stop()
        pause.touch()
        wait_for_round(pause, crawl, 1)
        proxies[1].start()
        # round 2 once p2's last bench is over (it may have been benched, reanimated and
        # benched again during round 1)
        wait_for_log(crawl, lambda log: back_from_the_bench(log, p2), what=f"{p2} back")
        pause.touch()
        result = finish_list_crawl(crawl, tmp_path)
    finally:
        crawl.kill()
    by_round = {
        n: Counter(a["body"] for a in result["answers"] if a["round"] == n) for n in range(3)
    }
    assert by_round[0] == {"via p1": 2, "via p2": 2, "via p3": 2}
    assert "via p2" not in by_round[1] and sum(by_round[1].values()) == 6  # retried elsewhere
    assert by_round[2]["via p2"] >= 1  # back in the rotation
    stats = result["stats"]
    refused = [k for k in stats if k.startswith("ingest/proxy/bans/") and "Refused" in k]
    assert refused, stats  # ConnectionRefusedError; DownloadConnectionRefusedError on 2.19
    assert stats[f"ingest/proxy/{p2}/benched"] >= 1
    assert stats[f"ingest/proxy/{p2}/reanimated"] >= 1
    assert not result["errors"]
    assert "direct" not in via(site)


def back_from_the_bench(log: str, name: str) -> bool:
    """Whether the last bench event of proxy *name* in the crawl's *log* is its reanimation."""
    events = re.findall(rf"Proxy {re.escape(name)} (benched for|is back from the bench)", log)
    return bool(events) and events[-1] == "is back from the bench"


@pytest.mark.exclusive
@pytest.mark.crawl
def test_when_every_proxy_is_down_the_spider_closes_and_nothing_goes_direct(
    site: LocalSite, tmp_path: Path
) -> None:
    dead = [f"http://u:pw@127.0.0.1:{free_port()}" for _ in range(2)]
    settings = {
        "INGEST_PROXY_LIST": dead,
        "INGEST_PROXY_BACKOFF_BASE": 0.5,
        "INGEST_PROXY_BACKOFF_MAX": 1.0,
        "INGEST_PROXY_ALL_DEAD_TIMEOUT": 3.0,
        "INGEST_PROXY_MAX_TRIES": 1000,  # the clock, not the tries, ends it
    }
    result = run_list_crawl({"requests": requests_to(site, 20), "settings": settings}, tmp_path)
    log = result["log"]
    assert result["stats"]["finish_reason"] == "ingest_no_proxies", log[-5000:]
    # the clock started once (a reanimation does not restart it) and closed the spider when it
    # ran out, as the middleware measured it: not after the tries, nor much later. The clock
    # is the behaviour under test; the bound is generous for a busy machine's late timer
    assert log.count("Every proxy is benched;") == 1, log[-5000:]
    [closed_after] = re.findall(r"Every proxy has been benched for (\d+) s", log)
    assert 3 <= int(closed_after) < 10, log[-5000:]
    assert site.visits == []  # never the machine's own IP
    assert not result["answers"]
    stats = result["stats"]
    assert stats["ingest/proxy/waited"] >= 1
    assert stats["ingest/proxy/reanimated"] >= 1  # they were tried again before giving up
    assert "INGEST_PROXY_ALL_DEAD_TIMEOUT" in log


@pytest.mark.exclusive
@pytest.mark.crawl
def test_robots_txt_waits_for_a_benched_proxy_without_spinning(
    site: LocalSite, proxies: list[Proxy], tmp_path: Path
) -> None:
    """robots.txt comes through engine.download_async(), not the scheduler: when no proxy is
    free, it waits in place, on a timer, then goes through the first proxy back."""
    other = site.url("/via?n=1").replace("127.0.0.1", "localhost")
    settings = {
        "INGEST_PROXY_LIST": [proxies[0].url],
        "INGEST_PROXY_BACKOFF_BASE": 2.0,  # benched for 1 to 2 s
        "INGEST_PROXY_BACKOFF_MAX": 2.0,
        "INGEST_PROXY_MAX_TRIES": 1,
        "ROBOTSTXT_OBEY": True,
    }
    requests = [
        {"url": site.url("/via?ban=p1"), "round": 0},  # benches the only proxy
        {"url": other, "round": 1},  # its domain's robots.txt comes while the proxy is benched
    ]
    plan = {"requests": requests, "settings": settings, "rounds": 2}
    result = run_list_crawl(plan, tmp_path)

    benched = re.search(r"benched for ([\d.]+) s", result["log"])
    assert benched, result["log"][-4000:]
    banned = next(v for v in site.visits if v.path.startswith("/via?ban"))
    robots = [v for v in site.visits if v.host.startswith("localhost:") and "robots" in v.path]
    assert len(robots) == 1, result["log"][-4000:]  # fetched once, when the proxy was back
    assert robots[0].headers["X-Test-Proxy"] == "p1"
    waited = robots[0].time - banned.time
    assert float(benched[1]) - 0.1 <= waited < float(benched[1]) + 1.0, waited
    answers = {a["round"]: a for a in result["answers"]}
    assert answers[1]["body"] == "via p1"
    cpu = answers[1]["cpu"] - result["round_cpu"][1]  # round 1: the wait and two fetches
    assert cpu < 0.1, cpu
    assert result["stats"]["ingest/proxy/waited"] <= 2  # the robots.txt (and its page, maybe)
    assert "direct" not in via(site)


COOKBOOK = Path(__file__).resolve().parents[1] / "docs" / "cookbook.md"


def cookbook_sqlite_query(title: str) -> str:
    """The SQLite block that follows *title* in docs/cookbook.md, as pasted."""
    text = COOKBOOK.read_text(encoding="utf-8")
    after = text[text.index(title) :]
    return re.search(r"```sql\n-- SQLite\n(.*?)```", after, re.S)[1]  # type: ignore[index]


def retried_rows(workdir: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Every (url, retry_times, status) of ingest_requests, and what the cookbook's
    "Requests that were retried" query returns for the crawl."""
    with sqlite3.connect(workdir / "ingest.sqlite3") as db:
        rows = db.execute("SELECT url, retry_times, status FROM ingest_requests").fetchall()
        [job] = db.execute("SELECT job_id FROM ingest_jobs").fetchone()
        query = cookbook_sqlite_query("Requests that were retried")
        query = re.sub(r"'[0-9a-f-]{36}'", f"'{job}'", query)
        return rows, db.execute(query).fetchall()


@pytest.mark.exclusive
@pytest.mark.crawl
def test_a_rate_limit_is_waited_out_by_the_retry_middleware_and_benches_no_proxy(
    site: LocalSite, proxies: list[Proxy], tmp_path: Path
) -> None:
    """INGEST_RETRY_ENABLED and one proxy: a 429 with Retry-After: 2 is fetched again 2 s
    later, through the same proxy, which is not benched; another domain goes on meanwhile."""
    other = site.url("/delay").replace("127.0.0.1", "localhost")
    requests = [
        {"url": site.url("/ratelimit?key=mw&after=2")},
        *({"url": f"{other}?ms={400 * i}"} for i in range(1, 5)),  # answered 0.4 to 1.6 s on
    ]
    settings = {"INGEST_PROXY_LIST": [proxies[0].url], "INGEST_RETRY_ENABLED": True}
    plan = {"requests": requests, "settings": settings, "spider_settings": {"RETRY_ENABLED": True}}
    result = run_list_crawl(plan, tmp_path)
    # nothing waited but the one retry, for the Retry-After and no more: no backoff on top of
    # it, no wait for a proxy
    stats = result["stats"]
    assert (stats["ingest/retry/delayed"], stats["ingest/retry/delay_seconds"]) == (1, 2.0), stats
    assert "ingest/proxy/waited" not in stats, stats
    limited = [v for v in site.visits if v.path.startswith("/ratelimit")]
    assert len(limited) == 2 and {v.headers["X-Test-Proxy"] for v in limited} == {"p1"}
    assert 2.0 <= limited[1].time - limited[0].time < 3.0, limited
    # the other domain was not held: its pages were answered during the wait
    others = [a["time"] for a in result["answers"] if "/delay" in a["url"]]
    assert len(others) == 4 and max(others) < limited[1].time
    assert max(others) - limited[0].time > 1.2
    assert "ingest/proxy/benched" not in stats, stats
    assert stats["ingest/proxy/rate_limited"] == 1
    assert stats["ingest/proxy/state/benched"] == 0 and stats["ingest/proxy/state/good"] == 1
    assert stats["ingest/retry/retry_after"] == 1
    assert [a["status"] for a in result["answers"]] == [200] * 5
    # one retry count: the request log, Scrapy's stats and the cookbook agree
    rows, retried = retried_rows(tmp_path)
    url = site.url("/ratelimit?key=***&after=2")  # "key" is a secret query parameter
    assert sorted((r[1], r[2]) for r in rows if r[0] == url) == [(0, 429), (1, 200)]
    assert stats["retry/count"] == sum(1 for r in rows if r[1] > 0) == 1
    assert [(r[0], r[1], r[2]) for r in retried] == [(url, 0, "429"), (url, 1, "200")]


@pytest.mark.exclusive
@pytest.mark.crawl
def test_without_the_retry_middleware_the_proxy_middleware_waits_out_a_rate_limit(
    site: LocalSite, proxies: list[Proxy], tmp_path: Path
) -> None:
    """No INGEST_RETRY_ENABLED (and RETRY_ENABLED False): the proxy middleware retries a 429
    with Retry-After itself, after it, and a banned request through another proxy; both
    retries come from get_retry_request, counted once each."""
    requests = [
        {"url": site.url("/ratelimit?key=own&after=2")},
        *requests_to(site, 4, "/via?ban=p1"),
    ]
    settings = {"INGEST_PROXY_LIST": [p.url for p in proxies[:2]], "CONCURRENT_REQUESTS": 1}
    result = run_list_crawl({"requests": requests, "settings": settings}, tmp_path)
    limited = [v for v in site.visits if v.path.startswith("/ratelimit")]
    assert len(limited) == 2
    assert 2.0 <= limited[1].time - limited[0].time < 3.0, limited
    stats = result["stats"]
    assert stats["ingest/proxy/rate_limited"] == 1
    assert stats["ingest/proxy/benched"] == 1  # p1, for its 403 (a ban without Retry-After)
    assert [a["status"] for a in result["answers"]] == [200] * 5
    rows, retried = retried_rows(tmp_path)
    again = [r for r in rows if r[1] > 0]
    assert stats["retry/count"] == len(again) == stats["ingest/proxy/retried"] >= 2
    assert {r[2] for r in again} == {200}
    assert {r[0] for r in retried} == {r[0] for r in again}


@pytest.mark.crawl
def test_a_proxy_answering_407_or_refusing_a_tunnel_is_benched_and_its_warnings_stored(
    site: LocalSite, proxies: list[Proxy], tmp_path: Path
) -> None:
    """Bans stay bans: a proxy answering 407 (the test site stands in for it: a request to
    /status/407 through it), and a tinyproxy given the wrong password, which refuses the
    CONNECT of an https:// URL (with a 401: tinyproxy never answers 407), are both benched;
    with no other proxy, every proxy is benched, and the middleware's warnings are rows of
    ingest_logs."""
    wrong = f"http://user1:wrong-pw@127.0.0.1:{proxies[0].port}"
    answers_407 = site.base_url.replace("http://", "http://user:pw@")
    settings = {"INGEST_PROXY_LIST": [wrong, answers_407], "INGEST_RETRY_ENABLED": True}
    requests = [
        {
            "url": site.url("/via").replace("http://", "https://"),
            "meta": {"dont_retry": True, "ingest_proxy": wrong},
        },
        {
            "url": "http://proxy-test.invalid/status/407",
            "meta": {"dont_retry": True, "ingest_proxy": answers_407},
        },
    ]
    plan = {
        "requests": requests,
        "settings": settings,
        "spider_settings": {"RETRY_ENABLED": True},
    }
    result = run_list_crawl(plan, tmp_path)
    [error] = result["errors"]
    assert "TunnelError" in error["error"], error
    assert [a["status"] for a in result["answers"]] == [407]
    stats = result["stats"]
    assert stats["ingest/proxy/bans/TunnelError"] == stats["ingest/proxy/bans/407"] == 1
    assert stats["ingest/proxy/benched"] == stats["ingest/proxy/state/benched"] == 2
    assert "ingest/proxy/rate_limited" not in stats
    with sqlite3.connect(tmp_path / "ingest.sqlite3") as db:
        logs = db.execute("SELECT logger, level_name, message FROM ingest_logs").fetchall()
    proxy_logs = [log for log in logs if log[0] == "scrapy_ingest.downloadermiddlewares.proxy"]
    messages = " | ".join(log[2] for log in proxy_logs)
    assert "WARNING" in {log[1] for log in proxy_logs}, logs
    assert "Every proxy is benched" in messages and "benched for" in messages, logs
    assert "wrong-pw" not in messages


@pytest.mark.crawl
def test_a_proxy_banned_three_times_in_a_row_is_benched_twice_as_long_each_time(
    site: LocalSite, proxies: list[Proxy], tmp_path: Path
) -> None:
    """In each round, a slow page and a banned one go through the only proxy at once: the ban
    benches it, and the slow page, answered 0.8 s later, does not reset its count, so the
    benches are the base, twice and four times the base (each times 0.5 to 1)."""
    requests = [
        spec
        for n in range(3)
        for spec in (
            {"url": site.url(f"/delay?ms=800&n={n}"), "round": n},
            {"url": site.url(f"/via?ban=p1&n={n}"), "round": n},
        )
    ]
    settings = {
        "INGEST_PROXY_LIST": [proxies[0].url],
        "INGEST_PROXY_BACKOFF_BASE": 1.0,
        "INGEST_PROXY_BACKOFF_MAX": 10.0,
        "INGEST_PROXY_MAX_TRIES": 1,
    }
    plan = {"requests": requests, "settings": settings, "rounds": 3}
    result = run_list_crawl(plan, tmp_path)
    assert sorted(a["status"] for a in result["answers"]) == [200, 200, 200, 403, 403, 403]
    benched = [float(s) for s in re.findall(r"benched for ([\d.]+) s \(403\)", result["log"])]
    assert len(benched) == 3, result["log"][-4000:]
    for bans, seconds in enumerate(benched):
        assert 2**bans / 2 - 0.05 <= seconds <= 2**bans + 0.05, benched
    assert result["stats"]["ingest/proxy/good"] == 3  # the slow pages, counted all the same


@pytest.mark.crawl
def test_sticky_domains_pinning_and_bypassing(
    site: LocalSite, proxies: list[Proxy], tmp_path: Path
) -> None:
    other = site.url("/via").replace("127.0.0.1", "localhost")
    requests = [
        *requests_to(site, 6),
        *({"url": f"{other}?n={i}"} for i in range(6)),
        {"url": site.url("/via?pinned"), "meta": {"ingest_proxy": proxies[2].url}},
        {"url": site.url("/via?bypass"), "meta": {"ingest_proxy": False}},
    ]
    settings = {"INGEST_PROXY_LIST": [p.url for p in proxies[:2]], "INGEST_PROXY_STICKY": "domain"}
    result = run_list_crawl({"requests": requests, "settings": settings}, tmp_path)
    by_host: dict[str, set[str]] = {}
    for visit in site.visits:
        if "pinned" not in visit.path and "bypass" not in visit.path:
            by_host.setdefault(visit.host.split(":")[0], set()).add(visit.headers["X-Test-Proxy"])
    assert by_host == {"127.0.0.1": {"p1"}, "localhost": {"p2"}}
    bodies = {a["url"].split("?")[1]: a["body"] for a in result["answers"]}
    assert bodies["pinned"] == "via p3"
    assert bodies["bypass"] == "via direct"
    assert result["stats"]["ingest/proxy/pinned"] == 1
    assert result["stats"]["ingest/proxy/bypassed"] == 1


@pytest.mark.crawl
def test_the_proxy_file_is_read_again_when_it_changes(
    site: LocalSite, proxies: list[Proxy], tmp_path: Path
) -> None:
    listing = tmp_path / "proxies.txt"
    listing.write_text(f"# the first\n{proxies[0].url}\n")
    pause = tmp_path / "pause"
    plan = {
        "requests": requests_to(site, 4),
        "settings": {"INGEST_PROXY_FILE": str(listing)},
        "rounds": 2,
        "pause_file": str(pause),
    }
    crawl = start_list_crawl(plan, tmp_path)
    try:
        wait_for_round(pause, crawl, 0)
        listing.write_text(f"{proxies[1].url}  # the second\nnot a proxy\n")
        # round 1 once the middleware has read the file again (it looks every second)
        first, second = proxy_name(proxies[0].url), proxy_name(proxies[1].url)
        wait_for_log(
            crawl,
            lambda log: (
                f"Proxy {second} added from INGEST_PROXY_FILE" in log
                and f"Proxy {first} removed, as INGEST_PROXY_FILE no longer lists it" in log
            ),
            what="the proxy file read again",
        )
        pause.touch()
        result = finish_list_crawl(crawl, tmp_path)
    finally:
        crawl.kill()
    rounds = [Counter(a["body"] for a in result["answers"] if a["round"] == n) for n in (0, 1)]
    assert rounds == [{"via p1": 4}, {"via p2": 4}]
    assert "line 2 ('not a proxy') is invalid" in result["log"]


@pytest.mark.crawl
def test_a_ban_policy_class_and_a_spider_method(
    site: LocalSite, proxies: list[Proxy], tmp_path: Path
) -> None:
    settings = {
        "INGEST_PROXY_LIST": [p.url for p in proxies],
        "INGEST_PROXY_BAN_POLICY": "_proxy_crawl.BodyBanPolicy",  # bans "via p2" pages
        "CONCURRENT_REQUESTS": 1,
    }
    result = run_list_crawl({"requests": requests_to(site, 6), "settings": settings}, tmp_path)
    assert [a["body"] for a in result["answers"]].count("via p2") == 0
    assert result["stats"]["ingest/proxy/bans/200"] == 1


# --------------------------------------------------------------------------------------------
# scrapy-playwright
# --------------------------------------------------------------------------------------------


@pytest.mark.crawl
def test_playwright_requests_go_through_a_proxy_context_without_proxy_authorization(
    site: LocalSite, proxies: list[Proxy], tmp_path: Path
) -> None:
    if importlib.util.find_spec("scrapy_playwright") is None:
        service_missing("scrapy-playwright is not installed (pip install -e '.[test]')")
    if not os.path.exists("/usr/bin/chromium"):
        service_missing("Chromium is not installed (apt-get install -y chromium)")
    requests = [
        {"url": site.url(f"/via?browser={i}"), "meta": {"playwright": True}} for i in range(2)
    ]
    settings = {"INGEST_PROXY_LIST": [p.url for p in proxies[:2]]}
    result = run_list_crawl(
        {"requests": requests, "settings": settings, "playwright": True}, tmp_path
    )
    # Chromium wraps the text in HTML
    bodies = sorted(re.sub(r"<[^>]+>", "", a["body"]).strip() for a in result["answers"])
    assert bodies == ["via p1", "via p2"], result["log"][-3000:]
    pages = [v for v in site.visits if "browser" in v.path]
    assert len(pages) == 2
    for visit in pages:
        assert "Proxy-Authorization" not in visit.headers
        assert visit.headers.get("X-Test-Proxy") in {"p1", "p2"}
    assert {a["context"] for a in result["answers"]} == {
        "default@ingest-proxy-0",
        "default@ingest-proxy-1",
    }
    assert "secret-pw" not in json.dumps(result["answers"])
    with sqlite3.connect(tmp_path / "ingest.sqlite3") as db:
        rows = list(db.execute("SELECT proxy, playwright FROM ingest_requests"))
    assert sorted(rows) == [
        (proxy_name(proxies[0].url), 1),
        (proxy_name(proxies[1].url), 1),
    ]


def test_a_playwright_request_gets_a_context_per_proxy_with_the_options_of_its_own() -> None:
    from scrapy import Request

    crawler = get_crawler(
        settings_dict={
            "INGEST_PROXY_LIST": URLS[:2],
            "PLAYWRIGHT_CONTEXTS": {"mobile": {"is_mobile": True, "locale": "fr-FR"}},
        }
    )
    middleware = ProxyMiddleware.from_crawler(crawler)
    request = Request(
        "https://example.com/",
        headers={"Proxy-Authorization": "Basic planted"},
        meta={
            "playwright": True,
            "playwright_context": "mobile",
            "playwright_context_kwargs": {"locale": "de-DE"},
        },
    )
    assert middleware.process_request(request) is None
    meta = request.meta
    assert "proxy" not in meta
    assert b"Proxy-Authorization" not in request.headers
    assert meta["playwright_context"] == "mobile@ingest-proxy-0"
    assert meta["playwright_context_kwargs"] == {
        "is_mobile": True,
        "locale": "de-DE",  # the request's own option wins over the named context's
        "proxy": {"server": "http://10.0.0.0:3128", "username": "u", "password": "pw0"},
    }
    # tried again (a ban, a retry): the next proxy's context, named after the same context
    retry = request.copy()
    assert middleware.process_request(retry) is None
    assert retry.meta["playwright_context"] == "mobile@ingest-proxy-1"


def test_a_retry_through_another_proxy_carries_that_proxys_credentials_only() -> None:
    import base64
    import inspect

    from scrapy import Request, Spider
    from scrapy.downloadermiddlewares.httpproxy import HttpProxyMiddleware

    urls = [URLS[0], "http://10.0.0.9:3128", URLS[2]]  # the second one without credentials
    crawler = get_crawler(settings_dict={"INGEST_PROXY_LIST": urls})
    ours = ProxyMiddleware.from_crawler(crawler)
    scrapys = HttpProxyMiddleware.from_crawler(crawler)
    # Scrapy 2.13 wants the spider; later versions warn about it
    default = inspect.signature(scrapys.process_request).parameters["spider"].default
    spider_args = () if default is None else (Spider("s"),)

    def send(request: Request) -> tuple[str, bytes | None]:
        assert ours.process_request(request) is None
        assert scrapys.process_request(request, *spider_args) is None
        return request.meta["proxy"], request.headers.get(b"Proxy-Authorization")

    def basic(credentials: str) -> bytes:
        return b"Basic " + base64.b64encode(credentials.encode())

    request = Request("https://example.com/")
    assert send(request) == ("http://10.0.0.0:3128", basic("u:pw0"))
    retry = request.copy()  # a retry or a redirect copies the meta and the headers
    assert send(retry) == ("http://10.0.0.9:3128", None)
    again = retry.copy()
    assert send(again) == ("http://10.0.0.2:3128", basic("u:pw2"))
    assert send(again.copy()) == ("http://10.0.0.0:3128", basic("u:pw0"))
