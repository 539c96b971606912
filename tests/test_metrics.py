"""The Prometheus extension over real HTTP: /metrics while the crawl runs, /healthz, a real
Prometheus server scraping it, a real pushgateway, and two crawlers in one process."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any

import pytest
import services
from _helpers import REPO_DIR, Crawl, Database, run_list_crawl, wait_for
from conftest import service_missing
from services import free_port, port_answers, stop_process

if TYPE_CHECKING:
    from pathlib import Path

    from services import LocalSite

pytestmark = pytest.mark.crawl

MONITORING = REPO_DIR / "examples" / "monitoring"
METRICS_LINE = re.compile(r"Prometheus metrics on http://127\.0\.0\.1:(\d+)/metrics")


def _slow_crawl(
    site: LocalSite, db_url: str, tmp_path: Path, pages: int = 30, **settings: Any
) -> Crawl:
    # pages of 300 ms, 2 at a time: 30 pages make a crawl of about 5 s to watch
    return Crawl(
        {
            "base_url": site.base_url,
            "pages": pages,
            "per_page": 3,
            "delay_ms": 300,
            "settings": {
                "INGEST_DATABASE_URL": db_url,
                "INGEST_METRICS_ENABLED": True,
                "INGEST_METRICS_PORT": 0,
                "CONCURRENT_REQUESTS": 2,
                "INGEST_FLUSH_INTERVAL": 0.2,
                **settings,
            },
        },
        tmp_path,
    )


def _port(crawl: Crawl) -> int:
    def found() -> int | None:
        match = METRICS_LINE.search(crawl.log_path.read_text(errors="replace"))
        return int(match[1]) if match else None

    return int(wait_for(found, timeout=60, what="the metrics port in the crawl log"))


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.headers.get("Content-Type", ""), answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read().decode()


def _value(text: str, name: str) -> float | None:
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match[1]) if match else None


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of the example dashboard, with Grafana's variables
    replaced as Grafana does for "All" spiders."""
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [
        (panel["title"], t["expr"].replace("$spider", ".*").replace("$__rate_interval", "1m"))
        for panel in dashboard["panels"]
        for t in panel.get("targets", [])  # a row has none
    ]


