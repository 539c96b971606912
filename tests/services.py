"""Services the test suite runs against: a PostgreSQL server and a small local HTTP site.

Kept out of ``conftest.py`` so the logic is plain Python (usable from ``bench/`` scripts or a
REPL) and ``conftest.py`` stays a thin layer of fixtures.

PostgreSQL is found by this chain, first hit wins:

1. ``SCRAPY_INGEST_TEST_PG_DSN``: a server the developer or CI already runs;
2. testcontainers, when it is installed and a Docker engine answers;
3. a throwaway server started here from the ``initdb``/``pg_ctl`` binaries of the machine.

When none works, :class:`ServiceUnavailable` carries the reason of every step, so a skipped
(or, in CI, failed) test says exactly what to install or set.
"""

from __future__ import annotations

import contextlib
import email.utils
import gc
import html
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlsplit, urlunsplit

if TYPE_CHECKING:
    from collections.abc import Iterator

PG_DSN_ENV = "SCRAPY_INGEST_TEST_PG_DSN"
REQUIRE_SERVICES_ENV = "SCRAPY_INGEST_REQUIRE_SERVICES"
PG_IMAGE = "postgres:16-alpine"
PG_LIB_DIR = Path("/usr/lib/postgresql")


class ServiceUnavailable(Exception):
    """A test service could not be found or started; the message says why and what to do."""


def services_required() -> bool:
    """True in CI: a missing service must fail the run instead of silently skipping tests."""
    return os.environ.get(REQUIRE_SERVICES_ENV, "").strip().lower() in {"1", "true", "yes"}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the caller must cope with losing a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------------------------
# PostgreSQL: DSN helpers
# --------------------------------------------------------------------------------------------


def as_url(dsn: str) -> str:
    """Return ``dsn`` in URL form; libpq ``key=value`` strings (allowed in the env var) are
    converted because the library under test takes URLs (``INGEST_DATABASE_URL``)."""
    if dsn.startswith("postgres://"):
        return "postgresql://" + dsn[len("postgres://") :]
    if dsn.startswith("postgresql://"):
        return dsn
    from psycopg.conninfo import conninfo_to_dict

    params = {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v is not None}
    user = quote(params.pop("user", ""), safe="")
    password = params.pop("password", None)
    auth = f"{user}:{quote(password, safe='')}@" if password is not None else f"{user}@"
    host = params.pop("host", "127.0.0.1")
    port = params.pop("port", "5432")
    dbname = quote(params.pop("dbname", "postgres"), safe="")
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in sorted(params.items()))
    return urlunsplit(("postgresql", f"{auth}{host}:{port}", f"/{dbname}", query, ""))


def with_database(url: str, dbname: str) -> str:
    """``url`` pointing at database ``dbname`` instead, everything else unchanged."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(dbname, safe="")))


def create_database(admin_url: str) -> str:
    """Create a fresh, empty database next to ``admin_url``'s and return its name."""
    import psycopg
    from psycopg import sql

    name = f"t_{secrets.token_hex(6)}"
    # CREATE DATABASE cannot run inside a transaction block, hence autocommit.
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name


def drop_database(admin_url: str, name: str) -> None:
    """Drop ``name`` even if a test leaked connections to it (FORCE needs PostgreSQL >= 13)."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


# --------------------------------------------------------------------------------------------
# PostgreSQL: the three sources
# --------------------------------------------------------------------------------------------


def postgres_from_env() -> str | None:
    dsn = os.environ.get(PG_DSN_ENV, "").strip()
    return as_url(dsn) if dsn else None


def postgres_from_docker(stack: contextlib.ExitStack) -> str:
    """Start a PostgresContainer; raise ServiceUnavailable when that is not possible here."""
    # testcontainers/docker warn on import (deprecated modules); under filterwarnings=error
    # that would turn "no Docker" into a crash, so silence them just for the probe.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import docker
        except ImportError:
            raise ServiceUnavailable("testcontainers/docker not installed") from None
        try:
            postgres_container = _import_postgres_container()
        except ImportError:
            raise ServiceUnavailable("testcontainers[postgres] not installed") from None
        if not _docker_answers(docker):
            raise ServiceUnavailable("no Docker engine answers")
        container = postgres_container(PG_IMAGE, driver=None)
        try:
            container.start()
        except Exception as exc:
            with contextlib.suppress(Exception):
                container.stop()  # a half-started container must not outlive the session
            raise ServiceUnavailable(f"testcontainers could not start {PG_IMAGE}: {exc}") from None
    stack.callback(container.stop)
    return as_url(container.get_connection_url())


def _docker_answers(docker: Any) -> bool:
    """Ping the engine; the caller must have warnings silenced (see below)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://") and not Path(host[len("unix://") :]).exists():
        return False  # the common case, answered without touching docker-py
    try:
        with contextlib.closing(docker.from_env(timeout=5)) as client:
            return bool(client.ping())
    except Exception:  # refused, timeout, bad DOCKER_HOST, ...: all mean "no usable engine"
        return False
    finally:
        # docker-py leaks its socket when the connection fails; collect it now, while warnings
        # are silenced, rather than let a ResourceWarning hit a random later test as an error.
        gc.collect()


