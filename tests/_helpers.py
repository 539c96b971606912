"""Helpers of the crawl tests: run ``_crawl_script.py`` in a subprocess, read what it stored.

Kept out of ``conftest.py``, which holds the service fixtures, so that these stay plain
functions and classes that a test imports by name.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import secrets
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit, urlunsplit

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from services import LocalSite

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent
CRAWL_SCRIPT = TESTS_DIR / "_crawl_script.py"
CRAWL_TIMEOUT = 180

ASYNCIO_REACTOR = "twisted.internet.asyncioreactor.AsyncioSelectorReactor"
#: what TWISTED_REACTOR = None installs on Linux
DEFAULT_REACTOR = "twisted.internet.epollreactor.EPollReactor"
REACTORS = {"asyncio": ASYNCIO_REACTOR, "default": DEFAULT_REACTOR}


@dataclass
class CrawlResult:
    returncode: int
    output: str  # stdout and stderr: the crawl log
    stats: dict[str, Any]
    reactor: str | None
    bootstrap_failed: bool | None
    #: the stats of every crawler of the process (``stats`` is the first one's)
    all_stats: list[dict[str, Any]] = field(default_factory=list)

    def describe(self) -> str:
        return f"exit code {self.returncode}; log tail:\n{self.output[-6000:]}"

    def assert_clean(self) -> None:
        """Exit code 0, finished, and no ERROR in the log."""
        assert self.returncode == 0, self.describe()
        assert self.stats.get("finish_reason") == "finished", self.describe()
        assert "log_count/ERROR" not in self.stats, self.describe()
        assert "log_count/CRITICAL" not in self.stats, self.describe()
        assert " ERROR: " not in self.output, self.describe()
        assert "Traceback" not in self.output, self.describe()
        assert "ResourceWarning" not in self.output, self.describe()


def _crawl_command(args: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_DIR), os.environ.get("PYTHONPATH")])),
        # a file, socket or process left for the garbage collector is a warning in the
        # user's crawl: assert_clean fails on it
        "PYTHONWARNINGS": "default::ResourceWarning",
    }
    env.pop("SCRAPY_JOB", None)
    env.pop("SCRAPY_SETTINGS_MODULE", None)
    return [sys.executable, str(CRAWL_SCRIPT), json.dumps(args)], env


class Crawl:
    """A crawl running in a subprocess; :meth:`wait` returns its :class:`CrawlResult`."""

    def __init__(
        self, args: dict[str, Any], workdir: Path, env: dict[str, str] | None = None
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.result_path = workdir / f"result-{secrets.token_hex(4)}.json"
        self.log_path = workdir / f"crawl-{secrets.token_hex(4)}.log"
        command, base_env = _crawl_command({**args, "result": str(self.result_path)})
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            command,
            cwd=workdir,
            env={**base_env, **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float = CRAWL_TIMEOUT) -> CrawlResult:
        try:
            returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"the crawl did not end within {timeout} s:\n{self._output()[-6000:]}"
            ) from None
        finally:
            self._log.close()
        result: dict[str, Any] = {}
        if self.result_path.exists():
            result = json.loads(self.result_path.read_text(encoding="utf-8"))
        return CrawlResult(
            returncode=returncode,
            output=self._output(),
            stats=result.get("stats", {}),
            reactor=result.get("reactor"),
            bootstrap_failed=result.get("bootstrap_failed"),
            all_stats=result.get("all_stats", []),
        )

    def _output(self) -> str:
        return self.log_path.read_bytes().decode("utf-8", "backslashreplace")

    def kill(self) -> None:
        if self.running:
            self.process.kill()
            self.process.wait()
        self._log.close()


def run_crawl(
    args: dict[str, Any], workdir: Path, env: dict[str, str] | None = None
) -> CrawlResult:
    """Run one crawl of ``_crawl_script.py`` to its end."""
    crawl = Crawl(args, workdir, env)
    try:
        return crawl.wait()
    finally:
        crawl.kill()


# the list crawl of the proxy and retry tests: tests/_proxy_crawl.py

LIST_CRAWL_SCRIPT = TESTS_DIR / "_proxy_crawl.py"


class ListCrawl:
    """A list crawl (``_proxy_crawl.py``) running in a subprocess; its log goes to a file, which
    a test may read while the crawl runs (:meth:`log`)."""

    def __init__(self, plan: dict[str, Any], workdir: Path) -> None:
        plan = {"workdir": str(workdir), "result": str(workdir / "result.json"), **plan}
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_DIR), str(TESTS_DIR)])}
        self.log_path = workdir / f"list-crawl-{secrets.token_hex(4)}.log"
        with self.log_path.open("wb") as log:  # the child has its own copy of the descriptor
            self.process = subprocess.Popen(
                [sys.executable, str(LIST_CRAWL_SCRIPT), json.dumps(plan)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=workdir,
            )

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        """The crawl's log so far."""
        return self.log_path.read_bytes().decode("utf-8", "backslashreplace")

    def kill(self) -> None:
        if self.running:
            self.process.kill()
            self.process.wait()


