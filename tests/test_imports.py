"""A crawl imports only what the features it uses need: no backend nor driver (nor
SQLAlchemy) where its writer process (the default) has them, else the backend of its database
URL's scheme and no other (nor the drivers of the others), no metrics (prometheus_client) unless
INGEST_METRICS_ENABLED, no proxy middleware without proxies, and the ``scrapy ingest`` command,
which Scrapy imports for every command it runs, imports neither the settings model nor a
backend until it runs. Each check runs in a process of its own, whose ``sys.modules`` is
fresh: a real crawl of a spider that yields nothing, or the imports alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING, Any

import pytest
from _helpers import Database, last_json, run_python

if TYPE_CHECKING:
    from pathlib import Path

#: prints which of the modules named in argv[2] (JSON) a crawl into argv[1] (a database URL, or
#: "default": none set) imported, with the add-on and argv[3] (JSON: more settings)
_CRAWL = textwrap.dedent(
    """
    import json
    import sys

    import scrapy
    from scrapy.crawler import CrawlerProcess


    class EmptySpider(scrapy.Spider):
        name = "empty"
        start_urls = ["data:,"]

        def parse(self, response):
            return []


    url, watched, extra = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    settings = {
        "ADDONS": {"scrapy_ingest.IngestAddon": 0},
        "TELNETCONSOLE_ENABLED": False,
        "LOG_LEVEL": "WARNING",
        **extra,
    }
    if url != "default":
        settings["INGEST_DATABASE_URL"] = url
    process = CrawlerProcess(settings=settings)
    crawler = process.create_crawler(EmptySpider)
    process.crawl(crawler)
    process.start()
    print(json.dumps(sorted(name for name in watched if name in sys.modules)))
    """
)

#: what no crawl into SQLite imports (with metrics off and no proxies): the other backends and
#: their drivers, SQLAlchemy's other dialects, metrics, and the components not placed
NOT_FOR_SQLITE = (
    "psycopg",
    "psycopg_pool",
    "clickhouse_connect",
    "chdb",
    "prometheus_client",
    "scrapy_ingest.backends.postgres",
    "scrapy_ingest.backends.clickhouse",
    "scrapy_ingest.extensions.metrics",
    "scrapy_ingest.downloadermiddlewares.proxy",
    "scrapy_ingest.downloadermiddlewares.retry",
    "sqlalchemy.dialects.postgresql",
    "sqlalchemy.dialects.mysql",
    "sqlalchemy.dialects.mssql",
)

#: what a crawl into PostgreSQL does not import: its writer process (the default) has the driver
NOT_FOR_POSTGRES = (
    "psycopg",
    "psycopg_pool",
    "clickhouse_connect",
    "chdb",
    "sqlalchemy",
    "prometheus_client",
    "scrapy_ingest.backends.postgres",
    "scrapy_ingest.backends.clickhouse",
    "scrapy_ingest.backends.sqlalchemy",
    "scrapy_ingest.extensions.metrics",
)

#: what shows the crawl did store through the add-on (the check is not vacuous)
USED = ("scrapy_ingest.pipelines", "scrapy_ingest.hosting")


def _imported(url: str, watched: tuple[str, ...], cwd: Path, **settings: Any) -> set[str]:
    """Run _CRAWL in *cwd*; return the modules of *watched* it imported."""
    done = run_python(_CRAWL, url, json.dumps(watched), json.dumps(settings), cwd=cwd)
    assert "Traceback" not in done.stderr, done.stderr
    return set(last_json(done))


def _finished_jobs(db: Database) -> int:
    [(count,)] = db.query("SELECT count(*) FROM ingest_jobs WHERE status = 'finished'")
    return int(count)


@pytest.mark.crawl
def test_a_crawl_into_sqlite_imports_neither_sqlalchemy_nor_another_backend(
    tmp_path: Path,
) -> None:
    # the default INGEST_DATABASE_URL: sqlite:///ingest.sqlite3, in the working directory;
    # SQLAlchemy is the writer process's
    watched = (*NOT_FOR_SQLITE, *USED, "sqlalchemy", "scrapy_ingest.backends.sqlalchemy")
    imported = _imported("default", watched, tmp_path)
    assert imported == set(USED)
    assert _finished_jobs(Database(f"sqlite:///{tmp_path / 'ingest.sqlite3'}")) == 1


@pytest.mark.crawl
def test_a_crawl_into_sqlite_in_writer_threads_imports_no_other_backend(
    tmp_path: Path,
) -> None:
    # INGEST_WRITER_PROCESS = False: SQLAlchemy's SQLite dialect, in the crawl process
    watched = (*NOT_FOR_SQLITE, *USED, "sqlalchemy", "scrapy_ingest.backends.sqlalchemy")
    imported = _imported("default", watched, tmp_path, INGEST_WRITER_PROCESS=False)
    assert imported == {*USED, "sqlalchemy", "scrapy_ingest.backends.sqlalchemy"}
    assert _finished_jobs(Database(f"sqlite:///{tmp_path / 'ingest.sqlite3'}")) == 1


@pytest.mark.crawl
def test_a_crawl_with_metrics_imports_prometheus_client(tmp_path: Path) -> None:
    # the other side of the check above: the extension, placed, does import it
    watched = ("prometheus_client", "scrapy_ingest.extensions.metrics")
    imported = _imported(
        "default", watched, tmp_path, INGEST_METRICS_ENABLED=True, INGEST_METRICS_PORT=0
    )
    assert imported == set(watched)


@pytest.mark.crawl
def test_a_crawl_into_postgres_imports_neither_driver_nor_sqlalchemy(
    pg_url: str, tmp_path: Path
) -> None:
    imported = _imported(pg_url, (*NOT_FOR_POSTGRES, *USED), tmp_path)
    assert imported & set(NOT_FOR_POSTGRES) == set()
    assert imported == set(USED)
    assert _finished_jobs(Database(pg_url)) == 1


#: module -> what importing it must not import
LIGHT_IMPORTS = {
    # Scrapy imports the command (an entry point) for every ``scrapy`` command it runs
    "scrapy_ingest.commands.ingest": (
        "scrapy_ingest.config",
        "scrapy_ingest.backends",
        "scrapy_ingest.commands._common",
    ),
    # the add-on imports a component when it places it, not before
    "scrapy_ingest.addon": (
        "scrapy_ingest.pipelines",
        "scrapy_ingest.runtime",
        "scrapy_ingest.extensions.metrics",
        "scrapy_ingest.downloadermiddlewares.proxy",
        "scrapy_ingest.downloadermiddlewares.requestlog",
    ),
}


@pytest.mark.parametrize("module", LIGHT_IMPORTS)
def test_importing_does_not_import_what_runs_later(module: str) -> None:
    forbidden = LIGHT_IMPORTS[module]
    script = (
        f"import json, sys, {module}\n"
        f"print(json.dumps([m for m in {list(forbidden)!r} if m in sys.modules]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(done.stdout) == []
