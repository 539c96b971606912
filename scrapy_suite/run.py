"""Scrapy's own tests, run once plain and once with scrapy_ingest switched on in every crawler.

Usage: python scrapy_suite/run.py [--modules tests/test_x.py ...] [--jobs N]

Run it with the Python of the venv where scrapy_ingest and Scrapy are installed (CI: ``.venv``,
made by tests/run.sh; ``tox -e scrapy-suite``). It

1. downloads the sdist of the installed Scrapy version (``pip download``) into
   ``.scrapy-suite-cache/`` (or ``$SCRAPY_SUITE_CACHE``) and unpacks its ``tests/``,
   ``conftest.py`` and ``pyproject.toml`` (which holds its pytest configuration), not its
   ``scrapy/``, so that the installed Scrapy is the one tested;
2. installs the packages those tests need that the venv lacks (``TEST_REQUIREMENTS``) into a
   directory of that cache put on ``PYTHONPATH`` for the run only: pytest-twisted, installed in
   the venv, would load into the project's own pytest runs too and install Twisted's default
   reactor there;
3. runs the ``MODULES`` in three variants: ``plain``; ``addon``, with ``ADDONS =
   {"scrapy_ingest.IngestAddon": 300}`` in Scrapy's default settings of every process, subprocesses
   included (site/sitecustomize.py, on ``PYTHONPATH``), the tests of ``NO_ADDON`` excepted; and
   ``backoff``, the ``BACKOFF_MODULES`` with the add-on and with
   ``scrapy.downloadermiddlewares.retry.RetryMiddleware`` replaced by
   ``scrapy_ingest.BackoffRetryMiddleware`` (so that Scrapy's tests of its RetryMiddleware
   build ours, and every crawl places ours);
4. runs again, alone, each test that passed plain and failed in another variant (a timing test
   can fail once on a busy machine): it is a difference if it fails again;
5. prints the counts, the differences with their errors, and the time taken; exits with 1 when
   a difference is not in ``EXPECTED_DIFFERENCES`` (or when a run broke or passed nothing).

The SQLite files the add-on writes (one per process) and the spill directory are in
``.scrapy-suite-cache/scratch/<variant>/``; each variant's pytest output (the whole error of a
difference) in ``.scrapy-suite-cache/<variant>.log``. It takes about 7 minutes on 2 cores
(Scrapy 2.19: about 330 tests in each of plain and addon, 44 in backoff).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SITE = Path(__file__).resolve().parent / "site"

#: Scrapy's test modules run plain and with the add-on
MODULES = (
    "tests/test_addons.py",
    "tests/test_command_crawl.py",
    "tests/test_commands.py",
    "tests/test_crawl.py",
    "tests/test_crawler_subprocess.py",
    "tests/test_downloadermiddleware_retry.py",
    "tests/test_logformatter.py",
    "tests/test_pipelines.py",
)
#: run a third time with BackoffRetryMiddleware in place of Scrapy's RetryMiddleware:
#: (modules, pytest -k expression)
BACKOFF_MODULES = (("tests/test_downloadermiddleware_retry.py", "tests/test_crawl.py"), "retry")

#: tests that count or list the loaded add-ons: they run without ours (node id prefixes)
NO_ADDON = tuple(
    f"tests/test_addons.py::TestAddonManager::{name}"
    for name in (
        "test_load_settings_order",
        "test_logging_message",
        "test_no_update_settings",
        "test_notconfigured",
        "test_notconfigured_with_args",
    )
)

#: what Scrapy's tests need beyond what scrapy_ingest[test] installs, each with the
#: dependencies it brings (installed with --no-deps, so that pytest stays the venv's)
TEST_REQUIREMENTS = (
    "pytest-twisted>=1.14.3",
    "greenlet",
    "decorator",
    "pexpect>=4.8.0",
    "ptyprocess",
    "pytest-xdist",
    "execnet",
)

#: (variant, node id) of the tests that may pass plain and fail with scrapy_ingest, each with
#: one comment line that quotes the scrapy_ingest doc that explains it
EXPECTED_DIFFERENCES: frozenset[tuple[str, str]] = frozenset(
    {
        # docs/architecture.md: "The storing components (pipeline, extensions, request log, source middleware) share one `IngestRuntime` per crawler" (its ITEM_PROCESSOR builds pipelines as p(): no crawler)  # noqa: E501
        ("addon", "tests/test_pipelines.py::TestCustomPipelineManager::test_integration_no_async_not_subclass"),  # noqa: E501
    }
)  # fmt: skip

#: warnings that Scrapy's filterwarnings = error turns into errors, though they say nothing
#: about Scrapy or scrapy_ingest: a pytest newer than the Scrapy release deprecating what its
#: tests do
WARNINGS = tuple(
    f"-Wignore::pytest.{name}" for name in ("PytestRemovedIn10Warning",) if hasattr(pytest, name)
)

#: a test that hangs fails after this many seconds (pytest-timeout), not the whole run
TEST_TIMEOUT = 180
#: a variant's pytest run is stopped after this many seconds
RUN_TIMEOUT = 1800


@dataclass
class Run:
    """One pytest run of Scrapy's tests: each test's outcome and error."""

    variant: str
    results: dict[str, dict[str, str]] = field(default_factory=dict)
    returncode: int = 0
    seconds: float = 0.0
    #: crawlers that got the add-on (sitecustomize.py), and the processes they ran in
    crawlers: int = 0
    processes: int = 0

    def passed(self) -> set[str]:
        return {node for node, r in self.results.items() if r["outcome"] == "passed"}

    def failed(self) -> set[str]:
        return {node for node, r in self.results.items() if r["outcome"] in FAILED}

    def counts(self) -> str:
        outcomes = [r["outcome"] for r in self.results.values()]
        names = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
        return ", ".join(f"{outcomes.count(n)} {n}" for n in names if outcomes.count(n))


FAILED = {"failed", "error", "xpassed", ""}


@dataclass
class Suite:
    """Scrapy's tests from *sdist*, with the packages in *deps*, run in copies under *cache*."""

    sdist: Path
    deps: Path
    cache: Path
    #: pytest-xdist workers per run
    workers: int

    def run(
        self, variant: str, modules: list[str], k: str | None = None, *, rerun: bool = False
    ) -> Run:
        """Scrapy's *modules* (or node ids) run by pytest, in a fresh copy of its tests."""
        name = f"{variant}-rerun" if rerun else variant
        root = unpack(self.sdist, self.cache / "work" / name)
        scratch = self.cache / "scratch" / name
        shutil.rmtree(scratch, ignore_errors=True)
        (scratch / "spill").mkdir(parents=True)
        config = scratch / "config.json"
        report = scratch / "report.json"
        config.write_text(
            json.dumps({"report": str(report), "no_addon": list(NO_ADDON)}), encoding="utf-8"
        )
        # root: the crawl scripts that Scrapy's tests run in subprocesses import tests.*
        path = (str(SITE), str(self.deps), str(root), os.environ.get("PYTHONPATH"))
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in path if p),
            "SCRAPY_SUITE_MODE": variant,
            "SCRAPY_SUITE_SCRATCH": str(scratch),
            "SCRAPY_SUITE_CONFIG": str(config),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        env.pop("SCRAPY_SUITE_NO_ADDON", None)
        command = [
            sys.executable, "-m", "pytest", "-p", "scrapy_suite_plugin",
            "-p", "no:cacheprovider", "-q", "-rN", "--durations=15",
            f"--timeout={TEST_TIMEOUT}", *WARNINGS, *modules,
        ]  # fmt: skip
        if k:
            command += ["-k", k]
        # a rerun goes one test at a time, on a machine that runs nothing else
        parallel = not rerun and self.workers > 1
        command += ["-n", str(self.workers)] if parallel else ["-p", "no:xdist"]
        started = time.monotonic()
        with (self.cache / f"{name}.log").open("w", encoding="utf-8") as out:
            try:
                returncode = subprocess.run(
                    command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                    timeout=RUN_TIMEOUT, check=False,
                ).returncode  # fmt: skip
            except subprocess.TimeoutExpired:
                returncode = -1
        run = Run(variant, returncode=returncode, seconds=time.monotonic() - started)
        if report.exists():
            run.results = json.loads(report.read_text(encoding="utf-8"))
        crawlers = scratch / "crawlers"
        if crawlers.exists():
            pids = crawlers.read_text(encoding="utf-8").split()
            run.crawlers, run.processes = len(pids), len(set(pids))
        if not rerun:
            print(f"scrapy_suite: {variant}: {run.counts()} ({run.seconds:.0f} s)", flush=True)
        return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modules", nargs="+", default=MODULES, help="Scrapy's test modules")
    parser.add_argument("--jobs", type=int, default=2, help="variants run at once (default: 2)")
    parser.add_argument(
        "--workers", type=int, default=2, help="pytest-xdist workers per variant (default: 2)"
    )
    args = parser.parse_args()
    started = time.monotonic()
    scrapy_version = version("scrapy")
    cache = Path(os.environ.get("SCRAPY_SUITE_CACHE", REPO / ".scrapy-suite-cache"))
    cache.mkdir(parents=True, exist_ok=True)
    (cache / ".gitignore").write_text("*\n", encoding="utf-8")
    suite = Suite(
        sdist=fetch_sdist(scrapy_version, cache),
        deps=install_test_requirements(cache),
        cache=cache,
        workers=args.workers,
    )
    print(f"scrapy_suite: Scrapy {scrapy_version}, {sys.executable}", flush=True)

    backoff_modules, backoff_k = BACKOFF_MODULES
    plans = [
        ("plain", list(args.modules), None),
        ("addon", list(args.modules), None),
        ("backoff", [m for m in backoff_modules if m in args.modules], backoff_k),
    ]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(suite.run, *plan) for plan in plans if plan[1]]
        runs = {run.variant: run for run in (f.result() for f in futures)}
    plain = runs.pop("plain")
    differences, flaky = compare(suite, plain, list(runs.values()))

    unexpected = {key: err for key, err in differences.items() if key not in EXPECTED_DIFFERENCES}
    broken = [
        f"{r.variant}: pytest exited with {r.returncode} (see {cache / f'{r.variant}.log'})"
        for r in (plain, *runs.values())
        if r.returncode not in {0, 1}
    ]
    if not plain.passed():
        broken.append("plain: no test passed")
    broken += [
        f"{r.variant}: no crawler got the add-on (sitecustomize.py not loaded?)"
        for r in runs.values()
        if r.crawlers == 0
    ]

    print(f"\nscrapy_suite: Scrapy {scrapy_version}, {len(args.modules)} modules")
    for run in (plain, *runs.values()):
        switched = (
            f"; the add-on in {run.crawlers} crawlers, {run.processes} processes"
            if run.variant != "plain"
            else ""
        )
        print(f"  {run.variant:8} {run.counts()} ({run.seconds:.0f} s{switched})")
    for (variant, node), error in sorted(differences.items()):
        mark = "expected" if (variant, node) in EXPECTED_DIFFERENCES else "DIFFERENCE"
        print(f"  {mark} [{variant}] {node}\n      {error.splitlines()[0][:300]}")
    for variant, node in flaky:
        print(f"  flaky [{variant}] {node}: failed once, passed when run again alone")
    for variant, node in sorted(EXPECTED_DIFFERENCES - set(differences)):
        if variant in runs and node in runs[variant].results:
            print(f"  no longer differs, remove from EXPECTED_DIFFERENCES: [{variant}] {node}")
    for problem in broken:
        print(f"  BROKEN {problem}")
    ok = not unexpected and not broken
    print(
        f"scrapy_suite: {'OK' if ok else 'FAILED'}: {len(unexpected)} unexpected, "
        f"{len(differences) - len(unexpected)} expected differences; "
        f"{time.monotonic() - started:.0f} s in all"
    )
    return 0 if ok else 1