CH_URL_ENV = "SCRAPY_INGEST_TEST_CH_URL"
CH_IMAGE = "clickhouse/clickhouse-server:25.8"


def clickhouse_server(stack: contextlib.ExitStack) -> str:
    """URL (``clickhouse://user:pw@host:port``, no database) of a real ClickHouse server:
    ``SCRAPY_INGEST_TEST_CH_URL``, else a testcontainers one when a Docker engine answers."""
    url = os.environ.get(CH_URL_ENV)
    if url:
        return url
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import docker
            from testcontainers.core.container import DockerContainer
            from testcontainers.core.waiting_utils import wait_for_logs
        except ImportError:
            raise ServiceUnavailable(
                f"{CH_URL_ENV} is not set and testcontainers is missing"
            ) from None
        if not _docker_answers(docker):
            raise ServiceUnavailable(f"{CH_URL_ENV} is not set and no Docker engine answers")
        container = (
            DockerContainer(CH_IMAGE)
            .with_env("CLICKHOUSE_USER", "test")
            .with_env("CLICKHOUSE_PASSWORD", "test")
            .with_exposed_ports(8123)
        )
        try:
            container.start()
            wait_for_logs(container, "Ready for connections", timeout=120)
        except Exception as exc:
            with contextlib.suppress(Exception):
                container.stop()
            raise ServiceUnavailable(f"testcontainers could not start {CH_IMAGE}: {exc}") from None
    stack.callback(container.stop)
    host, port = container.get_container_host_ip(), container.get_exposed_port(8123)
    return f"clickhouse://test:test@{host}:{port}"


def _import_postgres_container() -> type:
    # testcontainers >= 4.14 moved it to .community; older 4.x only has the top-level module.
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:
        from testcontainers.postgres import PostgresContainer
    return PostgresContainer


