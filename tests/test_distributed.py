"""Distributed crawls: worker processes sharing a scrapy-redis frontier, one PostgreSQL.

The crawl tests run a real ``redis-server`` (``redis_server_url``), real worker processes
(``_redis_crawl.py``) and the test site's ``/node/<k>`` tree of 2,000 pages. The others build
components: the default crawl id, the add-on's scheduler, per-process stats and metrics with
scrapy-redis's shared stats collector.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from _helpers import REPO_DIR, TESTS_DIR, Database, wait_for
from scrapy import Spider
from scrapy.utils.test import get_crawler

from scrapy_ingest import IngestAddon
from scrapy_ingest._job import make_job
from scrapy_ingest.extensions.metrics import PrometheusExtension
from scrapy_ingest.runtime import IngestRuntime

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from scrapy.crawler import Crawler
    from services import LocalSite

    from scrapy_ingest.scheduler import RedisLeaseScheduler

crawl_test = [pytest.mark.crawl, pytest.mark.slow]

WORKER_SCRIPT = TESTS_DIR / "_redis_crawl.py"
PAGES = 2000
NODE_RE = re.compile(r"^/node/(\d+)\?")


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    log_path: Path
    result_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait(self, timeout: float = 120) -> dict[str, Any]:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the worker did not end:\n{self.log()[-6000:]}") from None
        log = self.log()
        assert self.process.returncode == 0, log[-6000:]
        assert " ERROR: " not in log and "Traceback" not in log, log[-6000:]
        result: dict[str, Any] = json.loads(self.result_path.read_text(encoding="utf-8"))
        return result


class Frontier:
    """The Redis keys of one test's crawl (a random prefix) and its workers."""

    def __init__(self, redis_url: str, database_url: str, tmp_path: Path) -> None:
        import redis

        self.redis_url, self.database_url, self.tmp_path = redis_url, database_url, tmp_path
        self.prefix = f"t{secrets.token_hex(4)}"
        self.client = redis.Redis.from_url(redis_url)
        self.workers: list[Worker] = []
        #: scrapy-redis's queue key of the spider: the crawl id by default
        self.queue_key = f"{self.prefix}:nodes:requests"

    def seed(self, url: str) -> None:
        self.client.lpush(f"{self.prefix}:nodes:start_urls", json.dumps({"url": url}))

    def start(self, **args: Any) -> Worker:
        number = len(self.workers)
        log_path = self.tmp_path / f"worker-{number}.log"
        result_path = self.tmp_path / f"worker-{number}.json"
        args = {
            "redis_url": self.redis_url,
            "prefix": self.prefix,
            "database_url": self.database_url,
            "result": str(result_path),
            **args,
        }
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_DIR), str(TESTS_DIR)])}
        env.pop("SCRAPY_SETTINGS_MODULE", None)
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, str(WORKER_SCRIPT), json.dumps(args)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.tmp_path,
            )
        worker = Worker(process, log_path, result_path)
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait()
        keys = list(self.client.scan_iter(f"{self.prefix}:*"))
        if keys:
            self.client.delete(*keys)
        self.client.close()


@pytest.fixture
def frontier(redis_server_url: str, pg_url: str, tmp_path: Path) -> Iterator[Frontier]:
    crawl = Frontier(redis_server_url, pg_url, tmp_path)
    try:
        yield crawl
    finally:
        crawl.stop()


def node_hits(site: LocalSite) -> Counter[int]:
    """How many times each /node/<k> page was fetched."""
    return Counter(int(match[1]) for path in site.hits if (match := NODE_RE.match(path)))


def crawl_query() -> str:
    """The PostgreSQL/SQLite query of docs/distributed.md that aggregates a crawl's jobs."""
    text = (REPO_DIR / "docs" / "distributed.md").read_text(encoding="utf-8")
    for block in re.findall(r"```sql\n(.*?)```", text, re.DOTALL):
        if "CREATE VIEW ingest_crawls" in block:
            return str(block)
    raise AssertionError("docs/distributed.md has no CREATE VIEW ingest_crawls block")


