"""Every SQL block a user pastes from the docs runs, as pasted, on the database it is written for.

A block names its database in its first comment (``-- PostgreSQL``, ``-- SQLite``,
``-- ClickHouse``, ``-- MySQL``, several joined by "and" or "or", or ``-- any database``; a
block may hold several such parts), or else in the sentence just before it ("SQLite:",
"... (PostgreSQL):"). Each database is filled by one real crawl (``tests/_cookbook_crawl.py``:
items, requests with a redirect, a 404 and a retried 500, logs, a dead letter) whose job id
and spider are the docs' examples (``01a2084d-...``, ``books``), so the blocks need no editing
and the answers are this crawl's. A second crawl routes records as docs/routing.md describes
(items to PostgreSQL, requests to chDB, logs to an SQLite file): each database must hold the
tables that page lists for it, and each block whose tables are all there runs there too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from _helpers import REPO_DIR, TESTS_DIR, Database
from conftest import service_missing
from services import (
    create_database,
    create_mysql_database,
    drop_database,
    drop_mysql_database,
    with_database,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from services import LocalSite

pytestmark = [pytest.mark.crawl, pytest.mark.slow]

DOCS = REPO_DIR / "docs"
#: the pages with SQL a user pastes into a database the add-on filled
PAGES = [
    REPO_DIR / "README.md",
    DOCS / "index.md",
    DOCS / "quickstart.md",
    DOCS / "cookbook.md",
    DOCS / "cookbook-clickhouse-mysql.md",
    DOCS / "stats.md",
    DOCS / "retry.md",
    DOCS / "proxies.md",
]
# Not here, because other tests run their SQL on the setup it needs: docs/tables.md (the DDL
# and migrations: test_crawl_items.py, test_crawl_requests.py), docs/distributed.md (a
# distributed crawl: test_distributed.py), docs/validation.md (item keys and versions:
# test_quality.py), docs/backends.md (renaming an old items table).
JOB_ID = "01a2084d-e902-77dc-ac3d-2e842c3c054a"
BACKENDS = {
    "postgresql": "postgres",
    "sqlite": "sqlite",
    "clickhouse": "clickhouse",
    "mysql": "mysql",
}
ANY = ("postgres", "sqlite", "clickhouse", "mysql")
MARKER = re.compile(r"--\s*(.*)")
TABLE = re.compile(r"\bingest_[a-z_]+\b")
CHDB_PATH = "/var/lib/scraping/chdb"  # the directory of the docs' examples


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    backend: str
    sql: str

    @property
    def tables(self) -> set[str]:
        return set(TABLE.findall(self.sql))

    def __str__(self) -> str:
        return f"{self.page}:{self.line}-{self.backend}"


def _backends(text: str, *, head_only: bool = True) -> tuple[str, ...]:
    """The databases a marker comment names in its head (before ':' or '('), or a sentence."""
    head = (re.split(r"[:(]", text, maxsplit=1)[0] if head_only else text).lower()
    if head.strip() == "any database":
        return ANY
    return tuple(backend for word, backend in BACKENDS.items() if re.search(rf"\b{word}\b", head))


def sql_blocks(page: Path) -> list[Block]:
    """The ``sql`` blocks of *page*, one per database each part of a block names."""
    lines = page.read_text(encoding="utf-8").splitlines()
    name = page.relative_to(REPO_DIR).as_posix()
    blocks: list[Block] = []
    prose = ""
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.strip() and not line.startswith("```"):
            prose = line
        if line.strip() != "```sql":
            index += 1
            continue
        start = index + 1
        end = lines.index("```", start)
        parts: list[tuple[int, tuple[str, ...], list[str]]] = []
        for number in range(start, end):
            marker = MARKER.fullmatch(lines[number].strip())
            named = _backends(marker[1]) if marker else ()
            if named or not parts:
                parts.append((number + 1, named, []))
            parts[-1][2].append(lines[number])
        for number, named, body in parts:
            sql = "\n".join(body)
            for backend in named or _backends(prose, head_only=False) or ("unnamed",):
                blocks.append(Block(name, number, backend, sql))
        index = end + 1
        prose = ""
    return blocks


BLOCKS = [block for page in PAGES for block in sql_blocks(page)]


def test_every_block_names_its_database() -> None:
    unnamed = [str(block) for block in BLOCKS if block.backend == "unnamed"]
    assert not unnamed, (
        f"sql blocks that name no database: {unnamed}; start each with a comment such as "
        "'-- PostgreSQL' or '-- SQLite and PostgreSQL alike', or say it in the sentence before"
    )


def test_the_pages_have_blocks_for_each_database() -> None:
    found = {(block.page, block.backend) for block in BLOCKS}
    for backend in ("postgres", "sqlite"):
        assert ("docs/cookbook.md", backend) in found
    for backend in ("clickhouse", "mysql"):
        assert ("docs/cookbook-clickhouse-mysql.md", backend) in found


# one crawl per database, for the whole module


def _crawl(site: LocalSite, settings: dict[str, Any], workdir: Path) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    result_path = workdir / "result.json"
    settings = {"INGEST_JOB_ID": JOB_ID, **settings}
    args = {"base_url": site.base_url, "settings": settings, "result": str(result_path)}
    env = {**os.environ, "PYTHONPATH": str(REPO_DIR), "PYTHONWARNINGS": ""}
    env.pop("SCRAPY_JOB", None)
    env.pop("SCRAPY_SETTINGS_MODULE", None)
    out = subprocess.run(
        [sys.executable, str(TESTS_DIR / "_cookbook_crawl.py"), json.dumps(args)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    log = out.stdout[-3000:] + out.stderr[-6000:]
    assert out.returncode == 0, log
    stats = json.loads(result_path.read_text(encoding="utf-8"))["stats"]
    assert stats.get("finish_reason") == "finished", log
    assert stats.get("retry/count") == 2, log  # the 500, retried twice
    return stats


class Crawls:
    """The databases of the module's crawls, each filled the first time a test asks for it."""

    def __init__(self, site: LocalSite, workdir: Path, stack: contextlib.ExitStack) -> None:
        self.site = site
        self.workdir = workdir
        self.stack = stack
        self.full: dict[str, Database] = {}
        self.routed: dict[str, Database] | None = None

    def url(self, request: pytest.FixtureRequest, backend: str, name: str) -> str:
        """The URL of a fresh database of *backend* (the servers are the session's)."""
        if backend == "sqlite":
            return f"sqlite:///{self.workdir / name}.sqlite3"
        if backend == "clickhouse":
            return f"chdb://{self.workdir / name}-chdb"
        if backend == "postgres":
            admin = request.getfixturevalue("postgres_dsn")
            database = create_database(admin)
            self.stack.callback(drop_database, admin, database)
            return with_database(admin, database)
        admin = request.getfixturevalue("_mariadb_server")
        database = create_mysql_database(admin)
        self.stack.callback(drop_mysql_database, admin, database)
        return f"{admin.rstrip('/')}/{database}"

    def database(self, request: pytest.FixtureRequest, backend: str) -> Database:
        """A database of *backend* that holds every table of the crawl."""
        if backend not in self.full:
            url = self.url(request, backend, backend)
            _crawl(self.site, {"INGEST_DATABASE_URL": url}, self.workdir / f"crawl-{backend}")
            self.full[backend] = Database(url)
        return self.full[backend]

    def routed_databases(self, request: pytest.FixtureRequest) -> dict[str, Database]:
        """The databases of the crawl routed as docs/routing.md's example, by route."""
        if self.routed is None:
            databases = {
                "items": self.url(request, "postgres", "items"),
                "requests": self.url(request, "clickhouse", "requests"),
                "logs": self.url(request, "sqlite", "logs"),
                "default": self.url(request, "sqlite", "ingest"),
            }
            settings = {
                "INGEST_DATABASE_URL": databases["default"],
                "INGEST_ROUTES": {kind: databases[kind] for kind in ("items", "requests", "logs")},
            }
            _crawl(self.site, settings, self.workdir / "crawl-routed")
            self.routed = {kind: Database(url) for kind, url in databases.items()}
        return self.routed


