"""Under a real scrapyd (from PyPI, on 127.0.0.1, in a working directory of its own): a project
deployed as an egg, its jobs scheduled, and their job rows, items and spill journal found again
the way docs/quickstart.md ("Running under scrapyd") tells a user to."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
import urllib.parse
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
import services
from _helpers import REPO_DIR, Database, ingest_command, wait_for
from conftest import service_missing

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from services import LocalSite

pytestmark = [pytest.mark.crawl, pytest.mark.postgres, pytest.mark.slow]

PROJECT = "shop"
SPIDER = "products"
PRODUCTS = 5
#: in the PostgreSQL URL of the spilled job: trust auth ignores it; no file may keep it
PASSWORD = "scrapyd-planted-pw-7e2"

SETTINGS_PY = """\
BOT_NAME = "shop"
SPIDER_MODULES = ["shop.spiders"]
NEWSPIDER_MODULE = "shop.spiders"
ROBOTSTXT_OBEY = True
ADDONS = {"scrapy_ingest.IngestAddon": 300}
"""

SPIDER_PY = """\
import scrapy


class ProductsSpider(scrapy.Spider):
    name = "products"

    def __init__(self, catalog, **kwargs):
        super().__init__(**kwargs)
        self.start_urls = [catalog]

    def parse(self, response):
        yield from response.follow_all(css="a", callback=self.parse_product)

    def parse_product(self, response):
        yield {
            "name": response.css("h1::text").get(),
            "price": response.css(".price::text").get(),
            "sku": response.css(".sku::text").get(),
        }
"""

SETUP_PY = """\
# as scrapyd-deploy writes it
from setuptools import find_packages, setup

setup(
    name="project",
    version="1.0",
    packages=find_packages(),
    entry_points={"scrapy": ["settings = shop.settings"]},
)
"""

SCRAPY_CFG = """\
[settings]
default = shop.settings

[deploy]
project = shop
"""


@dataclass
class Scrapyd:
    """A scrapyd of the test's own: its working directory and its HTTP API."""

    workdir: Path
    url: str

    def call(self, endpoint: str, fields: list[tuple[str, str]] | None = None) -> Any:
        """GET *endpoint* (POST *fields* if given); the decoded answer, which must be "ok"."""
        data = urllib.parse.urlencode(fields).encode() if fields is not None else None
        with urllib.request.urlopen(f"{self.url}/{endpoint}", data=data, timeout=30) as answer:
            body = json.loads(answer.read())
        assert body.get("status") == "ok", body
        return body

    def add_version(self, project: str, version: str, egg: bytes) -> None:
        """Upload an egg, as scrapyd-deploy does (multipart/form-data)."""
        boundary = secrets.token_hex(16)
        parts = [
            *(_form_field(boundary, name, value) for name, value in (
                ("project", project), ("version", version)
            )),
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="egg"; '
                f'filename="{project}.egg"\r\nContent-Type: application/octet-stream\r\n\r\n'
            ).encode() + egg + b"\r\n",
            f"--{boundary}--\r\n".encode(),
        ]  # fmt: skip
        request = urllib.request.Request(
            f"{self.url}/addversion.json",
            data=b"".join(parts),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            body = json.loads(answer.read())
        assert body.get("status") == "ok" and body.get("spiders") == 1, body

    def schedule(self, spider: str, *, settings: dict[str, str], **arguments: str) -> str:
        """Schedule a job of *spider* (settings as scrapyd's ``setting=NAME=VALUE``); its id."""
        fields = [("project", PROJECT), ("spider", spider), *arguments.items()]
        fields += [("setting", f"{name}={value}") for name, value in settings.items()]
        jobid: str = self.call("schedule.json", fields)["jobid"]
        return jobid

    def wait_finished(self, jobids: list[str], timeout: float = 60) -> None:
        def finished() -> bool:
            jobs = self.call(f"listjobs.json?project={PROJECT}")
            return set(jobids) <= {job["id"] for job in jobs["finished"]}

        wait_for(finished, timeout=timeout, interval=0.2, what=f"scrapyd jobs {jobids}")

    def log(self, jobid: str) -> str:
        """The log of a job, where scrapyd keeps it (logs_dir)."""
        return (self.workdir / "logs" / PROJECT / SPIDER / f"{jobid}.log").read_text()


def _form_field(boundary: str, name: str, value: str) -> bytes:
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
    ).encode()