# the crawl id, the add-on, per-process stats


def _crawler(tmp_path: Path, **settings: Any) -> Crawler:
    return get_crawler(
        settings_dict={
            "ADDONS": {IngestAddon: 300},
            "INGEST_DATABASE_URL": f"sqlite:///{tmp_path / 'ingest.sqlite3'}",
            **settings,
        }
    )


REDIS_SCHEDULER = "scrapy_redis.scheduler.Scheduler"


@pytest.mark.parametrize(
    ("settings", "crawl_id"),
    [
        ({}, None),  # the job id
        ({"SCHEDULER": REDIS_SCHEDULER}, "books:requests"),
        ({"SCHEDULER": REDIS_SCHEDULER, "INGEST_REDIS_LEASES": False}, "books:requests"),
        (
            {"SCHEDULER": REDIS_SCHEDULER, "SCHEDULER_QUEUE_KEY": "shop:%(spider)s:queue"},
            "shop:books:queue",
        ),
        ({"SCHEDULER": REDIS_SCHEDULER, "INGEST_CRAWL_ID": "books-may"}, "books-may"),
        ({"SCHEDULER": "scrapy_ingest.scheduler.RedisLeaseScheduler"}, "books:requests"),
    ],
)
def test_crawl_id_defaults_to_the_scrapy_redis_queue_key(
    tmp_path: Path, settings: dict[str, Any], crawl_id: str | None
) -> None:
    crawler = _crawler(tmp_path, **settings)
    crawler.spider = Spider(name="books")
    runtime = IngestRuntime.of(crawler)
    job = make_job(crawler, runtime.config, runtime.new_id)
    assert job.crawl_id == (crawl_id or job.job_id)


def test_the_addon_leases_the_requests_of_scrapy_redis(tmp_path: Path) -> None:
    from scrapy_redis.scheduler import Scheduler

    leasing = "scrapy_ingest.scheduler.RedisLeaseScheduler"
    for scheduler in (REDIS_SCHEDULER, Scheduler):
        assert _crawler(tmp_path, SCHEDULER=scheduler).settings["SCHEDULER"] == leasing
    kept = _crawler(tmp_path, SCHEDULER=REDIS_SCHEDULER, INGEST_REDIS_LEASES=False)
    assert kept.settings["SCHEDULER"] == REDIS_SCHEDULER
    assert _crawler(tmp_path).settings["SCHEDULER"] == "scrapy.core.scheduler.Scheduler"


def test_shared_stats_are_not_counted_twice(redis_server_url: str, tmp_path: Path) -> None:
    """Two crawlers on one RedisStatsCollector hash stand for two processes of a crawl."""
    import redis

    prefix = f"t{secrets.token_hex(4)}"
    settings = {
        "STATS_CLASS": "scrapy_redis.stats.RedisStatsCollector",
        "REDIS_URL": redis_server_url,
        "STATS_KEY": f"{prefix}:%(spider)s:stats",
        "INGEST_METRICS_ENABLED": True,
        "INGEST_METRICS_PORT": False,
    }
    one, other = _crawler(tmp_path, **settings), _crawler(tmp_path, **settings)
    # built with the crawler's components, before the crawl counts anything
    runtime, metrics = IngestRuntime.of(one), PrometheusExtension.from_crawler(one)
    client = redis.Redis.from_url(redis_server_url)
    try:
        for crawler, count in ((one, 5), (other, 7)):
            assert crawler.stats is not None
            for _ in range(count):
                crawler.stats.inc_value("item_scraped_count")
                crawler.stats.inc_value("downloader/response_status_count/200")
            crawler.stats.set_value("downloader/response_bytes", 1000 * count)
            crawler.stats.max_value("ingest/test/max", count)
        assert one.stats is not None
        assert int(one.stats.get_stats()["item_scraped_count"]) == 12  # the whole crawl's

        assert runtime.process_stats.shared
        own = runtime.process_stats.get_stats()
        assert own["item_scraped_count"] == 5
        assert own["downloader/response_status_count/200"] == 5
        assert own["downloader/response_bytes"] == 5000
        assert own["ingest/test/max"] == 5

        samples = {
            (sample.name, sample.labels.get("status_class")): sample.value
            for metric in metrics.registry.collect()
            for sample in metric.samples
        }
        assert samples[("scrapy_ingest_items_scraped_total", None)] == 5
        assert samples[("scrapy_ingest_responses_total", "2xx")] == 5
        assert samples[("scrapy_ingest_response_bytes_total", None)] == 5000
    finally:
        client.delete(f"{prefix}:default:stats")
        client.close()