def compare(
    suite: Suite, plain: Run, runs: list[Run]
) -> tuple[dict[tuple[str, str], str], list[tuple[str, str]]]:
    """The tests that pass *plain* and fail in one of *runs*: (variant, node id) -> error, and
    those that passed when run again (flaky)."""
    differences: dict[tuple[str, str], str] = {}
    flaky: list[tuple[str, str]] = []
    for run in runs:
        suspects = sorted(plain.passed() & run.failed())
        if not suspects:
            continue
        # once more, one at a time: a difference only when it fails again
        again = suite.run(run.variant, suspects, rerun=True)
        for node in suspects:
            if again.results.get(node, {}).get("outcome") == "passed":
                flaky.append((run.variant, node))
            else:
                differences[(run.variant, node)] = run.results[node]["error"]
    return differences, flaky


def fetch_sdist(scrapy_version: str, cache: Path) -> Path:
    """The sdist of Scrapy *scrapy_version*, downloaded once into *cache*."""
    name = f"scrapy-{scrapy_version}.tar.gz"
    if not (cache / name).exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--no-binary", ":all:", "--dest", str(cache), f"scrapy=={scrapy_version}"],
            check=True,
        )  # fmt: skip
    return cache / name


def install_test_requirements(cache: Path) -> Path:
    """A directory with TEST_REQUIREMENTS, for this Python, installed once."""
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}"
    target = cache / f"deps-{tag}"
    done = target / ".requirements"
    wanted = "\n".join(TEST_REQUIREMENTS)
    if done.exists() and done.read_text(encoding="utf-8") == wanted:
        return target
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
         str(target), *TEST_REQUIREMENTS],
        check=True,
    )  # fmt: skip
    done.write_text(wanted, encoding="utf-8")
    return target


def unpack(sdist: Path, dest: Path) -> Path:
    """Scrapy's tests/, conftest.py and pyproject.toml from *sdist*, fresh, in *dest*."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            _, _, inner = member.name.partition("/")
            if inner.startswith("tests/") or inner in {"conftest.py", "pyproject.toml"}:
                member.name = inner
                members.append(member)
        if hasattr(tarfile, "data_filter"):  # Python 3.10.12+, 3.11.4+
            tar.extractall(dest, members=members, filter="data")
        else:
            tar.extractall(dest, members=members)
    return dest


if __name__ == "__main__":
    sys.exit(main())