@pytest.fixture(scope="module")
def crawls(_site_server: LocalSite, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crawls]:
    with contextlib.ExitStack() as stack:
        yield Crawls(_site_server, tmp_path_factory.mktemp("cookbook"), stack)


def _needs(backend: str) -> None:
    import importlib.util

    modules = {
        "postgres": ["psycopg"],
        "clickhouse": ["chdb", "clickhouse_connect"],
        "mysql": ["pymysql"],
        "sqlite": [],
    }[backend]
    for module in modules:
        if importlib.util.find_spec(module) is None:
            service_missing(f"{module} is not installed (pip install -e '.[test]')")


# running the blocks

_CLICKHOUSE_RUN = """
import json, sys
import clickhouse_connect
client = clickhouse_connect.get_client(dsn=sys.argv[1])
answers = []
for sql in json.loads(sys.argv[2]):
    try:
        answers.append([None, [list(row) for row in client.query(sql).result_rows]])
    except Exception as exc:
        answers.append([f"{type(exc).__name__}: {exc}", None])
client.close()
print(json.dumps(answers, default=str))
"""


def run_blocks(db: Database, blocks: list[Block]) -> dict[Block, list[list[Any]]]:
    """The answer of each statement of each block; fails naming every block that failed."""
    answers: dict[Block, list[list[Any]]] = {}
    errors = []
    if db.kind == "clickhouse":  # one process for them all: chDB opens a directory once
        statements = [(block, s) for block in blocks for s in _statements(block.sql)]
        out = subprocess.run(
            [sys.executable, "-c", _CLICKHOUSE_RUN, db.url, json.dumps([s for _, s in statements])],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        for (block, _), (error, rows) in zip(statements, json.loads(out.stdout), strict=True):
            if error is not None:
                errors.append(f"{block}: {error[:600]}\n{block.sql}")
            answers.setdefault(block, []).append(rows or [])
    else:
        for block in blocks:
            try:
                answers[block] = [list(rows) for rows in db.script(block.sql)]
            except Exception as exc:
                errors.append(f"{block}: {type(exc).__name__}: {exc}\n{block.sql}")
    assert not errors, "\n\n".join(errors)
    return answers


def _statements(sql: str) -> list[str]:
    code = [s for s in re.split(r";\s*(?:\n|$)", sql) if re.sub(r"--[^\n]*", "", s).strip()]
    return code


@pytest.mark.parametrize("backend", ANY)
def test_every_block_runs_on_its_database(
    crawls: Crawls, request: pytest.FixtureRequest, backend: str
) -> None:
    _needs(backend)
    blocks = [block for block in BLOCKS if block.backend == backend]
    assert blocks
    db = crawls.database(request, backend)
    answers = run_blocks(db, blocks)
    # the crawl is the docs' example job: the blocks that read it find it
    items = [a for b, a in answers.items() if "FROM ingest_items" in b.sql and JOB_ID in b.sql]
    assert items and all(answer[0] for answer in items), items
    retried = [a for b, a in answers.items() if "retry_times > 0" in b.sql]
    for answer in retried:  # the 500 and its two retries
        assert [row[1] for row in answer[0]] == [0, 1, 2], answer
    assert backend in ("clickhouse", "mysql") or retried


def _routed_tables() -> dict[str, set[str]]:
    """docs/routing.md's table of the tables each database of its example gets."""
    text = (DOCS / "routing.md").read_text(encoding="utf-8")
    section = text.split("## Which tables each database gets", 1)[1].split("\n## ", 1)[0]
    tables: dict[str, set[str]] = {}
    for row in re.findall(r"^\| `([a-z]+)://.*?\| (.*?) \|$", section, re.MULTILINE):
        scheme, names = row
        tables[scheme] = set(TABLE.findall(names))
    return tables


def _tables(db: Database) -> set[str]:
    if db.kind == "clickhouse":
        rows = db.query("SHOW TABLES")
    elif db.kind == "postgres":
        rows = db.query("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
    else:
        rows = db.query("SELECT name FROM sqlite_master WHERE type = 'table'")
    return {name for (name,) in rows if str(name).startswith("ingest_")}


@pytest.mark.postgres
def test_routed_databases_hold_what_the_routing_page_says(
    crawls: Crawls, request: pytest.FixtureRequest
) -> None:
    for backend in ("postgres", "clickhouse"):
        _needs(backend)
    documented = _routed_tables()
    databases = crawls.routed_databases(request)
    held = {
        "postgresql": _tables(databases["items"]),
        "chdb": _tables(databases["requests"]),
        "sqlite-logs": _tables(databases["logs"]),
        "sqlite-default": _tables(databases["default"]),
    }
    shared = {"ingest_jobs", "ingest_dead_letters", "ingest_schema_version"}
    assert documented["postgresql"] == held["postgresql"] == {"ingest_items", *shared}
    assert documented["chdb"] == held["chdb"] == {"ingest_requests", *shared}
    assert documented["sqlite"] == held["sqlite-logs"] == {"ingest_logs", *shared}
    assert held["sqlite-default"] <= shared
    # and each block whose tables are all in a routed database runs there, as pasted
    for kind, db in databases.items():
        if kind == "default":
            continue
        tables = _tables(db)
        blocks = [b for b in BLOCKS if b.backend == db.kind and b.tables and b.tables <= tables]
        assert blocks or kind == "logs"
        run_blocks(db, blocks)


def test_the_chdb_snippet_reads_what_the_crawl_stored(
    crawls: Crawls, request: pytest.FixtureRequest
) -> None:
    _needs("clickhouse")
    text = (DOCS / "cookbook-clickhouse-mysql.md").read_text(encoding="utf-8")
    section = text.split("## Querying chDB", 1)[1].split("\n## ", 1)[0]
    [snippet] = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert CHDB_PATH in snippet
    db = crawls.database(request, "clickhouse")
    path = db.url.removeprefix("chdb://")
    out = subprocess.run(
        [sys.executable, "-c", snippet.replace(CHDB_PATH, path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "200" in out.stdout and "500" in out.stdout, out.stdout