def test_memory_stats_are_read_as_they_are(tmp_path: Path) -> None:
    crawler = _crawler(tmp_path)
    assert crawler.stats is not None
    crawler.stats.inc_value("item_scraped_count", 3)
    process_stats = IngestRuntime.of(crawler).process_stats
    assert not process_stats.shared
    assert process_stats.get_stats()["item_scraped_count"] == 3


# the scheduler's Redis calls, a worker killed between any two of them


SCRAPY_DEPRECATION = "scrapy.exceptions.ScrapyDeprecationWarning"


class WorkerKilled(Exception):
    """Stands for SIGKILL: raised once the Redis command it follows is done."""


def _scheduler(tmp_path: Path, redis_url: str, prefix: str, queue: str) -> RedisLeaseScheduler:
    """An open scheduler of the crawl *prefix*, as one worker process has it."""
    from scrapy_ingest.scheduler import RedisLeaseScheduler

    crawler = _crawler(
        tmp_path,
        SCHEDULER=REDIS_SCHEDULER,
        SCHEDULER_QUEUE_CLASS=f"scrapy_redis.queue.{queue}",
        DUPEFILTER_CLASS="scrapy_redis.dupefilter.RFPDupeFilter",
        SCHEDULER_PERSIST=True,
        REDIS_URL=redis_url,
        SCHEDULER_QUEUE_KEY=f"{prefix}:%(spider)s:requests",
        SCHEDULER_DUPEFILTER_KEY=f"{prefix}:%(spider)s:dupefilter",
        INGEST_REDIS_LEASE_TIMEOUT=0.2,
    )
    scheduler = RedisLeaseScheduler.from_crawler(crawler)
    scheduler.open(Spider.from_crawler(crawler, name="nodes"))
    return scheduler


def _kill_after(scheduler: RedisLeaseScheduler, commands: int) -> list[str]:
    """Make *scheduler* die (WorkerKilled) once it has sent *commands* more Redis commands,
    through its own client or its dupefilter's; return the commands sent."""
    sent: list[str] = []
    for server in {id(s): s for s in (scheduler.server, scheduler.df.server)}.values():
        send = server.execute_command

        def execute_command(*args: Any, _send: Any = send, **options: Any) -> Any:
            result = _send(*args, **options)
            sent.append(str(args[0]))
            if len(sent) == commands:
                raise WorkerKilled(" ".join(sent))
            return result

        server.execute_command = execute_command
    return sent


