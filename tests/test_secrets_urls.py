"""Secrets in the URLs a crawl visits (query parameters such as ``token``, ``sig`` and
``X-Amz-Signature``, ``user:password@``) are in no URL column, no stored log line (Scrapy's own
included), no job row and no spill file, in any form (plain, URL-encoded, base64 of
``user:password``): after a crawl with its database up, and after one with it down then
replayed. Against a real PostgreSQL and the real local site."""

from __future__ import annotations

import base64
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import pytest
import services
from _helpers import Database, ingest_replay, run_crawl
from conftest import service_missing

from scrapy_ingest import settings as defaults
from scrapy_ingest._redact import Redactor

if TYPE_CHECKING:
    from pathlib import Path

    from services import LocalSite

pytestmark = [pytest.mark.crawl, pytest.mark.postgres]

TOKEN = "tok-planted-31f"
SIG = "sig-planted-72a"
AMZ = "amzsig-planted-55e"
USER_PASSWORD = "userpw-planted-18c"
OWN = "own-planted-90d"  # a parameter the project adds to INGEST_REDACT_QUERY_PARAMS
QUERY = f"token={TOKEN}&Sig={SIG}&X-Amz-Signature={AMZ}&partner_code={OWN}&page=1"


def _forms(secret: str) -> list[bytes]:
    """Every form a secret can take in what is stored."""
    forms = {secret, quote(secret, safe=""), quote(quote(secret, safe=""), safe="")}
    forms.add(base64.b64encode(f"produser:{secret}".encode()).decode())
    return [form.encode() for form in forms]


def _assert_no_secret(where: str, data: str | bytes) -> None:
    data = data.encode() if isinstance(data, str) else data
    for secret in (TOKEN, SIG, AMZ, USER_PASSWORD, OWN):
        for form in _forms(secret):
            at = data.find(form)
            assert at < 0, f"{form!r} is in {where}: {data[max(at - 300, 0) : at + 100]!r}"


def _stored_text(url: str) -> str:
    """Every row of every table, as JSON text; of the items, the columns we fill (their data is
    the spider's own)."""
    db = Database(url)
    tables = [
        name
        for (name,) in db.query(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        )
    ]
    texts = []
    for table in tables:
        expression = "to_jsonb(t) - 'data'" if table == "ingest_items" else "to_jsonb(t)"
        texts += [text for (text,) in db.query(f"SELECT ({expression})::text FROM {table} t")]
    return "\n".join(texts)


def _args(site: LocalSite, url: str, tmp_path: Path) -> dict[str, Any]:
    refused = f"http://produser:{USER_PASSWORD}@127.0.0.1:{services.free_port()}/x?{QUERY}"
    return {
        "base_url": site.base_url,
        "spider": "tree",
        "query": QUERY,
        "refused_url": refused,
        "headers": {"Referer": f"{site.base_url}/from?sig={SIG}"},
        "settings": {
            "INGEST_DATABASE_URL": url,
            "INGEST_SPILL_DIR": str(tmp_path / "spill"),
            "INGEST_RETRY_TIMEOUT": 1,
            "INGEST_REQUESTS_STORE_HEADERS": True,
            "INGEST_LOG_LEVEL": "DEBUG",
            "LOG_LEVEL": "DEBUG",
            "INGEST_REDACT_QUERY_PARAMS": [*defaults.INGEST_REDACT_QUERY_PARAMS, "partner_code"],
        },
    }


def test_url_secrets_are_nowhere(site: LocalSite, tmp_path: Path) -> None:
    with ExitStack() as stack:
        try:
            server, url = services.own_postgres(stack, "pg-pw-url-secrets")
        except services.ServiceUnavailable as exc:
            service_missing(str(exc))
        # the database up
        result = run_crawl(_args(site, url, tmp_path), tmp_path / "up")
        assert result.returncode == 0, result.describe()
        stored = _stored_text(url)
        assert "token=***" in stored and "X-Amz-Signature=***" in stored, stored[:2000]
        assert "produser:***@" in stored  # Scrapy's "Gave up retrying" line, and the URL
        assert "partner_code=***" in stored and "page=1" in stored
        assert f"/from?sig={SIG}" in result.output  # the secrets were there to be found
        _assert_no_secret("the database", stored)

        # the database down: everything goes to the journal, then the replay command
        Database(url).execute("TRUNCATE ingest_requests, ingest_logs, ingest_jobs, ingest_items")
        server.pause()
        result = run_crawl(_args(site, url, tmp_path), tmp_path / "down")
        assert result.returncode == 0, result.describe()
        assert result.stats["ingest/requests/spilled"] > 0, result.describe()
        files = [p for p in (tmp_path / "spill").rglob("*") if p.is_file()]
        assert any(p.name.endswith(".batch") for p in files)
        for path in files:
            _assert_no_secret(f"the spill file {path.name}", path.read_bytes())
        server.resume()
        settings = {"INGEST_DATABASE_URL": url, "INGEST_SPILL_DIR": tmp_path / "spill"}
        replay = ingest_replay(settings, tmp_path)
        assert replay.returncode == 0, replay.stdout + replay.stderr
        stored = _stored_text(url)
        assert "token=***" in stored
        _assert_no_secret("the database after the replay", stored)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("https://x/a?token=abc&b=1", "https://x/a?token=***&b=1"),
        ("https://x/a?TOKEN=abc#frag", "https://x/a?TOKEN=***#frag"),
        ("https://u:pw@x/?sig=s", "https://u:***@x/?sig=***"),
        ("https://x/?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=f0", None),
        ("https://x/?keyword=shoes&monkey=1&sigma=2", "https://x/?keyword=shoes&monkey=1&sigma=2"),
        (
            "Crawled (200) <GET https://x/a?api_key=k1> (referer: https://y/?session=s1)",
            "Crawled (200) <GET https://x/a?api_key=***> (referer: https://y/?session=***)",
        ),
        (
            "https://x/?next=https%3A%2F%2Fy%2F%3Ftoken%3Dsecret%26a%3D1",
            "https://x/?next=https%3A%2F%2Fy%2F%3Ftoken%3D***%26a%3D1",
        ),
        ("https://x/?token=", "https://x/?token=***"),
        ("invalid hostname: user:pw@127.0.0.1", "invalid hostname: user:***@127.0.0.1"),
        (
            "https://x/?to=http%3A%2F%2Fu%3Apw%2540%40h%2Fp&a=1",
            "https://x/?to=http%3A%2F%2Fu%3A***%40h%2Fp&a=1",
        ),
        ("no URL at all: key=value", "no URL at all: key=value"),
    ],
)
def test_redactor(text: str, expected: str | None) -> None:
    redact = Redactor(defaults.INGEST_REDACT_QUERY_PARAMS)
    if expected is None:
        expected = "https://x/?X-Amz-Credential=***&X-Amz-Signature=***"
    assert redact(text) == expected


def test_redactor_takes_the_projects_names() -> None:
    assert Redactor(["partner_code"])("https://x/?Partner_Code=9&token=1") == (
        "https://x/?Partner_Code=***&token=1"
    )
    assert Redactor([])("https://x/?token=1") == "https://x/?token=1"
