"""The add-on under Scrapy's own commands, from ``scrapy startproject`` on, as a new user runs
them: the commands that are not crawls (shell, fetch, check, parse without --pipelines) store
nothing and leave no file; ``scrapy crawl`` after them stores its crawl and warns about
nothing; ``parse --pipelines`` stores its items and closes its job row."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from scrapy_ingest import _compat

if TYPE_CHECKING:
    from services import LocalSite

REPO_DIR = Path(__file__).resolve().parent.parent

SPIDER = '''
import scrapy


class CatalogSpider(scrapy.Spider):
    name = "catalog"

    def __init__(self, start=None, **kwargs):
        super().__init__(**kwargs)
        self.start_urls = [start] if start else []

    def parse(self, response):
        """Products of the catalog page.

        @url {catalog}
        @returns items 3 3
        @returns requests 0 0
        """
        for href in response.css("a::attr(href)").getall():
            yield {"link": response.urljoin(href)}
'''

pytestmark = pytest.mark.crawl


def _scrapy(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the ``scrapy`` console script of this venv in *project*, as a user would."""
    scrapy = Path(sys.executable).parent / "scrapy"
    env = {**os.environ, "PYTHONPATH": str(REPO_DIR)}
    env.pop("SCRAPY_SETTINGS_MODULE", None)
    return subprocess.run(
        [str(scrapy), *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def project(tmp_path: Path, site: LocalSite) -> Path:
    """A fresh ``scrapy startproject shop``, with the quickstart's edit of its ``ADDONS = {}``
    and a spider with a contract."""
    made = _scrapy(tmp_path, "startproject", "shop")
    assert made.returncode == 0, made.stderr
    root = tmp_path / "shop"
    settings = root / "shop" / "settings.py"
    text = settings.read_text()
    assert "ADDONS = {}" in text  # the template's line, which the quickstart says to edit
    settings.write_text(text.replace("ADDONS = {}", 'ADDONS = {"scrapy_ingest.IngestAddon": 300}'))
    spider = SPIDER.replace("{catalog}", site.url("/catalog?n=3"))
    (root / "shop" / "spiders" / "catalog.py").write_text(spider)
    return root


def _ingest_rows(database: Path) -> dict[str, int]:
    with sqlite3.connect(database) as conn:
        tables = [
            name
            for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if name.startswith("ingest_") and name != "ingest_schema_version"
        ]
        counts = {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}
    conn.close()
    return counts


def test_commands_that_are_not_crawls_store_nothing(project: Path, site: LocalSite) -> None:
    catalog = site.url("/catalog?n=3")
    runs = [
        _scrapy(project, "shell", "-c", "response.status", catalog),
        _scrapy(project, "fetch", "--nolog", catalog),
        _scrapy(project, "check", "catalog"),
        _scrapy(project, "parse", "--spider", "catalog", "-c", "parse", catalog),
    ]
    for run in runs:
        assert run.returncode == 0, f"{run.args}:\n{run.stdout}\n{run.stderr}"
    assert runs[0].stdout.strip() == "200"
    assert "<a href" in runs[1].stdout
    assert "OK" in runs[2].stderr
    assert "'link'" in runs[3].stdout
    for run in runs:  # none of the storing components, no database, no journal, not a word
        for ours in ("[scrapy_ingest", "IngestPipeline", "RequestLogMiddleware", "IngestJobs"):
            assert ours not in run.stderr, f"{run.args}:\n{run.stderr}"
    database = project / "ingest.sqlite3"
    assert not database.exists()
    assert not (project / ".scrapy" / "ingest-spill").exists()

    crawl = _scrapy(project, "crawl", "catalog", "-a", f"start={catalog}")
    assert crawl.returncode == 0, crawl.stderr
    assert not re.search(r"\] (WARNING|ERROR):", crawl.stderr), crawl.stderr
    rows = _ingest_rows(database)
    assert rows["ingest_jobs"] == 1
    assert rows["ingest_items"] == 3
    assert rows["ingest_requests"] == 2  # robots.txt (the template obeys it) and the page
    with sqlite3.connect(database) as conn:
        status, reason = conn.execute("SELECT status, close_reason FROM ingest_jobs").fetchone()
    conn.close()
    assert (status, reason) == ("finished", "finished")


def test_parse_with_pipelines_stores_its_items(project: Path, site: LocalSite) -> None:
    catalog = site.url("/catalog?n=3")
    run = _scrapy(project, "parse", "--spider", "catalog", "-c", "parse", "--pipelines", catalog)
    assert run.returncode == 0, run.stderr
    database = project / "ingest.sqlite3"
    rows = _ingest_rows(database)
    assert rows["ingest_items"] == 3
    assert rows["ingest_jobs"] == 1
    with sqlite3.connect(database) as conn:
        status, spider = conn.execute("SELECT status, spider FROM ingest_jobs").fetchone()
    conn.close()
    assert (status, spider) == ("finished", "catalog")


def test_the_skipped_commands_are_a_setting(project: Path, site: LocalSite) -> None:
    catalog = site.url("/catalog?n=3")
    run = _scrapy(project, "fetch", "-s", "INGEST_SKIP_COMMANDS=shell", catalog)
    assert run.returncode == 0, run.stderr
    assert _ingest_rows(project / "ingest.sqlite3")["ingest_requests"] == 2


@pytest.mark.parametrize(
    ("orig_argv", "argv", "expected"),
    [
        # the console script: scrapy shell -c x URL
        (
            ["/v/bin/python", "/v/bin/scrapy", "shell", "-c", "x", "u"],
            ["/v/bin/scrapy", "-c", "x", "u"],
            ("shell", ["-c", "x", "u"]),
        ),
        # python -m scrapy --nolog fetch URL
        (
            ["python", "-m", "scrapy", "--nolog", "fetch", "u"],
            ["/s/scrapy/__main__.py", "--nolog", "u"],
            ("fetch", ["--nolog", "u"]),
        ),
        # scrapyd: python -m scrapyd.runner crawl spider -a _job=1
        (
            ["python", "-m", "scrapyd.runner", "crawl", "spider", "-a", "_job=1"],
            ["/s/scrapyd/runner.py", "spider", "-a", "_job=1"],
            ("crawl", ["spider", "-a", "_job=1"]),
        ),
        # a script with CrawlerProcess, and one run as a module: no command
        (["python", "run.py", "shell"], ["run.py", "shell"], None),
        (["python", "-m", "tool", "shell", "x"], ["/t/tool.py", "shell", "x"], None),
        # pytest, which keeps its arguments
        (["python", "-m", "pytest", "tests"], ["/p/pytest/__main__.py", "tests"], None),
        (["/v/bin/python"], [""], None),
    ],
)
def test_scrapy_command(
    monkeypatch: pytest.MonkeyPatch,
    orig_argv: list[str],
    argv: list[str],
    expected: tuple[str, list[str]] | None,
) -> None:
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    monkeypatch.setattr(sys, "argv", argv)
    assert _compat.scrapy_command() == expected


def test_scrapy_pops_the_command_name() -> None:
    """scrapy_command() relies on scrapy.cmdline.execute() taking the command's name out of
    sys.argv (the first argument that is not an option); this breaks if a release stops."""
    from scrapy import cmdline

    argv = ["scrapy", "--nolog", "shell", "-c", "x"]
    assert cmdline._pop_command_name(argv) == "shell"
    assert argv == ["scrapy", "--nolog", "-c", "x"]


def test_a_crawl_that_spills_nothing_leaves_no_data_directory(
    project: Path, site: LocalSite
) -> None:
    """Scrapy makes ``.scrapy/`` only for what it writes there (the HTTP cache, with the
    template's settings off); the add-on's spill journal is made when a batch is spilled."""
    catalog = site.url("/catalog?n=3")
    plain = _scrapy(project, "crawl", "catalog", "-a", f"start={catalog}", "-s", "ADDONS={}")
    assert plain.returncode == 0, plain.stderr
    assert "[scrapy_ingest" not in plain.stderr
    assert not (project / ".scrapy").exists()  # so Scrapy alone makes none here

    crawl = _scrapy(project, "crawl", "catalog", "-a", f"start={catalog}")
    assert crawl.returncode == 0, crawl.stderr
    assert _ingest_rows(project / "ingest.sqlite3")["ingest_items"] == 3
    # the start-up line still names the journal where it would be
    journal = (project / ".scrapy" / "ingest-spill").resolve()
    assert f"spill journal: {journal}" in crawl.stderr, crawl.stderr
    assert not (project / ".scrapy").exists()