# scrapy-redis 0.9.1 on Scrapy 2.19: its enqueue_request and open() use deprecated APIs
@pytest.mark.filterwarnings(f"ignore:Passing a 'spider' argument:{SCRAPY_DEPRECATION}")
@pytest.mark.filterwarnings(f"ignore:Spider.log\\(\\) is deprecated:{SCRAPY_DEPRECATION}")
@pytest.mark.parametrize("queue", ["PriorityQueue", "FifoQueue", "LifoQueue"])
def test_a_worker_killed_while_it_queues_a_link_loses_nothing(
    redis_server_url: str, tmp_path: Path, queue: str
) -> None:
    """A worker parses a page (leased) and queues the link it found; it is killed after each
    Redis command of that in turn. The worker that takes over crawls the page again, queues the
    link again, and must find it in the queue or queue it: never find it seen and not queued."""
    import redis
    from scrapy import Request

    client = redis.Redis.from_url(redis_server_url)
    page, link = "http://example.com/node/0", "http://example.com/node/1"
    commands = 0
    try:
        while True:  # until the worker queues the link before it is killed
            commands += 1
            prefix = f"t{secrets.token_hex(4)}"
            doomed = _scheduler(tmp_path, redis_server_url, prefix, queue)
            try:
                assert doomed.enqueue_request(Request(page))
                leased = doomed.next_request()
                assert leased is not None
                assert leased.url == page
                sent = _kill_after(doomed, commands)
                try:
                    doomed.enqueue_request(Request(link))
                except WorkerKilled:
                    pass
                else:
                    break
                # its last refresh is older than INGEST_REDIS_LEASE_TIMEOUT: presumed dead by
                # the next worker, which puts its lease back in the queue as it opens
                time.sleep(0.5)
                survivor = _scheduler(tmp_path, redis_server_url, prefix, queue)
                crawled: list[str] = []
                try:
                    while (request := survivor.next_request()) is not None:
                        crawled.append(request.url)
                        if request.url == page:  # parsed again: the link found again
                            survivor.enqueue_request(Request(link))
                finally:
                    survivor.close("finished")
                assert crawled.count(page) == 1, sent
                assert crawled.count(link) == 1, f"killed after {sent}: the link is lost"
            finally:
                for server in (doomed.server, doomed.df.server):
                    server.__dict__.pop("execute_command", None)
                doomed.close("finished")
                keys = list(client.scan_iter(f"{prefix}:*"))
                if keys:
                    client.delete(*keys)
        assert commands > 1  # the worker was killed at least once before it was done
    finally:
        client.close()


# crawls


@pytest.mark.crawl
@pytest.mark.slow
def test_three_workers_crawl_each_page_once(
    frontier: Frontier, site: LocalSite, pg_url: str
) -> None:
    frontier.seed(site.url(f"/node/0?total={PAGES}&fanout=10&ms=0"))
    # scrapy-redis's shared stats collector: the job rows must still count per process
    stats = {
        "STATS_CLASS": "scrapy_redis.stats.RedisStatsCollector",
        "STATS_KEY": f"{frontier.prefix}:%(spider)s:stats",
        # scrapy-redis 0.9.1's get_value() turns every value into an int, and fails on the
        # start_time that LogStats reads at close (docs/distributed.md says so)
        "EXTENSIONS": {"scrapy.extensions.logstats.LogStats": None},
    }
    workers = [frontier.start(settings=stats) for _ in range(3)]
    results = [worker.wait() for worker in workers]

    hits = node_hits(site)
    assert sorted(hits) == list(range(PAGES))
    assert set(hits.values()) == {1}, [k for k, n in hits.items() if n > 1][:20]

    db = Database(pg_url)
    rows = db.query("SELECT item_key, count(*) FROM ingest_items GROUP BY item_key")
    assert sorted(int(key) for key, _ in rows) == list(range(PAGES))
    assert {count for _, count in rows} == {1}

    jobs = db.rows("ingest_jobs")
    assert len(jobs) == 3
    assert {job["crawl_id"] for job in jobs} == {frontier.queue_key}
    assert {job["status"] for job in jobs} == {"finished"}
    assert {job["job_id"] for job in jobs} == {result["job_id"] for result in results}
    # the work was shared: every worker crawled some pages
    assert all(job["items_count"] > 0 for job in jobs), [job["items_count"] for job in jobs]
    assert sum(job["items_count"] for job in jobs) == PAGES
    for job in jobs:  # this process's stats, not the whole crawl's
        assert job["stats"]["item_scraped_count"] == job["items_count"]
        assert job["stats"]["ingest/items/stored"] == job["items_count"]
    shared = frontier.client.hgetall(f"{frontier.prefix}:nodes:stats")
    assert int(shared[b"item_scraped_count"]) == PAGES

    db.script(crawl_query())
    (crawl,) = db.query(
        "SELECT crawl_id, jobs, running, items, requests, errors FROM ingest_crawls"
    )
    requests = db.count("ingest_requests")
    assert crawl == (frontier.queue_key, 3, 0, PAGES, requests, 0)
    assert requests == PAGES
    # leases: all given back, none left over
    assert int(frontier.client.get(f"{frontier.queue_key}:leased") or 0) == 0
    assert not list(frontier.client.scan_iter(f"{frontier.queue_key}:leases:*"))