@pytest.fixture
def scrapyd(tmp_path: Path) -> Iterator[Scrapyd]:
    """scrapyd, as ``scrapyd`` started in a directory with a scrapyd.conf: listening on
    127.0.0.1 only, polling its queue often, stopped after the test."""
    workdir = tmp_path / "scrapyd"
    workdir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO_DIR)}
    for name in ("SCRAPY_SETTINGS_MODULE", "SCRAPY_PROJECT", "SCRAPY_JOB"):
        env.pop(name, None)
    with ExitStack() as stack:
        for _ in range(3):  # the port is picked before scrapyd binds it: another may win
            port = services.free_port()
            (workdir / "scrapyd.conf").write_text(
                textwrap.dedent(f"""\
                    [scrapyd]
                    bind_address = 127.0.0.1
                    http_port = {port}
                    eggs_dir = eggs
                    logs_dir = logs
                    items_dir =
                    dbs_dir = dbs
                    jobs_to_keep = 5
                    max_proc = 4
                    poll_interval = 0.2
                """)
            )
            log = workdir / "scrapyd.out"
            process = subprocess.Popen(
                [sys.executable, "-m", "scrapyd"],
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stack.enter_context(log.open("w")),
                stderr=subprocess.STDOUT,
            )
            stack.callback(services.stop_process, process)
            try:
                services._wait_until_listening(process, port, log, "scrapyd", timeout=30)
            except services.ServiceUnavailable:
                if process.poll() is None:
                    raise
                continue
            yield Scrapyd(workdir, f"http://127.0.0.1:{port}")
            return
        raise AssertionError(f"scrapyd did not start:\n{log.read_text()[-3000:]}")


@pytest.fixture
def postgres() -> Iterator[tuple[services.LocalPostgres, str]]:
    """A PostgreSQL of this test's own, which it stops and starts; and a database URL."""
    with ExitStack() as stack:
        try:
            yield services.own_postgres(stack, PASSWORD)
        except services.ServiceUnavailable as exc:
            service_missing(str(exc))