def find_pg_bindir() -> Path | None:
    """The bin dir of the newest PostgreSQL under /usr/lib/postgresql, else from PATH."""
    versions = [
        d for d in PG_LIB_DIR.glob("*") if d.name.isdigit() and (d / "bin" / "initdb").is_file()
    ]
    if versions:
        newest = max(versions, key=lambda d: int(d.name))
        return newest / "bin"
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class LocalPostgres:
    """A throwaway server in a temp dir, listening on 127.0.0.1 only, trust auth, no fsync.

    PostgreSQL refuses to run as root, so as root every command runs as the ``postgres`` user
    (created by the Debian package) through ``runuser``, on a data dir that user owns.
    """

    bindir: Path
    port: int = 0
    base: Path | None = None
    _as_postgres: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        # trust auth ignores the password; it is there so the DSN has the usual shape.
        return f"postgresql://postgres:postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> str:
        self._as_postgres = self._run_as_prefix()
        self.base = self._make_base_dir()
        self._initdb()
        # The port is picked before the server binds it, so another process may win the race.
        last_error = ""
        for _ in range(3):
            self.port = free_port()
            ok, last_error = self._pg_ctl_start()
            if ok:
                return self.url
        self.stop()
        raise ServiceUnavailable(f"local PostgreSQL did not start: {last_error}")

    def pause(self) -> None:
        """Stop the server, keeping its data, so that :meth:`resume` can start it again."""
        assert self.base is not None
        self._run(
            [self._bin("pg_ctl"), "-D", str(self.base / "data"), "-m", "fast", "-w", "stop"],
            timeout=60,
            check=True,
        )

    def resume(self) -> None:
        ok, error = self._pg_ctl_start()
        if not ok:
            raise ServiceUnavailable(f"local PostgreSQL did not start again: {error}")

    def stop(self) -> None:
        if self.base is None:
            return
        data = self.base / "data"
        if (data / "postmaster.pid").exists():
            for mode in ("fast", "immediate"):
                result = self._run(
                    [self._bin("pg_ctl"), "-D", str(data), "-m", mode, "-w", "-t", "30", "stop"],
                    timeout=60,
                    check=False,
                )
                if result.returncode == 0:
                    break
        shutil.rmtree(self.base, ignore_errors=True)
        self.base = None

    def _run_as_prefix(self) -> list[str]:
        if os.geteuid() != 0:
            return []
        # runuser lives in sbin, which a minimal PATH (cron, CI, env -i) may leave out.
        search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
        runuser = shutil.which("runuser", path=search)
        if runuser is None:
            raise ServiceUnavailable("running as root and `runuser` is missing (util-linux)")
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise ServiceUnavailable(
                "running as root and there is no `postgres` user to run the server as"
            ) from None
        return [runuser, "-u", "postgres", "--"]

    def _make_base_dir(self) -> Path:
        # Under /tmp as root: the postgres user must be able to reach it, and TMPDIR might
        # point somewhere private to root.
        base = Path(
            tempfile.mkdtemp(prefix="scrapy-ingest-pg-", dir="/tmp" if self._as_postgres else None)
        )
        (base / "sock").mkdir()
        if self._as_postgres:
            user = pwd.getpwnam("postgres")
            for path in (base, base / "sock"):
                os.chown(path, user.pw_uid, user.pw_gid)
        return base

    def _initdb(self) -> None:
        assert self.base is not None
        flags = ["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"]
        cmd = [self._bin("initdb"), "-D", str(self.base / "data"), *flags]
        result = self._run(cmd, timeout=180, check=False)
        if result.returncode != 0:
            self.stop()
            raise ServiceUnavailable(f"initdb failed: {_tail(result.stdout + result.stderr)}")

    def _pg_ctl_start(self) -> tuple[bool, str]:
        assert self.base is not None
        options = (
            f"-k {self.base / 'sock'} -h 127.0.0.1 -p {self.port} -c fsync=off"
            " -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        log = self.base / "postgres.log"
        data = str(self.base / "data")
        cmd = [self._bin("pg_ctl"), "-D", data, "-l", str(log), "-w", "-t", "60", "-o", options]
        result = self._run([*cmd, "start"], timeout=120, check=False)
        if result.returncode == 0:
            return True, ""
        log_text = log.read_text(errors="replace") if log.exists() else ""
        return False, _tail(result.stdout + result.stderr + log_text)

    def _bin(self, name: str) -> str:
        return str(self.bindir / name)

    def _run(
        self, cmd: list[str], *, timeout: float, check: bool
    ) -> subprocess.CompletedProcess[str]:
        # cwd=base: as the postgres user, the caller's cwd (e.g. /root) may be unreadable.
        return subprocess.run(
            [*self._as_postgres, *cmd],
            cwd=self.base,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def postgres_local(stack: contextlib.ExitStack) -> str:
    bindir = find_pg_bindir()
    if bindir is None:
        raise ServiceUnavailable(
            f"no initdb in {PG_LIB_DIR}/*/bin or on PATH (apt-get install postgresql)"
        )
    server = LocalPostgres(bindir)
    stack.callback(server.stop)
    return server.start()


def own_postgres(
    stack: contextlib.ExitStack, password: str = "postgres"
) -> tuple[LocalPostgres, str]:
    """A local PostgreSQL that the caller may stop and start (stopped with *stack*), and the
    URL of a fresh database on it, with *password* in it (trust auth ignores it). Raise
    ServiceUnavailable without PostgreSQL's binaries."""
    bindir = find_pg_bindir()
    if bindir is None:
        raise ServiceUnavailable("no PostgreSQL binaries (apt-get install -y postgresql)")
    local = LocalPostgres(bindir)
    stack.callback(local.stop)
    admin = local.start()
    url = with_database(admin, create_database(admin))
    return local, url.replace(":postgres@", f":{password}@")


def start_postgres(stack: contextlib.ExitStack) -> tuple[str, str]:
    """Return ``(url, source)`` of a PostgreSQL server; cleanup is pushed onto ``stack``."""
    url = postgres_from_env()
    if url is not None:
        return url, "env"
    reasons = [f"{PG_DSN_ENV} is not set"]
    for source, start in (("testcontainers", postgres_from_docker), ("local", postgres_local)):
        try:
            return start(stack), source
        except ServiceUnavailable as exc:
            reasons.append(f"{source}: {exc}")
    raise ServiceUnavailable("no PostgreSQL server for tests: " + "; ".join(reasons))


# --------------------------------------------------------------------------------------------
# MariaDB: env URL, else a throwaway local server (Debian's mariadb-server)
# --------------------------------------------------------------------------------------------

MYSQL_URL_ENV = "SCRAPY_INGEST_TEST_MYSQL_URL"


def start_mariadb(stack: contextlib.ExitStack, *, grant_tables: bool = False) -> tuple[str, str]:
    """Return ``(url, source)`` of a MariaDB or MySQL server (``mysql+pymysql://...``, no
    database); cleanup is pushed onto ``stack``.

    The local server trusts everyone (``--skip-grant-tables``, quicker); with *grant_tables*
    it checks passwords and privileges as production does (``root@127.0.0.1`` has no
    password), and is always a local one: a server from the environment may not check them.
    """
    url = os.environ.get(MYSQL_URL_ENV)
    if url and not grant_tables:
        return url, "env"
    server = shutil.which("mariadbd", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", ""))
    install = shutil.which("mariadb-install-db")
    if server is None or install is None:
        raise ServiceUnavailable(
            f"no MariaDB server for tests: {MYSQL_URL_ENV} is not set and mariadb-server is "
            "not installed (apt-get install -y mariadb-server)"
        )
    base = Path(tempfile.mkdtemp(prefix="scrapy_ingest_mariadb_"))
    stack.callback(shutil.rmtree, base, ignore_errors=True)
    data, socket_path, port = base / "data", base / "mysqld.sock", free_port()
    user = ["--user=root"] if os.geteuid() == 0 else []
    trust = [] if grant_tables else ["--skip-grant-tables"]
    done = subprocess.run(
        [install, "--no-defaults", f"--datadir={data}", "--skip-test-db",
         "--auth-root-authentication-method=normal", *user],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise ServiceUnavailable(f"mariadb-install-db failed: {_tail(done.stderr or done.stdout)}")
    log = (base / "server.log").open("wb")
    stack.callback(log.close)
    process = subprocess.Popen(
        [server, "--no-defaults", f"--datadir={data}", f"--socket={socket_path}",
         f"--port={port}", "--bind-address=127.0.0.1", "--skip-name-resolve",
         "--innodb-buffer-pool-size=64M", *trust, *user],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    stack.callback(stop_process, process)
    _wait_until_listening(process, port, base / "server.log", "mariadbd", timeout=60)
    return f"mysql+pymysql://root@127.0.0.1:{port}", "local"


# --------------------------------------------------------------------------------------------
# Redis: env URL, else a throwaway local redis-server (Debian's redis-server)
# --------------------------------------------------------------------------------------------

REDIS_URL_ENV = "SCRAPY_INGEST_TEST_REDIS_URL"


def start_redis(stack: contextlib.ExitStack) -> tuple[str, str]:
    """Return ``(url, source)`` of a Redis server (``redis://host:port/db``); cleanup is pushed
    onto ``stack``. A local server listens on 127.0.0.1 only and keeps nothing on disk."""
    url = os.environ.get(REDIS_URL_ENV, "").strip()
    if url:
        return url, "env"
    server = shutil.which("redis-server", path="/usr/bin:/usr/sbin:" + os.environ.get("PATH", ""))
    if server is None:
        raise ServiceUnavailable(
            f"no Redis server for tests: {REDIS_URL_ENV} is not set and redis-server is not "
            "installed (apt-get install -y redis-server)"
        )
    base = Path(tempfile.mkdtemp(prefix="scrapy_ingest_redis_"))
    stack.callback(shutil.rmtree, base, ignore_errors=True)
    port = free_port()
    log = (base / "redis.log").open("wb")
    stack.callback(log.close)
    process = subprocess.Popen(
        [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(base), "--protected-mode", "yes"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    stack.callback(stop_process, process)
    _wait_until_listening(process, port, base / "redis.log", "redis-server", timeout=20)
    return f"redis://127.0.0.1:{port}/0", "local"


def _wait_until_listening(
    process: subprocess.Popen[Any], port: int, log: Path, name: str, *, timeout: float
) -> None:
    """Wait for the server *process* to answer on *port*; raise ServiceUnavailable, with the
    tail of its *log*, if it exits or takes longer than *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not port_answers(port):
        if process.poll() is not None or time.monotonic() > deadline:
            text = log.read_text(errors="replace")
            raise ServiceUnavailable(f"{name} did not start: {_tail(text)}")
        time.sleep(0.05)


def stop_process(process: subprocess.Popen[Any], timeout: float = 30) -> None:
    """Terminate *process*, and kill it if it has not exited after *timeout* seconds."""
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def create_mysql_database(admin_url: str) -> str:
    name = f"t_{secrets.token_hex(6)}"
    with contextlib.closing(_mysql_connect(admin_url)) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name} CHARACTER SET utf8mb4")
    return name


def drop_mysql_database(admin_url: str, name: str) -> None:
    with contextlib.closing(_mysql_connect(admin_url)) as conn, conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name}")


def _mysql_connect(url: str) -> Any:
    import pymysql

    parts = urlsplit(url)
    return pymysql.connect(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 3306,
        user=parts.username or "root",
        password=parts.password or "",
        database=parts.path.lstrip("/") or None,
        autocommit=True,
        charset="utf8mb4",
    )


# --------------------------------------------------------------------------------------------
# tinyproxy: a real HTTP proxy that asks for a user name and password
# --------------------------------------------------------------------------------------------


class Proxy:
    """Debian's tinyproxy on 127.0.0.1 with basic authentication (when *user* is given), in a
    directory of its own; :meth:`stop` and :meth:`start` again keep its port. It adds the
    header ``X-Test-Proxy: <name>`` to what it forwards, so the site can tell proxies apart."""

    def __init__(self, user: str | None, password: str | None, name: str = "proxy") -> None:
        binary = shutil.which("tinyproxy") or (
            "/usr/bin/tinyproxy" if os.path.exists("/usr/bin/tinyproxy") else None
        )
        if binary is None:
            raise ServiceUnavailable("tinyproxy is not installed (apt-get install -y tinyproxy)")
        self.binary = binary
        self.host, self.port = "127.0.0.1", free_port()
        self.user, self.password, self.name = user, password, name
        # outside pytest's dirs (private to root): started as root, tinyproxy runs as nobody
        self.workdir = Path(tempfile.mkdtemp(prefix="scrapy_ingest_tinyproxy_"))
        self.workdir.chmod(0o777)
        self.log_path = self.workdir / "tinyproxy.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``http://user:password@host:port``, the form users put in ``meta["proxy"]``."""
        auth = f"{self.user}:{self.password}@" if self.user else ""
        return f"http://{auth}{self.host}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def start(self) -> None:
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 30",
            "MaxClients 50",
            "Allow 127.0.0.1",
            "LogLevel Info",
            f'LogFile "{self.log_path}"',
            "DisableViaHeader Yes",
            f'AddHeader "X-Test-Proxy" "{self.name}"',
        ]
        if self.user:
            lines.append(f"BasicAuth {self.user} {self.password}")
        if os.geteuid() == 0:
            lines += ["User nobody", "Group nogroup"]
        config = self.workdir / "tinyproxy.conf"
        config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        process = self._process = subprocess.Popen(
            [self.binary, "-d", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while not port_answers(self.port):
            if process.poll() is not None or time.monotonic() > deadline:
                error = process.stderr.read().decode() if process.stderr else ""
                self.stop()
                raise ServiceUnavailable(f"tinyproxy did not start: {error.strip()}")
            time.sleep(0.05)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            stop_process(process, 10)
            if process.stderr is not None:
                process.stderr.close()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def running_tinyproxy(
    user: str | None = None, password: str | None = None, name: str = "proxy"
) -> Iterator[Proxy]:
    """A started :class:`Proxy`, stopped and removed afterwards."""
    proxy = Proxy(user, password, name)
    try:
        proxy.start()
        yield proxy
    finally:
        proxy.remove()


def port_answers(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# --------------------------------------------------------------------------------------------
# Local HTTP site for crawl tests
# --------------------------------------------------------------------------------------------

_PAGE_RE = re.compile(r"^/page/(\d+)$")
_STATUS_RE = re.compile(r"^/status/(\d{3})$")
_PRODUCT_RE = re.compile(r"^/product/(\d+)$")
_NODE_RE = re.compile(r"^/node/(\d+)$")
MAX_DELAY_MS = 10_000
_TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class Visit:
    time: float  # time.time() when the request arrived
    host: str  # its Host header
    path: str  # with the query
    headers: dict[str, str]


class _SiteServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client must not hold up teardown

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _SiteHandler)
        self.hits: list[str] = []
        self.visits: list[Visit] = []
        self.hits_lock = threading.Lock()
        #: the /ratelimit keys and the /node?busy paths hit already, under hits_lock
        self.ratelimited: set[str] = set()
        #: /product/<k> prices that differ from the default (LocalSite.set_price)
        self.prices: dict[int, str] = {}
        #: the Retry-After values of the next /robots.txt answers, each a 503 (fail_robots)
        self.robots_failures: list[str] = []

    def handle_error(self, request: object, client_address: object) -> None:
        # Crawlers drop connections on shutdown; that is not a test failure worth a traceback.
        return


class _SiteHandler(BaseHTTPRequestHandler):
    """Routes (all GET):

    - ``/``: links to ``/page/0`` and ``/items?n=10``;
    - ``/items?n=N&size=S``: ``text/plain`` body ``N`` (spiders make N items of ~S bytes);
    - ``/page/<k>?total=T&fanout=F``: HTML linking to the next F pages below T
      (defaults T=10, F=3), so ``/page/0`` reaches the whole site;
    - ``/node/<k>?total=T&fanout=F&ms=M``: a page of a tree of T pages (defaults T=2000,
      F=10, M=0), linking to its children ``/node/<k*F+1>`` ... ``/node/<k*F+F>`` below T, after
      M milliseconds (at most 10 s); ``/node/0`` reaches every page once, by one link each (the
      distributed crawl tests and bench); with ``&busy=S``, the first hit of page k answers 503
      with ``Retry-After: S`` (after M milliseconds too; its links do not carry ``busy``);
    - ``/status/<code>``: an empty page with that status;
    - ``/delay?ms=M&body_ms=B``: answers after M milliseconds (at most 10 s), the headers first
      and the body B milliseconds (default 0, at most 10 s) after them;
    - ``/redirect?to=PATH``: a 302 to PATH;
    - ``/ratelimit?key=K&after=S``: the first hit per key K answers 429 with ``Retry-After: S``
      (seconds or an HTTP date, as given; with ``&date=1``, the HTTP date S seconds after that
      hit), later hits 200 (the retry tests);
    - ``/robots.txt``: a 503 with ``Retry-After`` for each value ``LocalSite.fail_robots`` was
      given, then (as without them) a 404, which Scrapy takes for "allow all";
    - ``/via?ban=NAME,...``: ``via NAME`` naming the test proxy that forwarded the request
      (its ``X-Test-Proxy`` header, ``direct`` without one), or a 403 for a banned NAME;
    - ``/catalog?n=N``: HTML linking to ``/product/0`` ... ``/product/<N-1>``;
    - ``/product/<k>``: a product page: ``<h1>`` name ``Product k``, ``.price`` (``10+k``.00
      unless ``LocalSite.set_price`` changed it) and ``.sku`` (``sku-<k>``) (the data-quality
      tests crawl the catalog twice, one price changed in between);
    - ``/tree?refused=URL&tls=URL2``: sets a session cookie (``TREE_COOKIE``); HTML linking to a
      small tree of pages (``/page/0?total=4&fanout=2``), a redirect, a 404, a 500, a page slower
      than the tests' download timeout, URL (where nothing listens) and URL2 (an ``https://`` URL
      of a server that speaks plain HTTP: a TLS failure); the request-log tests crawl it.
    """

    server: _SiteServer

    def log_message(self, format: str, *args: object) -> None:
        return  # the default writes every request to stderr

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        visit = Visit(time.time(), self.headers.get("Host", ""), self.path, dict(self.headers))
        with self.server.hits_lock:
            self.server.hits.append(self.path)
            self.server.visits.append(visit)
        try:
            self._route(parts.path, query)
        except ValueError as exc:
            self._send(400, f"bad request: {exc}\n")

    def _route(self, path: str, query: dict[str, str]) -> None:  # noqa: PLR0912, PLR0915 (one flat list)
        if path == "/":
            links = '<a href="/page/0">pages</a> <a href="/items?n=10">items</a>'
            self._send(200, _html("index", links), "text/html; charset=utf-8")
        elif path == "/items":
            n = _non_negative(query.get("n", "0"), "n")
            _non_negative(query.get("size", "0"), "size")
            self._send(200, str(n))
        elif match := _PAGE_RE.match(path):
            self._send(200, _page(int(match[1]), query), "text/html; charset=utf-8")
        elif (match := _NODE_RE.match(path)) and "busy" in query and self._first(path):
            time.sleep(min(_non_negative(query.get("ms", "0"), "ms"), MAX_DELAY_MS) / 1000)
            self._send(503, "busy\n", extra_headers={"Retry-After": query["busy"]})
        elif match := _NODE_RE.match(path):
            time.sleep(min(_non_negative(query.get("ms", "0"), "ms"), MAX_DELAY_MS) / 1000)
            self._send(200, _node(int(match[1]), query), "text/html; charset=utf-8")
        elif match := _STATUS_RE.match(path):
            self._send(int(match[1]), "")
        elif path == "/redirect":
            self.send_response(302)
            self.send_header("Location", query.get("to", "/"))
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/tree":
            links = "".join(f'<a href="{html.escape(link)}">x</a>' for link in _tree_links(query))
            self._send(
                200,
                _html("tree", links),
                "text/html; charset=utf-8",
                extra_headers={"Set-Cookie": f"tree_session={TREE_COOKIE}; Path=/"},
            )
        elif path == "/via":
            proxy = self.headers.get("X-Test-Proxy", "direct")
            if proxy in query.get("ban", "").split(","):
                self._send(403, f"banned: {proxy}\n")
            else:
                self._send(200, f"via {proxy}\n")
        elif path == "/ratelimit":
            first = self._first(query.get("key", ""))
            after = query.get("after", "1")
            if query.get("date") == "1":
                after = email.utils.formatdate(time.time() + float(after), usegmt=True)
            if first:
                self._send(429, "slow down\n", extra_headers={"Retry-After": after})
            else:
                self._send(200, "ok")
        elif path == "/robots.txt" and self.server.robots_failures:
            with self.server.hits_lock:
                after = self.server.robots_failures.pop(0) if self.server.robots_failures else ""
            if after:
                self._send(503, "down for a moment\n", extra_headers={"Retry-After": after})
            else:
                self._send(404, "not found\n")
        elif path == "/delay":
            time.sleep(min(_non_negative(query.get("ms", "0"), "ms"), MAX_DELAY_MS) / 1000)
            body_delay = min(_non_negative(query.get("body_ms", "0"), "body_ms"), MAX_DELAY_MS)
            self._send(200, "ok", body_delay=body_delay / 1000)
        elif path == "/catalog":
            n = _non_negative(query.get("n", "10"), "n")
            links = "".join(f'<a href="/product/{k}">product {k}</a>' for k in range(n))
            self._send(200, _html("catalog", links), "text/html; charset=utf-8")
        elif match := _PRODUCT_RE.match(path):
            k = int(match[1])
            with self.server.hits_lock:
                price = self.server.prices.get(k, f"{10 + k}.00")
            body = (
                f'<h1>Product {k}</h1><span class="price">{html.escape(price)}</span>'
                f'<span class="sku">sku-{k}</span>'
            )
            self._send(200, _html(f"product {k}", body), "text/html; charset=utf-8")
        else:
            self._send(404, "not found\n")

    def _first(self, key: str) -> bool:
        """Whether this is the first hit of *key* (a /ratelimit key, a /node path)."""
        with self.server.hits_lock:
            first = key not in self.server.ratelimited
            self.server.ratelimited.add(key)
        return first

    def _send(
        self,
        status: int,
        body: str,
        content_type: str = _TEXT,
        extra_headers: dict[str, str] | None = None,
        body_delay: float = 0,
    ) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in (extra_headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()  # sends the headers
        if body_delay:
            time.sleep(body_delay)
        self.wfile.write(data)


#: the session cookie /tree sets (a secret that must never be stored)
TREE_COOKIE = "tree-cookie-secret"
#: where /tree links, besides the URL where nothing listens
TREE_LINKS = (
    "/page/0?total=4&fanout=2",
    "/redirect?to=/page/9%3Ftotal%3D4",
    "/status/404",
    "/status/500",
    "/delay?ms=3000",
)


def _tree_links(query: dict[str, str]) -> list[str]:
    return [*TREE_LINKS, *(query[name] for name in ("refused", "tls") if name in query)]


def _non_negative(value: str, name: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"{name} must be >= 0")
    return number


def _page(k: int, query: dict[str, str]) -> str:
    total = _non_negative(query.get("total", "10"), "total")
    fanout = _non_negative(query.get("fanout", "3"), "fanout")
    links = "".join(
        f'<li><a href="/page/{j}?total={total}&amp;fanout={fanout}">page {j}</a></li>'
        for j in range(k + 1, min(k + 1 + fanout, total))
    )
    return _html(f"page {k}", f"<h1>page {k}</h1><ul>{links}</ul>")


def _node(k: int, query: dict[str, str]) -> str:
    total = _non_negative(query.get("total", "2000"), "total")
    fanout = _non_negative(query.get("fanout", "10"), "fanout")
    ms = query.get("ms", "0")
    first = k * fanout + 1
    links = "".join(
        f'<li><a href="/node/{j}?total={total}&amp;fanout={fanout}&amp;ms={ms}">node {j}</a></li>'
        for j in range(first, min(first + fanout, total))
    )
    return _html(f"node {k}", f"<h1>node {k}</h1><ul>{links}</ul>")


def _html(title: str, body: str) -> str:
    return f"<!doctype html><html><head><title>{title}</title></head><body>{body}</body></html>"


class LocalSite:
    """The test site on ``127.0.0.1:<free port>``, served from a background thread."""

    def __init__(self) -> None:
        self._server = _SiteServer()
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="test-site", daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def url(self, path: str = "/") -> str:
        return self.base_url + (path if path.startswith("/") else "/" + path)

    @property
    def hits(self) -> list[str]:
        """Paths (with query) requested since the last :meth:`reset`, in arrival order."""
        with self._server.hits_lock:
            return list(self._server.hits)

    @property
    def visits(self) -> list[Visit]:
        """Every request since the last :meth:`reset`, with its time and headers."""
        with self._server.hits_lock:
            return list(self._server.visits)

    def set_price(self, k: int, price: str) -> None:
        """Change the price that ``/product/<k>`` shows."""
        with self._server.hits_lock:
            self._server.prices[k] = price

    def fail_robots(self, *retry_after: str) -> None:
        """The next ``/robots.txt`` requests get a 503 each, with these ``Retry-After`` values."""
        with self._server.hits_lock:
            self._server.robots_failures[:] = retry_after

    def reset(self) -> None:
        with self._server.hits_lock:
            self._server.robots_failures.clear()
            self._server.prices.clear()
            self._server.hits.clear()
            self._server.visits.clear()
            self._server.ratelimited.clear()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


@contextlib.contextmanager
def running_site() -> Iterator[LocalSite]:
    site = LocalSite()
    site.start()
    try:
        yield site
    finally:
        site.stop()
