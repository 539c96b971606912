"""The alerting examples of examples/monitoring: the rules checked and unit-tested with promtool
(every alert fires for its series and stays quiet for a healthy crawl), the Alertmanager
configuration checked with amtool, and end to end: a real Prometheus scrapes a crawl whose
PostgreSQL stops, evaluates alerts.yml, and a real Alertmanager, configured by
alertmanager.yml, delivers ScrapyIngestDatabaseDown to a webhook this test runs."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import pytest
import services
from _helpers import wait_for
from conftest import service_missing
from services import free_port
from test_metrics import (  # noqa: F401 (prometheus_binary: a fixture)
    MONITORING,
    _get,
    _slow_crawl,
    _start,
    prometheus_binary,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from services import LocalSite

ALERTS = MONITORING / "alerts.yml"
ALERTS_TEST = MONITORING / "alerts_test.yml"
ALERTMANAGER = MONITORING / "alertmanager.yml"
#: the webhook of the example, replaced by the test's own
EXAMPLE_WEBHOOK = "http://127.0.0.1:5001/alerts"
#: the spider of tests/_crawl_script.py
SPIDER = "ingest_test"


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        service_missing(f"{name} is not installed (apt-get install -y {package})")
    return path


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)


def _alert_names() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)$", ALERTS.read_text(), re.MULTILINE)


def _tested_alerts() -> tuple[set[str], set[str]]:
    """(alerts expected to fire, alerts expected to stay quiet) in alerts_test.yml."""
    firing, quiet = set(), set()
    cases = re.finditer(
        r"^\s*alertname: (\w+)\n\s*exp_alerts:( \[\])?$", ALERTS_TEST.read_text(), re.MULTILINE
    )
    for case in cases:
        (quiet if case[2] else firing).add(case[1])
    return firing, quiet


def test_the_alerting_rules_are_valid() -> None:
    done = _run([_tool("promtool", "prometheus"), "check", "rules", str(ALERTS)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_alert_names())} rules found" in done.stdout


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    names = _alert_names()
    assert len(names) == len(set(names)) >= 10, names
    firing, quiet = _tested_alerts()
    assert set(names) - firing == set(), "alerts without a unit test where they fire"
    assert set(names) - quiet == set(), "alerts without a unit test where they stay quiet"
    assert firing | quiet <= set(names), "unit tests of alerts that alerts.yml does not have"


def test_the_unit_tests_of_the_alerting_rules_pass() -> None:
    done = _run([_tool("promtool", "prometheus"), "test", "rules", str(ALERTS_TEST)])
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_names_the_spider_and_links_its_runbook() -> None:
    text = ALERTS.read_text()
    docs = (MONITORING.parent.parent / "docs" / "alerting.md").read_text()
    for rule in re.split(r"\n(?=[ ]*- alert: )", text)[1:]:
        name = re.search(r"- alert: (\w+)", rule)
        assert name is not None
        assert re.search(r"severity: (critical|warning)\n", rule), rule
        for annotation in ("summary", "description"):
            value = re.search(rf"{annotation}: (>-\n(?:\s{{12}}.*\n?)+|.*)", rule)
            assert value is not None and "{{ $labels.spider }}" in value[1], (name[1], annotation)
        anchor = name[1].lower()
        assert f'alerting.md#{anchor}"' in rule, name[1]
        assert f"\n### {name[1]}\n" in docs, f"docs/alerting.md has no section {name[1]}"


def test_the_alertmanager_configuration_is_valid() -> None:
    done = _run([_tool("amtool", "prometheus-alertmanager"), "check-config", str(ALERTMANAGER)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert EXAMPLE_WEBHOOK in ALERTMANAGER.read_text()


class Webhook:
    """A webhook receiver on 127.0.0.1: keeps the JSON payloads Alertmanager POSTs."""

    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []
        payloads = self.payloads

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                payloads.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def alerts(self, name: str) -> list[dict[str, Any]]:
        return [
            alert
            for payload in list(self.payloads)
            for alert in payload["alerts"]
            if alert["labels"].get("alertname") == name and alert["status"] == "firing"
        ]


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    receiver = Webhook()
    yield receiver
    receiver.stop()


@pytest.fixture
def alertmanager_binary() -> str:
    return _tool("prometheus-alertmanager", "prometheus-alertmanager")


def fast_rules(tmp_path: Path) -> Path:
    """alerts.yml with every ``for:`` at 1 s, for a test that cannot wait minutes."""
    rules = tmp_path / "alerts.yml"
    rules.write_text(re.sub(r"^(\s+for:) \w+$", r"\1 1s", ALERTS.read_text(), flags=re.MULTILINE))
    return rules


def fast_alertmanager(tmp_path: Path, webhook_url: str) -> Path:
    """alertmanager.yml with the test's webhook and its waits at 1 s."""
    text = ALERTMANAGER.read_text().replace(EXAMPLE_WEBHOOK, webhook_url)
    text = re.sub(r"^(\s+group_(?:wait|interval):) \w+$", r"\1 1s", text, flags=re.MULTILINE)
    config = tmp_path / "alertmanager.yml"
    config.write_text(text)
    return config


