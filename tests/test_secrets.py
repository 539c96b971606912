"""Planted secrets (database passwords, a proxy's password, Authorization and Cookie headers, a
secret setting) are found in no table, no spill file, no log line and no metrics output, with
every component on."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import time
import urllib.request
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import pytest
import services
from _helpers import Database, ingest_replay, run_crawl
from conftest import service_missing
from services import TREE_COOKIE, free_port, port_answers, running_tinyproxy, stop_process

if TYPE_CHECKING:
    from pathlib import Path

    from services import LocalSite

pytestmark = [pytest.mark.crawl, pytest.mark.postgres]

SECRETS = {
    "items_db": "items-db-pw-planted-81a",
    "requests_db": "requests-db-pw-planted-93b",
    "proxy": "proxy-pw-planted-47c",
    "bearer": "bearer-planted-15d",
    "setting": "aws-secret-planted-62e",
}


def _postgres(stack: ExitStack, password: str) -> tuple[services.LocalPostgres, str]:
    try:
        return services.own_postgres(stack, password)
    except services.ServiceUnavailable as exc:
        service_missing(str(exc))


def _pushgateway(stack: ExitStack) -> str:
    binary = shutil.which("prometheus-pushgateway")
    if binary is None:
        service_missing("prometheus-pushgateway is not installed (apt-get install -y ...)")
    port = free_port()
    process = subprocess.Popen(
        [binary, f"--web.listen-address=127.0.0.1:{port}", "--persistence.file="],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stack.callback(stop_process, process, 10)
    deadline = time.monotonic() + 30
    while not port_answers(port):
        assert process.poll() is None and time.monotonic() < deadline, "no pushgateway"
        time.sleep(0.1)
    return f"http://127.0.0.1:{port}"


def _all_text(url: str) -> str:
    db = Database(url)
    tables = [
        name
        for (name,) in db.query(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        )
    ]
    return "\n".join(
        text
        for table in tables
        for (text,) in db.query(f"SELECT row_to_json(t)::text FROM {table} AS t")
    )


def _forms(secret: str) -> set[str]:
    """Every form a secret can take in what is stored: as it is, URL-encoded (once, and twice
    inside another URL), and in the base64 of ``user:secret`` of a Basic ``Authorization`` or
    ``Proxy-Authorization`` header (the proxy's user is ``proxyuser``)."""
    forms = {secret, quote(secret, safe=""), quote(quote(secret, safe=""), safe="")}
    for user in ("proxyuser", ""):
        forms.add(base64.b64encode(f"{user}:{secret}".encode()).decode())
    return forms


def _assert_no_secret(where: str, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    for name, secret in [*SECRETS.items(), ("session cookie", TREE_COOKIE)]:
        for form in _forms(secret):
            assert form.encode() not in data, f"the {name} secret ({form!r}) is in {where}"


def test_planted_secrets_are_nowhere(site: LocalSite, tmp_path: Path) -> None:
    with ExitStack() as stack:
        _, items_url = _postgres(stack, SECRETS["items_db"])
        requests_server, requests_url = _postgres(stack, SECRETS["requests_db"])
        requests_server.pause()  # its rows go to the spill journal
        try:
            proxy = stack.enter_context(running_tinyproxy("proxyuser", SECRETS["proxy"]))
        except services.ServiceUnavailable as exc:
            service_missing(str(exc))
        gateway = _pushgateway(stack)
        settings: dict[str, Any] = {
            "INGEST_DATABASE_URL": items_url,
            "INGEST_ROUTES": {"requests": requests_url},
            "INGEST_SPILL_DIR": str(tmp_path / "spill"),
            "INGEST_RETRY_TIMEOUT": 1,
            "INGEST_REQUESTS_STORE_HEADERS": True,
            "INGEST_LOG_LEVEL": "DEBUG",
            "LOG_LEVEL": "DEBUG",
            "INGEST_PROXY_LIST": [proxy.url],
            "INGEST_RETRY_ENABLED": True,
            "INGEST_METRICS_ENABLED": True,
            "INGEST_METRICS_PORT": False,
            "INGEST_METRICS_PUSHGATEWAY": gateway,
            "AWS_SECRET_ACCESS_KEY": SECRETS["setting"],
        }
        result = run_crawl(
            {
                "base_url": site.base_url,
                "spider": "tree",
                "headers": {"Authorization": f"Bearer {SECRETS['bearer']}"},
                "settings": settings,
            },
            tmp_path,
        )
        assert result.returncode == 0, result.describe()
        stats = result.stats
        assert stats["ingest/requests/spilled"] > 0, result.describe()
        assert stats["ingest/proxy/good"] > 0  # through the proxy, with its password
        assert "/page/0?total=4" in proxy.log()
        # Scrapy itself prints the settings a crawl overrides when the crawler starts (before
        # any component of ours runs): the one place the secret setting may be
        scrapys_own = [line for line in result.output.splitlines() if SECRETS["setting"] in line]
        assert all(
            line.lstrip("{ ").startswith("'AWS_SECRET_ACCESS_KEY'") for line in scrapys_own
        ), scrapys_own
        output = result.output.replace(SECRETS["setting"], "")
        _assert_no_secret("the crawl log", output)
        with urllib.request.urlopen(f"{gateway}/metrics", timeout=10) as answer:
            metrics = answer.read().decode()
        assert "scrapy_ingest_proxies" in metrics
        spilled = re.search(
            r"^scrapy_ingest_ingest_spilled_batches_total{.*} (\S+)$", metrics, re.M
        )
        assert spilled and float(spilled[1]) == stats["ingest/spill/batches"], metrics
        _assert_no_secret("the metrics", metrics)
        files = [p for p in (tmp_path / "spill").rglob("*") if p.is_file()]
        assert any(p.name.endswith(".batch") for p in files)
        for path in files:
            _assert_no_secret(f"the spill file {path.name}", path.read_bytes())
        items_text = _all_text(items_url)
        assert '"Authorization": ["***"]' not in items_text  # headers are in the requests' db
        assert SECRETS["setting"] not in items_text and "AWS_SECRET_ACCESS_KEY" in items_text
        _assert_no_secret("the items database", items_text)

        requests_server.resume()
        replay = ingest_replay(
            {
                "INGEST_DATABASE_URL": items_url,
                "INGEST_ROUTES": {"requests": requests_url},
                "INGEST_SPILL_DIR": tmp_path / "spill",
            },
            tmp_path,
        )
        assert replay.returncode == 0, replay.stdout + replay.stderr
        _assert_no_secret("the replay command's output", replay.stdout + replay.stderr)
        requests_text = _all_text(requests_url)
        assert '"Authorization": ["***"]' in requests_text.replace('\\"', '"')
        _assert_no_secret("the requests database", requests_text)