def dashboard_metrics() -> set[str]:
    exprs = [expr for _, expr in dashboard_queries()]
    return set(re.findall(r"scrapy_ingest_\w+", " ".join(exprs)))


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample of *name* that has *labels* (among others), if served."""
    for match in re.finditer(rf"^{re.escape(name)}{{([^}}]*)}} (\S+)$", text, re.MULTILINE):
        if all(f'{key}="{value}"' in match[1].split(",") for key, value in labels.items()):
            return float(match[2])
    return None


def test_the_example_prometheus_configuration_is_valid() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        service_missing("promtool is not installed (apt-get install -y prometheus)")
    done = subprocess.run(
        [promtool, "check", "config", str(MONITORING / "prometheus.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_metrics_and_health_over_http_while_the_crawl_runs(
    site: LocalSite, sqlite_url: str, tmp_path: Path
) -> None:
    crawl = _slow_crawl(site, sqlite_url, tmp_path, INGEST_METRICS_LABELS={"team": "pricing"})
    try:
        base = f"http://127.0.0.1:{_port(crawl)}"
        first = wait_for(
            lambda: _value(_get(f"{base}/metrics")[2], "scrapy_ingest_items_scraped_total"),
            timeout=30,
            what="a first item",
        )
        status, content_type, text = _get(f"{base}/metrics")
        assert status == 200 and content_type.startswith("text/plain")
        assert 'spider="ingest_test"' in text and 'team="pricing"' in text
        assert "scrapy_ingest_download_latency_seconds_bucket" in text
        # every metric of the example Grafana dashboard is served (the proxies' only with
        # proxies: test_a_real_prometheus_scrapes_the_crawl_for_the_dashboard has some)
        served = set(re.findall(r"^(scrapy_ingest_\w+?)(?:{| )", text, re.MULTILINE))
        for name, kind in re.findall(r"^# TYPE (scrapy_ingest_\w+) (\w+)", text, re.MULTILINE):
            # families with no sample yet (no retries so far) are declared all the same
            suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
            served |= {name + suffix for suffix in suffixes}
            served.add(name if kind != "counter" or name.endswith("_total") else name + "_total")
        expected = {name for name in dashboard_metrics() if "_prox" not in name}
        assert expected <= served, expected - served
        status, content_type, body = _get(f"{base}/healthz")
        # as docs/metrics.md shows it
        assert (status, content_type) == (200, "application/json")
        assert json.loads(body) == {"status": "ok", "reason": "ok"}
        later = wait_for(
            lambda: (
                (v := _value(_get(f"{base}/metrics")[2], "scrapy_ingest_items_scraped_total"))
                and v > first
                and v
            ),
            timeout=30,
            what="the item counter to grow",
        )
        assert later > first
        # OpenMetrics, when asked
        request = urllib.request.Request(
            f"{base}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.headers["Content-Type"].startswith("application/openmetrics-text")
            assert answer.read().decode().rstrip().endswith("# EOF")
        result = crawl.wait()
    finally:
        crawl.kill()
    result.assert_clean()
    # the port is on the job row, in its stats; the server is gone with the crawl
    [job] = Database(sqlite_url).rows("ingest_jobs")
    assert job["stats"]["ingest/metrics/port"] == int(base.rsplit(":", 1)[1])
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{base}/metrics", timeout=2)


def test_counters_with_known_labels_are_at_zero_before_the_first_event(
    site: LocalSite, sqlite_url: str, tmp_path: Path
) -> None:
    # pages of 3 s: the tables are ready long before the first item, and a dashboard shows 0
    # for them, not "No data"
    crawl = _slow_crawl(site, sqlite_url, tmp_path, pages=4, delay_ms=3000)
    try:
        metrics = f"http://127.0.0.1:{_port(crawl)}/metrics"
        where = {"backend": sqlite_url, "table": "ingest_items"}
        text = wait_for(
            lambda: (
                (answer := _get(metrics)[2])
                and _sample(answer, "scrapy_ingest_ingest_rows_failed_total", **where) is not None
                and answer
            ),
            timeout=30,
            what="the items table's rows-failed series",
        )
        result = crawl.wait()
    finally:
        crawl.kill()
    result.assert_clean()
    assert _value(text, "scrapy_ingest_items_scraped_total") == 0, text  # no event yet
    for table in ("ingest_items", "ingest_requests", "ingest_logs", "ingest_dead_letters"):
        where = {"backend": sqlite_url, "table": table}
        for name in ("rows_written", "rows_failed"):
            assert _sample(text, f"scrapy_ingest_ingest_{name}_total", **where) == 0, table
    for kind in ("items", "requests", "logs"):
        assert _sample(text, "scrapy_ingest_ingest_dead_letters_total", kind=kind) == 0, text
    # what RetryMiddleware retries: RETRY_HTTP_CODES and RETRY_EXCEPTIONS
    retries = "scrapy_ingest_retries_total"
    assert _sample(text, retries, reason="503 Service Unavailable") == 0, text
    assert _sample(text, retries, reason="builtins.OSError") == 0, text
    assert _sample(text, "scrapy_ingest_download_exceptions_total", exception="OSError") == 0
    assert "scrapy_ingest_proxies" not in text  # no proxy, no proxy metrics


def test_a_finished_crawl_tells_its_last_scrape(
    site: LocalSite, sqlite_url: str, tmp_path: Path
) -> None:
    """scrapy_ingest_finished is 0 while the crawl runs and 1 in the last scrape, which a crawl
    scraped regularly waits for at close: an alert tells a finished crawl from a crashed one
    (docs/alerting.md). The bounds of the buffer and of the spill journal are served too."""
    crawl = _slow_crawl(
        site, sqlite_url, tmp_path, pages=10, INGEST_MAX_BUFFER_BYTES=32 * 1024 * 1024
    )
    scrapes: list[str] = []
    try:
        metrics = f"http://127.0.0.1:{_port(crawl)}/metrics"
        while True:  # a scraper every second, as Prometheus with scrape_interval: 1s
            try:
                scrapes.append(_get(metrics)[2])
            except OSError:  # the crawl no longer serves
                break
            time.sleep(1)
        result = crawl.wait()
    finally:
        crawl.kill()
    result.assert_clean()
    assert len(scrapes) >= 2, scrapes
    assert _value(scrapes[0], "scrapy_ingest_finished") == 0, scrapes[0]
    assert _value(scrapes[-1], "scrapy_ingest_finished") == 1, scrapes[-1]
    assert _value(scrapes[-1], "scrapy_ingest_items_scraped_total") == 30  # the final counts
    assert _value(scrapes[0], "scrapy_ingest_ingest_max_buffer_bytes") == 32 * 1024 * 1024
    assert _value(scrapes[0], "scrapy_ingest_ingest_spill_max_bytes") == 5 * 1024**3


def test_health_goes_unhealthy_when_postgresql_stops(site: LocalSite, tmp_path: Path) -> None:
    bindir = services.find_pg_bindir()
    if bindir is None:
        service_missing("no PostgreSQL binaries (apt-get install -y postgresql)")
    with contextlib.ExitStack() as stack:
        # a server of this test's own, which it stops and starts again
        server = services.LocalPostgres(bindir)
        stack.callback(server.stop)
        try:
            server_url = server.start()
        except services.ServiceUnavailable as exc:
            service_missing(str(exc))
        url = services.with_database(server_url, services.create_database(server_url))
        crawl = _slow_crawl(
            site, url, tmp_path, INGEST_METRICS_UNHEALTHY_AFTER=1, INGEST_RETRY_TIMEOUT=60
        )
        try:
            base = f"http://127.0.0.1:{_port(crawl)}"
            wait_for(lambda: _get(f"{base}/healthz")[0] == 200, timeout=30, what="healthy")
            server.pause()  # the database goes away mid-crawl
            _, _, body = wait_for(
                lambda: (answer := _get(f"{base}/healthz"))[0] == 503 and answer,
                timeout=30,
                what="/healthz to say 503",
            )
            answer = json.loads(body)
            assert answer.keys() == {"status", "reason"} and answer["status"] == "unhealthy"
            waited = r"a batch has waited \d+ s for its database \(limit 1 s\)"
            assert re.fullmatch(waited, answer["reason"]), answer
            assert _value(_get(f"{base}/metrics")[2], "scrapy_ingest_healthy") == 0
            server.resume()  # back: the crawl ends normally, nothing lost
            result = crawl.wait()
        finally:
            crawl.kill()
    assert result.stats.get("ingest/items/lost", 0) == 0
    assert result.stats["ingest/items/stored"] == 90


@pytest.fixture
def prometheus_binary() -> str:
    for name in ("prometheus",):
        if path := shutil.which(name):
            return path
    service_missing("prometheus is not installed (apt-get install -y prometheus)")


def _start(command: list[str], port: int, stack: contextlib.ExitStack) -> None:
    # the server's output, shown if it does not start
    log = stack.enter_context(tempfile.TemporaryFile())  # noqa: SIM115
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    stack.callback(stop_process, process, 10)
    deadline = time.monotonic() + 30
    while not port_answers(port):
        if process.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            raise AssertionError(f"{command[0]} did not start: {log.read().decode()[-2000:]}")
        time.sleep(0.1)


def test_a_real_prometheus_scrapes_the_crawl_for_the_dashboard(
    site: LocalSite, sqlite_url: str, tmp_path: Path, prometheus_binary: str
) -> None:
    """A healthy crawl through a proxy, as the dashboard expects: every query of every panel
    has a sample (0 when nothing happened, never "No data")."""
    try:
        proxy = services.Proxy(None, None)
        proxy.start()
    except services.ServiceUnavailable as exc:
        service_missing(str(exc))
    metrics_port, prometheus_port = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: crawl\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    with contextlib.ExitStack() as stack:
        stack.callback(proxy.remove)
        _start(
            [prometheus_binary, f"--config.file={config}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prometheus_port}"],
            prometheus_port,
            stack,
        )  # fmt: skip
        # long enough for a Prometheus that starts slowly on a busy machine to scrape it
        crawl = _slow_crawl(
            site,
            sqlite_url,
            tmp_path,
            pages=90,
            INGEST_METRICS_PORT=metrics_port,
            INGEST_PROXY_LIST=[proxy.url],
        )
        stack.callback(crawl.kill)
        api = f"http://127.0.0.1:{prometheus_port}/api/v1/query?"

        def query(expr: str) -> list[dict[str, Any]] | None:
            status, _, body = _get(api + urllib.parse.urlencode({"query": expr}))
            if status != 200:  # still starting ("Service Unavailable")
                return None
            results: list[dict[str, Any]] = json.loads(body)["data"]["result"]
            return results

        def scraped() -> float | None:
            results = query("scrapy_ingest_items_scraped_total")
            value = float(results[0]["value"][1]) if results else 0.0
            return value if value > 0 else None

        value = wait_for(scraped, timeout=60, interval=0.5, what="Prometheus to see items")
        assert value > 0
        # while the crawl runs (its series go stale once it ends): rate() needs two scrapes,
        # a latency quantile some responses, which the crawl has by now
        empty = dashboard_queries()
        deadline = time.monotonic() + 20
        while empty and time.monotonic() < deadline and crawl.running:
            empty = [(title, expr) for title, expr in empty if not query(expr)]
            time.sleep(0.5)
        assert not empty, "dashboard queries without a sample:\n" + "\n".join(map(str, empty))
        result = crawl.wait()
    result.assert_clean()
    assert result.stats["ingest/proxy/good"] > 0  # through the proxy


def test_metrics_are_pushed_to_a_real_pushgateway(
    site: LocalSite, sqlite_url: str, tmp_path: Path
) -> None:
    binary = shutil.which("prometheus-pushgateway")
    if binary is None:
        service_missing("prometheus-pushgateway is not installed (apt-get install -y ...)")
    port = free_port()
    with contextlib.ExitStack() as stack:
        _start(
            [binary, f"--web.listen-address=127.0.0.1:{port}", "--persistence.file="], port, stack
        )
        crawl = _slow_crawl(
            site,
            sqlite_url,
            tmp_path,
            INGEST_METRICS_PORT=False,  # pushes only
            INGEST_METRICS_PUSHGATEWAY=f"http://127.0.0.1:{port}",
            INGEST_METRICS_PUSH_INTERVAL=1,
        )
        try:
            result = crawl.wait()
        finally:
            crawl.kill()
        result.assert_clean()
        assert "Prometheus metrics on" not in result.output  # no server: pushes only
        text = _get(f"http://127.0.0.1:{port}/metrics")[2]
    # the last push, at close, holds the final count
    value = _value(text, "scrapy_ingest_items_scraped_total")
    assert value == result.stats["item_scraped_count"] == 90
    assert _value(text, "scrapy_ingest_finished") == 1
    assert 'job="scrapy_ingest"' in text


def test_two_crawlers_in_one_process_serve_their_own_metrics(
    site: LocalSite, sqlite_url: str, tmp_path: Path
) -> None:
    settings = {"INGEST_METRICS_ENABLED": True, "INGEST_METRICS_PORT": 0}
    twins = [{**settings, "INGEST_JOB_ID": "a"}, {**settings, "INGEST_JOB_ID": "b"}]
    from _helpers import run_crawl

    result = run_crawl(
        {
            "base_url": site.base_url,
            "spider": "tree",
            "twins": True,
            "twin_settings": twins,
            "settings": {"INGEST_DATABASE_URL": sqlite_url},
        },
        tmp_path,
    )
    assert result.returncode == 0, result.describe()
    ports = {int(p) for p in METRICS_LINE.findall(result.output)}
    assert len(ports) == 2
    assert {stats["ingest/metrics/port"] for stats in result.all_stats} == ports
    assert "Duplicated timeseries" not in result.output
    assert "[scrapy_ingest.extensions.metrics] ERROR" not in result.output


def test_proxy_gauges_and_bans_reach_the_pushgateway(site: LocalSite, tmp_path: Path) -> None:
    binary = shutil.which("prometheus-pushgateway")
    if binary is None:
        service_missing("prometheus-pushgateway is not installed (apt-get install -y ...)")
    port = free_port()
    dead_proxies = [f"http://u:pw@127.0.0.1:{free_port()}" for _ in range(2)]
    with contextlib.ExitStack() as stack:
        _start(
            [binary, f"--web.listen-address=127.0.0.1:{port}", "--persistence.file="], port, stack
        )
        settings = {
            "INGEST_PROXY_LIST": dead_proxies,
            "INGEST_PROXY_BACKOFF_BASE": 30.0,
            "INGEST_PROXY_BACKOFF_MAX": 30.0,
            "INGEST_PROXY_ALL_DEAD_TIMEOUT": 1.0,
            "INGEST_METRICS_ENABLED": True,
            "INGEST_METRICS_PORT": False,
            "INGEST_METRICS_PUSHGATEWAY": f"http://127.0.0.1:{port}",
        }
        plan = {"requests": [{"url": site.url(f"/via?n={n}")} for n in range(4)]}
        result = run_list_crawl({**plan, "settings": settings}, tmp_path)
        text = _get(f"http://127.0.0.1:{port}/metrics")[2]
    assert result["stats"]["finish_reason"] == "ingest_no_proxies"
    benched = re.search(r'^scrapy_ingest_proxies{[^}]*state="benched"[^}]*} (\S+)$', text, re.M)
    assert benched and float(benched[1]) == 2, text
    found = re.findall(r'^scrapy_ingest_proxy_bans_total{.*reason="(\w+)".*} (\S+)$', text, re.M)
    bans = {reason: float(count) for reason, count in found}
    counted = {reason: count for reason, count in bans.items() if count}
    assert counted and all("Refused" in reason for reason in counted), bans
    assert sum(counted.values()) >= 2
    # the statuses of INGEST_PROXY_BAN_CODES are served at 0 from the start
    assert bans["403"] == 0 and all(bans[r] == 0 for r in bans if r.isdigit()), bans
    assert "127.0.0.1" not in "".join(line for line in text.splitlines() if "proxy" in line)