@pytest.mark.crawl
@pytest.mark.slow
def test_a_killed_worker_loses_nothing(frontier: Frontier, site: LocalSite, pg_url: str) -> None:
    settings = {"INGEST_REDIS_LEASE_TIMEOUT": 3.0}
    frontier.seed(site.url(f"/node/0?total={PAGES}&fanout=10&ms=40"))
    doomed = frontier.start(settings=settings, concurrency=16)
    others = [frontier.start(settings=settings) for _ in range(2)]
    db = Database(pg_url)
    wait_for(
        lambda: db.table_exists("ingest_items") and db.count("ingest_items") >= 300,
        timeout=60,
        interval=0.1,
        what="300 items stored",
    )
    leased = frontier.client.hgetall(_lease_key(frontier, doomed))
    doomed.process.send_signal(signal.SIGKILL)
    doomed.process.wait()
    assert leased, "the worker was killed holding no lease: the test proves nothing"
    replacement = frontier.start(settings=settings)
    results = [worker.wait() for worker in [*others, replacement]]

    hits = node_hits(site)
    assert sorted(hits) == list(range(PAGES))  # nothing lost
    rows = db.query("SELECT item_key, count(*) FROM ingest_items GROUP BY item_key")
    assert sorted(int(key) for key, _ in rows) == list(range(PAGES))
    assert {count for _, count in rows} == {1}  # nothing stored twice
    requeued = sum(result["stats"].get("ingest/redis/requeued", 0) for result in results)
    assert requeued >= 1
    # only what the killed worker held can have been fetched twice
    assert sum(n - 1 for n in hits.values()) <= requeued
    jobs = db.rows("ingest_jobs")
    assert len(jobs) == 4
    assert {job["crawl_id"] for job in jobs} == {frontier.queue_key}
    assert int(frontier.client.get(f"{frontier.queue_key}:leased") or 0) == 0


@pytest.mark.crawl
@pytest.mark.slow
def test_live_workers_mark_a_killed_worker_crashed(
    frontier: Frontier, site: LocalSite, pg_url: str
) -> None:
    """No process starts against the database after the kill: the heartbeats of the workers
    still running mark the killed worker's row crashed (three missed heartbeats)."""
    heartbeat = 0.5
    settings = {"INGEST_JOB_HEARTBEAT": heartbeat, "INGEST_REDIS_LEASE_TIMEOUT": 2.0}
    # 500 pages of 100 ms on 2 x 4 slots: the survivors crawl for some 4 s after the kill
    # (eight heartbeats), then idle for 2 s
    frontier.seed(site.url("/node/0?total=500&fanout=10&ms=100"))
    workers = [frontier.start(settings=settings, concurrency=4, max_idle=2) for _ in range(3)]
    doomed, survivors = workers[0], workers[1:]
    db = Database(pg_url)

    def all_at_work() -> bool:
        # every worker has stored items and refreshed its row since
        working = "status = 'running' AND items_count > 0"
        return db.table_exists("ingest_jobs") and db.count("ingest_jobs", working) == 3

    wait_for(all_at_work, timeout=30, interval=0.1, what="three workers at work")
    doomed.process.send_signal(signal.SIGKILL)
    doomed.process.wait()

    def doomed_row() -> dict[str, Any]:
        (row,) = db.rows("ingest_jobs", "pid = %s", (doomed.process.pid,))
        return row

    wait_for(
        lambda: doomed_row()["status"] != "running",
        timeout=15,
        interval=0.1,
        what="the killed worker's row marked crashed",
    )
    # marked by the survivors: no other process has opened the database
    assert all(worker.process.poll() is None for worker in survivors)
    results = [worker.wait() for worker in survivors]

    crashed = doomed_row()
    assert (crashed["status"], crashed["close_reason"]) == ("crashed", "crashed")
    assert crashed["finished_at"] == crashed["updated_at"]  # its last refresh
    alive = {result["job_id"] for result in results}
    jobs = db.rows("ingest_jobs")
    assert {job["crawl_id"] for job in jobs} == {frontier.queue_key}
    statuses = {job["job_id"]: job["status"] for job in jobs}
    assert statuses == {**dict.fromkeys(alive, "finished"), crashed["job_id"]: "crashed"}
    assert any(crashed["job_id"] in worker.log() for worker in survivors)
    # the survivors took over the killed worker's pages: the whole tree is stored
    assert db.count("ingest_items") == 500