def start_list_crawl(plan: dict[str, Any], workdir: Path) -> ListCrawl:
    """Start ``_proxy_crawl.py`` with *plan* (see its docstring); :func:`finish_list_crawl`."""
    return ListCrawl(plan, workdir)


def finish_list_crawl(crawl: ListCrawl, workdir: Path) -> dict[str, Any]:
    """Wait for a list crawl to end; its result, with the crawl log in ``log``."""
    try:
        crawl.process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        crawl.kill()
        raise AssertionError(
            f"the crawl did not end within 120 s:\n{crawl.log()[-6000:]}"
        ) from None
    output = crawl.log()
    result_path = workdir / "result.json"
    assert crawl.process.returncode == 0 and result_path.exists(), output[-6000:]
    result: dict[str, Any] = json.loads(result_path.read_text())
    result["log"] = output
    return result


def run_list_crawl(plan: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Run a list crawl to its end."""
    crawl = start_list_crawl(plan, workdir)
    try:
        return finish_list_crawl(crawl, workdir)
    finally:
        crawl.kill()


def wait_for_round(pause_file: Path, crawl: ListCrawl, number: int) -> None:
    """Wait until the list crawl has finished round *number* (0 first) and waits for
    *pause_file*."""
    ready = Path(f"{pause_file}.ready")
    deadline = time.monotonic() + 60
    while not (ready.exists() and ready.read_text() == str(number + 1)):
        if not crawl.running:
            raise AssertionError(f"the crawl ended early:\n{crawl.log()[-6000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"the crawl did not finish round {number}")
        time.sleep(0.05)


def wait_for_log(crawl: ListCrawl, condition: Callable[[str], Any], *, what: str) -> None:
    """Wait until *condition* holds for the list crawl's log so far (60 s at most); fail at
    once if the crawl ends meanwhile."""
    wait_for(lambda: not crawl.running or condition(crawl.log()), timeout=60, what=what)
    assert crawl.running, f"the crawl ended before {what}:\n{crawl.log()[-6000:]}"


def run_python(
    script: str, *args: str, cwd: Path, python_args: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run *script* (Python source) with *args* in an interpreter of its own, in *cwd*; fail
    the test when it exits non-zero. Its output is text."""
    done = subprocess.run(
        [sys.executable, *python_args, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def last_json(done: subprocess.CompletedProcess[str]) -> Any:
    """The JSON a script printed on its last line."""
    return json.loads(done.stdout.strip().splitlines()[-1])


def ingest_replay(settings: dict[str, Any], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``scrapy ingest replay`` with *settings*, outside any project, in *cwd*."""
    return ingest_command(["replay"], settings, cwd)


def ingest_command(
    args: list[str], settings: dict[str, Any], cwd: Path, *, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``scrapy ingest ARGS...`` with *settings* (``-s NAME=VALUE``, dicts as JSON), outside
    any project, in *cwd*."""
    command = [sys.executable, "-m", "scrapy.cmdline", "ingest", *args]
    for name, value in settings.items():
        text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        command += ["-s", f"{name}={text}"]
    env = {**os.environ, "PYTHONPATH": str(REPO_DIR)}
    env.pop("SCRAPY_SETTINGS_MODULE", None)
    return subprocess.run(
        command, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout, check=False
    )


def stored_items(url: str) -> tuple[int, int]:
    """(rows, distinct ids) of ingest_items at *url*; (0, 0) before the table exists."""
    db = Database(url)
    if not db.table_exists("ingest_items"):
        return 0, 0
    [(rows, distinct)] = db.query("SELECT count(*), count(DISTINCT id) FROM ingest_items")
    return int(rows), int(distinct)


def wait_for(
    condition: Callable[[], Any], *, timeout: float, interval: float = 0.05, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(interval)


def engine_pauses(path: Path) -> list[tuple[float, bool]]:
    """What ``_crawl_script.PauseRecorder`` has written to *path* so far: each change of the
    crawl's ``engine.paused``, as ``(time.monotonic(), paused)``; [] before the first."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="ascii").split("\n")[:-1]  # whole lines only
    return [(float(at), state == "paused") for at, state in (line.split() for line in lines)]


def engine_paused(path: Path) -> bool:
    """Whether the crawl's engine is paused now, as far as ``PauseRecorder`` (*path*) knows."""
    changes = engine_pauses(path)
    return bool(changes) and changes[-1][1]


# reading the database


def parse_timestamp(value: Any) -> dt.datetime:
    """A timestamp column as an aware datetime: PostgreSQL gives one, SQLite gives text, and
    ClickHouse (through JSON) naive text in UTC."""
    if isinstance(value, dt.datetime):  # MySQL's DATETIME is naive, in UTC by convention
        return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    assert isinstance(value, str), value
    parsed = dt.datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def parse_json(value: Any) -> Any:
    """A json column: PostgreSQL's jsonb arrives decoded, SQLite's text does not."""
    if value is None or isinstance(value, (dict, list)):
        return value
    return json.loads(value)


def item_row(*values: Any, **more: Any) -> tuple[Any, ...]:
    """A row of the items table (:class:`scrapy_ingest.schema.ItemRow`): *values* are id,
    job_id, spider, item_type, url, scraped_at and data; *more* other columns by name
    (``item_key=...``); the columns not given are None. A plain tuple, as the pipeline
    makes them."""
    from scrapy_ingest.schema import ItemRow

    names = ("id", "job_id", "spider", "item_type", "url", "scraped_at", "data")
    given = {**dict(zip(names, values, strict=True)), **more}
    return tuple(ItemRow(**{name: given.get(name) for name in ItemRow._fields}))


class NoTable(AssertionError):
    """A test counted (or read) the rows of a table that was never created: "no rows" and
    "no table" are different answers, and an absence check must say which it means."""


class Database:
    """Read (and prepare) the database a crawl writes to, from the test process."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith(("postgresql", "postgres")):
            self.kind = "postgres"
        elif url.startswith(("chdb", "clickhouse")):
            self.kind = "clickhouse"
        elif url.startswith(("mysql", "mariadb")):
            self.kind = "mysql"
        else:
            self.kind = "sqlite"

    def __repr__(self) -> str:
        return f"Database({self.kind})"

    @property
    def sqlite_path(self) -> Path:
        assert self.url.startswith("sqlite:///")
        return Path(self.url[len("sqlite:///") :])

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run *sql* (``%s`` placeholders) and return all rows."""
        if self.kind == "clickhouse":
            assert not params, "no parameters for ClickHouse here"
            return [tuple(row) for row in clickhouse_query(self.url, sql)[1]]
        if self.kind == "mysql":
            from services import _mysql_connect

            with contextlib.closing(_mysql_connect(self.url)) as conn, conn.cursor() as cur:
                cur.execute(sql, params or None)
                return list(cur.fetchall())
        if self.kind == "postgres":
            import psycopg

            with psycopg.connect(self.url, connect_timeout=10) as conn:
                return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]
        conn = sqlite3.connect(self.sqlite_path, timeout=30)
        try:
            return conn.execute(sql.replace("%s", "?"), params).fetchall()
        finally:
            conn.close()

    def execute(self, sql: str) -> None:
        if self.kind == "postgres":
            import psycopg

            with psycopg.connect(self.url, connect_timeout=10) as conn:
                conn.execute(sql)  # type: ignore[arg-type]
            return
        conn = sqlite3.connect(self.sqlite_path, timeout=30)
        try:
            conn.executescript(sql)
            conn.commit()
        finally:
            conn.close()

    def script(self, sql: str) -> list[list[tuple[Any, ...]]]:
        """Run the statements of *sql* one by one in autocommit mode (so ``BEGIN``/``COMMIT``
        and ``CREATE INDEX CONCURRENTLY`` work); return the rows of each one that has rows."""
        statements = [s for s in re.split(r";\s*(?:\n|$)", sql) if _has_code(s)]
        answers = []
        if self.kind == "clickhouse":
            return [rows for _, rows in clickhouse_queries(self.url, statements)]
        if self.kind == "mysql":
            from services import _mysql_connect

            with contextlib.closing(_mysql_connect(self.url)) as conn, conn.cursor() as cur:
                for statement in statements:
                    cur.execute(statement)
                    if cur.description is not None:
                        answers.append(list(cur.fetchall()))
            return answers
        if self.kind == "postgres":
            import psycopg

            with psycopg.connect(self.url, connect_timeout=10, autocommit=True) as conn:
                for statement in statements:
                    cur = conn.execute(statement)  # type: ignore[call-overload]
                    if cur.description is not None:
                        answers.append(cur.fetchall())
            return answers
        conn = sqlite3.connect(self.sqlite_path, timeout=30, isolation_level=None)
        try:
            for statement in statements:
                cur = conn.execute(statement)
                if cur.description is not None:
                    answers.append(cur.fetchall())
        finally:
            conn.close()
        return answers

    def table_exists(self, name: str) -> bool:
        if self.kind == "clickhouse":
            return bool(self.query(f"EXISTS TABLE {name}")[0][0])
        if self.kind == "mysql":
            return bool(
                self.query(
                    "SELECT 1 FROM information_schema.tables WHERE table_schema = DATABASE() "
                    "AND table_name = %s",
                    (name,),
                )
            )
        if self.kind == "sqlite" and not self.sqlite_path.exists():
            return False  # and do not create the file by looking
        if self.kind == "postgres":
            return self.query("SELECT to_regclass(%s) IS NOT NULL", (name,))[0][0]
        return bool(
            self.query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = %s", (name,))
        )

    def count(self, table: str, where: str = "TRUE", params: tuple[Any, ...] = ()) -> int:
        """The rows of *table* (that match *where*). Raises :class:`NoTable` when the table
        does not exist, so that ``count(...) == 0`` means "created, and empty": a test that
        means "never created" says so with :meth:`table_exists`, and one that waits for rows
        checks :meth:`table_exists` first."""
        if not self.table_exists(table):
            raise NoTable(f"{table} does not exist in {self.kind}: no rows to count")
        return int(self.query(f"SELECT count(*) FROM {table} WHERE {where}", params)[0][0])

    def items(self, where: str = "TRUE", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        rows = self.query(
            "SELECT id, job_id, spider, item_type, url, scraped_at, data FROM ingest_items"
            f" WHERE {where}",
            params,
        )
        names = ("id", "job_id", "spider", "item_type", "url", "scraped_at", "data")
        items = []
        for row in rows:
            item = dict(zip(names, row, strict=True))
            item["id"] = str(item["id"])
            item["scraped_at"] = parse_timestamp(item["scraped_at"])
            item["data"] = parse_json(item["data"])
            items.append(item)
        return items

    def jobs(self) -> list[dict[str, Any]]:
        names = (
            "job_id",
            "crawl_id",
            "spider",
            "hostname",
            "pid",
            "status",
            "close_reason",
            "started_at",
            "updated_at",
            "finished_at",
            "items_count",
            "stats",
            "settings",
        )
        rows = self.query(f"SELECT {', '.join(names)} FROM ingest_jobs ORDER BY started_at")
        jobs = []
        for row in rows:
            job = dict(zip(names, row, strict=True))
            for name in ("started_at", "updated_at", "finished_at"):
                if job[name] is not None:
                    job[name] = parse_timestamp(job[name])
            job["stats"] = parse_json(job["stats"])
            job["settings"] = parse_json(job["settings"])
            jobs.append(job)
        return jobs

    def rows(self, table: str, where: str = "TRUE", params: tuple[Any, ...] = ()) -> list[dict]:
        """Every column of *table*'s rows as dicts: ids as text, timestamps and JSON parsed."""
        if not self.table_exists(table):
            return []
        if self.kind == "mysql":
            from pymysql.cursors import DictCursor
            from services import _mysql_connect

            connection = contextlib.closing(_mysql_connect(self.url))
            with connection as conn, conn.cursor(DictCursor) as cur:
                cur.execute(f"SELECT * FROM {table} WHERE {where}", params or None)
                found = list(cur.fetchall())
            return [_typed(row) for row in found]
        if self.kind == "clickhouse":
            # FINAL: one row per sorting key (the latest version of a job row)
            columns, found = clickhouse_query(
                self.url, f"SELECT * FROM {table} FINAL WHERE {where}"
            )
            return [_typed(dict(zip(columns, row, strict=True))) for row in found]
        if self.kind == "postgres":
            import psycopg
            from psycopg.rows import dict_row

            with psycopg.connect(self.url, connect_timeout=10, row_factory=dict_row) as conn:
                rows = conn.execute(f"SELECT * FROM {table} WHERE {where}", params).fetchall()  # type: ignore[arg-type]
        else:
            conn = sqlite3.connect(self.sqlite_path, timeout=30)
            conn.row_factory = sqlite3.Row
            try:
                query = f"SELECT * FROM {table} WHERE {where}".replace("%s", "?")
                rows = [dict(row) for row in conn.execute(query, params)]
            finally:
                conn.close()
        return [_typed(row) for row in rows]

    def raw_jobs(self) -> list[tuple[Any, ...]]:
        """Every column of every job row as the driver returns it, for 'unchanged' checks."""
        return self.query("SELECT * FROM ingest_jobs ORDER BY job_id")

    def dead_letters(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The rows of ingest_dead_letters (of *kind*); raises :class:`NoTable` when there is
        no such table (see :meth:`count`)."""
        names = ("id", "job_id", "kind", "reason", "payload", "created_at")
        where, params = ("kind = %s", (kind,)) if kind else ("TRUE", ())
        if not self.table_exists("ingest_dead_letters"):
            raise NoTable("ingest_dead_letters does not exist: no dead letters to read")
        rows = self.query(
            f"SELECT {', '.join(names)} FROM ingest_dead_letters WHERE {where}", params
        )
        return [dict(zip(names, row, strict=True)) for row in rows]


_CLICKHOUSE_QUERIES = """
import json, sys
import clickhouse_connect
client = clickhouse_connect.get_client(dsn=sys.argv[1])
results = []
for sql in json.loads(sys.argv[2]):
    result = client.query(sql)
    results.append([list(result.column_names), [list(r) for r in result.result_rows]])
print(json.dumps(results, default=str))
"""


def clickhouse_queries(url: str, queries: list[str]) -> list[tuple[list[str], list[list[Any]]]]:
    """Run *queries* on ClickHouse in one subprocess: chDB lets a process open one data path
    only, and each crawl's writer process needs the test's path while it runs."""
    out = subprocess.run(
        [sys.executable, "-c", _CLICKHOUSE_QUERIES, url, json.dumps(queries)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if out.returncode != 0:
        raise AssertionError(f"ClickHouse queries failed: {queries}\n{out.stderr[-3000:]}")
    return [(columns, rows) for columns, rows in json.loads(out.stdout)]


def clickhouse_query(url: str, sql: str) -> tuple[list[str], list[list[Any]]]:
    return clickhouse_queries(url, [sql])[0]


def _has_code(statement: str) -> bool:
    return any(line.strip() and not line.strip().startswith("--") for line in statement.split("\n"))


_TIMESTAMPS = {
    "started_at",
    "updated_at",
    "finished_at",
    "logged_at",
    "scraped_at",
    "created_at",
    "first_seen_at",
    "last_seen_at",
}
_JSON = {"data", "stats", "settings", "log_counts", "headers", "errors", "quality"}


def _typed(row: dict[str, Any]) -> dict[str, Any]:
    typed = dict(row)
    for name, value in row.items():
        if value is None:
            continue
        if name == "id" or name.endswith("_id"):
            typed[name] = str(value)
        elif name in _TIMESTAMPS:
            typed[name] = parse_timestamp(value)
        elif name in _JSON:
            typed[name] = parse_json(value)
    return typed


# PostgreSQL: a role with a password, to check that the password never shows


@dataclass
class PasswordRole:
    name: str
    password: str
    url: str  # the database URL with this role's name and password in its userinfo


def password_role(pg_url: str) -> Iterator[PasswordRole]:
    """Create a login role with a random password that may create tables in *pg_url*'s
    database; drop it (and what it owns there) afterwards. Works with trust and password
    authentication alike."""
    import psycopg
    from psycopg import sql

    name = f"ingest_role_{secrets.token_hex(4)}"
    password = f"secretpw{secrets.token_hex(6)}"
    with psycopg.connect(pg_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(password)
            )
        )
        conn.execute(sql.SQL("GRANT ALL ON SCHEMA public TO {}").format(sql.Identifier(name)))
    parts = urlsplit(pg_url)
    host = parts.netloc.rpartition("@")[2]
    url = urlunsplit(parts._replace(netloc=f"{name}:{quote(password, safe='')}@{host}"))
    try:
        yield PasswordRole(name, password, url)
    finally:
        with psycopg.connect(pg_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


# a database that refuses the crawl (tests/test_backend_refused.py, tests/test_mysql_refused.py)


def refused_crawl_args(
    site: LocalSite, url: str, tmp_path: Path, *, pages: int = 5, **settings: Any
) -> dict[str, Any]:
    """A small crawl (*pages* pages of 20 items) into *url*, spilling to ``tmp_path/spill``."""
    return {
        "base_url": site.base_url,
        "pages": pages,
        "per_page": 20,
        "settings": {
            "INGEST_DATABASE_URL": url,
            "INGEST_SPILL_DIR": str(tmp_path / "spill"),
            "INGEST_FLUSH_INTERVAL": 0.2,
            **settings,
        },
    }


def spilled(tmp_path: Path) -> list[Path]:
    """The files the crawl left in its spill journal (``tmp_path / "spill"``)."""
    root = tmp_path / "spill"
    files = root.rglob("*") if root.exists() else []
    return [p for p in files if p.is_file() and p.name != "DATABASE"]


def errors(result: CrawlResult) -> list[str]:
    """The crawl's ERROR and CRITICAL log lines."""
    return re.findall(r"^.* (?:ERROR|CRITICAL): .*$", result.output, re.MULTILINE)


def assert_refused_at_start(
    result: CrawlResult, site: LocalSite, tmp_path: Path, hidden: list[str], *expected: str
) -> None:
    """The crawl did not start: no request, a non-zero exit code, one ERROR naming the cause
    and the fix, none of *hidden* (passwords) shown, nothing spilled."""
    assert site.hits == [], result.describe()
    assert result.returncode != 0, result.describe()
    assert "item_scraped_count" not in result.stats, result.describe()
    [error] = errors(result)
    for text in (*expected, "Fix:", "(the database of INGEST_DATABASE_URL)"):
        assert text in error, (text, result.describe())
    assert "Traceback" not in result.output, result.describe()
    for secret in hidden:
        assert secret not in result.output, result.describe()
    assert not spilled(tmp_path), spilled(tmp_path)


def job_row(job_id: str, **values: Any) -> dict[str, Any]:
    """A finished job row as a crawl writes it (and spills it), with *values* changed."""
    return {
        "job_id": job_id,
        "crawl_id": job_id,
        "spider": "spilled",
        "status": "finished",
        "hostname": "h",
        "pid": 1,
        "started_at": 1.7e9,
        "updated_at": 1.7e9 + 5,
        "finished_at": 1.7e9 + 5,
        "close_reason": "finished",
        "items_count": 0,
        "requests_count": 0,
        "errors_count": 0,
        "log_counts": b"{}",
        "stats": b"{}",
        "settings": b"{}",
        **values,
    }