@pytest.mark.crawl
@pytest.mark.postgres
def test_a_database_down_mid_crawl_reaches_the_webhook(
    site: LocalSite,
    tmp_path: Path,
    prometheus_binary: str,  # noqa: F811 (the fixture imported above)
    alertmanager_binary: str,
    webhook: Webhook,
) -> None:
    metrics_port, prometheus_port, alertmanager_port = free_port(), free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files: ['{fast_rules(tmp_path)}']\n"
        "alerting:\n  alertmanagers:\n    - static_configs:\n"
        f"        - targets: ['127.0.0.1:{alertmanager_port}']\n"
        "scrape_configs:\n  - job_name: scrapy_ingest\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    with contextlib.ExitStack() as stack:
        try:
            server, url = services.own_postgres(stack)
        except services.ServiceUnavailable as exc:
            service_missing(str(exc))
        _start(
            [alertmanager_binary, f"--config.file={fast_alertmanager(tmp_path, webhook.url)}",
             f"--storage.path={tmp_path / 'alertmanager'}",
             f"--web.listen-address=127.0.0.1:{alertmanager_port}",
             "--cluster.listen-address="],
            alertmanager_port,
            stack,
        )  # fmt: skip
        _start(
            [prometheus_binary, f"--config.file={config}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prometheus_port}"],
            prometheus_port,
            stack,
        )  # fmt: skip
        crawl = _slow_crawl(
            site,
            url,
            tmp_path,
            pages=120,
            INGEST_METRICS_PORT=metrics_port,
            INGEST_METRICS_UNHEALTHY_AFTER=1,
            INGEST_RETRY_TIMEOUT=60,
        )
        stack.callback(crawl.kill)
        api = f"http://127.0.0.1:{prometheus_port}/api/v1/query?query="

        def healthy_scraped() -> bool:
            status, _, body = _get(api + "scrapy_ingest_healthy")
            results = json.loads(body)["data"]["result"] if status == 200 else []
            return bool(results) and results[0]["value"][1] == "1"

        wait_for(healthy_scraped, timeout=30, interval=0.5, what="Prometheus to scrape the crawl")
        assert webhook.alerts("ScrapyIngestDatabaseDown") == []  # healthy: no alert
        server.pause()  # the database goes away mid-crawl
        alerts = wait_for(
            lambda: webhook.alerts("ScrapyIngestDatabaseDown"),
            timeout=30,
            interval=0.5,
            what="the webhook to receive ScrapyIngestDatabaseDown",
        )
        assert crawl.running, "the crawl ended before the alert came: it proves nothing"
    alert = alerts[0]
    assert alert["labels"]["spider"] == SPIDER, alert
    assert alert["labels"]["severity"] == "critical", alert
    assert f"Spider {SPIDER} cannot write to its database" == alert["annotations"]["summary"]
    assert f"spider {SPIDER} on 127.0.0.1:{metrics_port}" in alert["annotations"]["description"]
    assert alert["annotations"]["runbook"].endswith("alerting.md#scrapyingestdatabasedown")