def make_project(root: Path) -> tuple[Path, bytes]:
    """A project as ``scrapy startproject shop`` makes it, with the add-on line and a spider;
    its directory and its egg, built as scrapyd-deploy builds it."""
    project = root / PROJECT
    (project / "shop" / "spiders").mkdir(parents=True)
    (project / "scrapy.cfg").write_text(SCRAPY_CFG)
    (project / "setup.py").write_text(SETUP_PY)
    (project / "shop" / "__init__.py").write_text("")
    (project / "shop" / "settings.py").write_text(SETTINGS_PY)
    (project / "shop" / "spiders" / "__init__.py").write_text("")
    (project / "shop" / "spiders" / "products.py").write_text(SPIDER_PY)
    dist = root / "dist"
    build = subprocess.run(
        [sys.executable, "setup.py", "-q", "bdist_egg", "-d", str(dist)],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    [egg] = dist.glob("*.egg")
    return project, egg.read_bytes()


def storing_line(log: str) -> str:
    [line] = [line for line in log.splitlines() if "Storing crawl data in" in line]
    return line


def stored(url: str, jobid: str) -> tuple[tuple[Any, ...], list[str]]:
    """The job row (status, spider, items_count) of *jobid* and its items' skus, by SQL as
    docs/quickstart.md queries them."""
    db = Database(url)
    [job] = db.query(
        "SELECT status, spider, items_count FROM ingest_jobs WHERE job_id = %s", (jobid,)
    )
    skus = [
        json.loads(data)["sku"] if isinstance(data, str) else data["sku"]
        for (data,) in db.query("SELECT data FROM ingest_items WHERE job_id = %s", (jobid,))
    ]
    return job, sorted(skus)


def test_scrapyd_jobs_rows_items_and_spill_journal_are_found_where_the_docs_say(
    scrapyd: Scrapyd,
    site: LocalSite,
    postgres: tuple[services.LocalPostgres, str],
    tmp_path: Path,
) -> None:
    project, egg = make_project(tmp_path)
    scrapyd.add_version(PROJECT, "1", egg)
    catalog = site.url(f"/catalog?n={PRODUCTS}")
    skus = [f"sku-{k}" for k in range(PRODUCTS)]

    # what the docs tell a scrapyd user to set: absolute paths
    data = tmp_path / "data"
    data.mkdir()
    absolute_url = f"sqlite:///{data / 'shop.sqlite3'}"
    absolute = {"INGEST_DATABASE_URL": absolute_url, "INGEST_SPILL_DIR": str(data / "spill")}
    # a database down for the whole job: its batches wait in the default spill journal
    local, pg_url = postgres
    local.pause()
    down = {"INGEST_DATABASE_URL": pg_url, "INGEST_RETRY_TIMEOUT": "1"}

    relative_job = scrapyd.schedule(SPIDER, settings={}, catalog=catalog)
    absolute_job = scrapyd.schedule(SPIDER, settings=absolute, catalog=catalog)
    spilled_job = scrapyd.schedule(SPIDER, settings=down, catalog=catalog)
    scrapyd.wait_finished([relative_job, absolute_job, spilled_job])

    # the default, relative SQLite file and the spill journal are in scrapyd's working
    # directory, and the start of the job's log says so with absolute paths
    default_file = scrapyd.workdir / "ingest.sqlite3"
    default_spill = scrapyd.workdir / ".scrapy" / "ingest-spill"
    line = storing_line(scrapyd.log(relative_job))
    assert f"sqlite:///ingest.sqlite3 (file {default_file})" in line, line
    assert f"(job_id {relative_job})" in line and f"spill journal: {default_spill}" in line, line
    assert stored(f"sqlite:///{default_file}", relative_job) == (
        ("finished", SPIDER, PRODUCTS),
        skus,
    )
    assert not (project / "ingest.sqlite3").exists()

    # absolute settings: `scrapy ingest jobs` and `export`, run from the project, find the job
    # row, under scrapyd's job id, and its items
    line = storing_line(scrapyd.log(absolute_job))
    assert f"{absolute_url} (job_id {absolute_job}); spill journal: {data / 'spill'}" in line
    settings = {"INGEST_DATABASE_URL": absolute_url}
    answer = ingest_command(["jobs", "--json"], settings, project)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    [job] = [json.loads(line) for line in answer.stdout.splitlines()]
    assert (job["job_id"], job["spider"], job["status"], job["items_count"]) == (
        absolute_job,
        SPIDER,
        "finished",
        PRODUCTS,
    )
    exported = tmp_path / "items.jsonl"
    answer = ingest_command(["export", absolute_job, "-O", str(exported)], settings, project)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    items = [json.loads(line) for line in exported.read_text().splitlines()]
    assert sorted(item["sku"] for item in items) == skus

    # the spilled job: its log names the journal, which the project's own does not hold
    line = storing_line(scrapyd.log(spilled_job))
    assert f"spill journal: {default_spill}" in line, line
    assert PASSWORD not in line
    assert list(default_spill.rglob("*.batch")), "nothing spilled"
    settings = {"INGEST_DATABASE_URL": pg_url}
    local.resume()
    answer = ingest_command(["replay"], settings, project)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert f"Nothing to replay in {project / '.scrapy' / 'ingest-spill'}" in answer.stdout
    answer = ingest_command(["replay", "--spill-dir", str(default_spill)], settings, project)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert "replayed" in answer.stdout, answer.stdout
    assert PASSWORD not in answer.stdout + answer.stderr
    assert stored(pg_url, spilled_job) == (("finished", SPIDER, PRODUCTS), skus)
    for path in default_spill.rglob("*"):
        assert not path.is_file() or PASSWORD.encode() not in path.read_bytes(), path