@pytest.mark.exclusive
@pytest.mark.crawl
@pytest.mark.slow
def test_a_worker_killed_while_it_holds_retries_loses_none(
    frontier: Frontier, site: LocalSite, pg_url: str
) -> None:
    """Every page answers its first hit with a 503 and ``Retry-After: 60``: the first worker
    holds the retries for a minute (BackoffRetryMiddleware), and is killed meanwhile; the other
    worker crawls them, long before the minute is over."""
    pages = 5
    settings = {
        "INGEST_RETRY_ENABLED": True,
        "INGEST_REDIS_LEASE_TIMEOUT": 1.5,
        "INGEST_JOB_HEARTBEAT": 1.0,
    }
    # pages without links; their 503 comes after 1 s, so that all are asked for before the first
    # 503 pauses the domain (a page not asked for yet would get its 503 from the other worker)
    urls = [site.url(f"/node/{k}?total=0&busy=60&ms=1000") for k in range(pages)]
    for url in urls:
        frontier.seed(url)
    doomed = frontier.start(settings=settings)
    wait_for(lambda: len(site.hits) >= pages, timeout=60, what="a 503 for every page")
    other = frontier.start(settings=settings, max_idle=3)
    db = Database(pg_url)

    def job(worker: Worker) -> dict[str, Any] | None:
        rows = db.rows("ingest_jobs", "pid = %s", (worker.process.pid,))
        return rows[0] if rows else None

    def only_retries_held() -> bool:
        # the leases of the requests that got the 503s are given back: the doomed worker holds
        # nothing but the retries it set aside (its stats, in its job row at each heartbeat)
        row = job(doomed) if db.table_exists("ingest_jobs") else None
        stats = (row or {}).get("stats") or {}
        return int(stats.get("ingest/redis/leases_returned", 0)) >= pages

    wait_for(only_retries_held, timeout=30, interval=0.1, what="the 503s' leases given back")
    wait_for(lambda: job(other), timeout=30, interval=0.1, what="the other worker started")
    assert len(site.hits) == pages  # still in the pause: the doomed worker retried nothing
    doomed.process.send_signal(signal.SIGKILL)
    doomed.process.wait()
    result = other.wait()

    visits = [v for v in site.visits if v.path.startswith("/node/")]
    assert Counter(v.path for v in visits) == {url.split(site.base_url)[1]: 2 for url in urls}
    first, last = visits[0].time, visits[-1].time
    assert last - first < 30  # crawled by the other worker, not after the minute
    rows = db.query("SELECT item_key FROM ingest_items")
    assert sorted(int(key) for (key,) in rows) == list(range(pages))  # none lost
    assert result["stats"]["ingest/redis/requeued"] == pages
    assert result["stats"]["item_scraped_count"] == pages
    assert int(frontier.client.get(f"{frontier.queue_key}:leased") or 0) == 0
    assert not list(frontier.client.scan_iter(f"{frontier.queue_key}:leases:*"))


def _lease_key(frontier: Frontier, worker: Worker) -> str:
    pattern = f"{frontier.queue_key}:leases:*:{worker.process.pid}:*"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        keys = list(frontier.client.scan_iter(pattern))
        if keys:
            return str(keys[0].decode())
        time.sleep(0.05)
    raise AssertionError(f"no lease of worker {worker.process.pid}:\n{worker.log()[-4000:]}")
