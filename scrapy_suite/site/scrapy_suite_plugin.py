"""pytest plugin of scrapy_suite/run.py (``-p scrapy_suite_plugin``), loaded in every run.

- Records each test's outcome (and the one-line error of a failure) into the JSON file named by
  ``report`` in the file ``SCRAPY_SUITE_CONFIG`` names; with pytest-xdist, the controller does.
- Around the tests listed under ``no_addon`` there (the ones that count the loaded add-ons),
  keeps the add-on out of their crawlers, in this process and in the processes the test starts
  (``SCRAPY_SUITE_NO_ADDON=1``, read by sitecustomize.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

_CONFIG: dict[str, Any] = json.loads(
    Path(os.environ["SCRAPY_SUITE_CONFIG"]).read_text(encoding="utf-8")
)
_NO_ADDON: tuple[str, ...] = tuple(_CONFIG["no_addon"])
#: node id -> {"outcome": ..., "error": ...}
_RESULTS: dict[str, dict[str, str]] = {}


@pytest.fixture(autouse=True)
def _scrapy_suite_no_addon(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    if request.node.nodeid.startswith(_NO_ADDON):
        # read by sitecustomize.py at each crawler's start, here and in subprocesses
        monkeypatch.setenv("SCRAPY_SUITE_NO_ADDON", "1")
    yield


def _error(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return f"{crash.message} ({Path(crash.path).name}:{crash.lineno})"
    return str(report.longrepr)[-500:]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    result = _RESULTS.setdefault(report.nodeid, {"outcome": "", "error": ""})
    if report.when == "call":
        if hasattr(report, "wasxfail"):
            result["outcome"] = "xfailed" if report.skipped else "xpassed"
        else:
            result["outcome"] = report.outcome
        if report.failed:
            result["error"] = _error(report)
    elif report.failed:  # setup or teardown
        result["outcome"] = "error"
        result["error"] = result["error"] or f"{report.when}: {_error(report)}"
    elif report.skipped and report.when == "setup":
        result["outcome"] = "skipped"


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller reports
        return
    Path(_CONFIG["report"]).write_text(json.dumps(_RESULTS, indent=1), encoding="utf-8")
