"""Spidermon suites and actions of the monitor tests (tests/test_monitors.py). Crawl
subprocesses run from ``tests/``, so this module imports as ``_monitor_suites``.

Each action appends one JSON line to the file named by the ``TEST_MONITOR_RECORD`` setting:
``RecordResults`` (run whatever the outcome) the status and message of every monitor,
``RecordFailure`` (a ``monitors_failed_actions`` action, as Slack or email would be) that it
was called, and which monitors had failed.
"""

from __future__ import annotations

import json
from typing import Any

from spidermon.core.actions import Action

from scrapy_ingest.monitors import IngestMonitorSuite


class _Recording(Action):  # type: ignore[misc]
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    @classmethod
    def from_crawler_kwargs(cls, crawler: Any) -> dict[str, Any]:
        return {"path": crawler.settings["TEST_MONITOR_RECORD"]}

    def record(self, entry: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(entry) + "\n")


class RecordResults(_Recording):
    def run_action(self) -> None:
        results = {
            type(r.monitor).__name__: {"status": r.status, "error": r.error}
            for r in self.result.monitor_results
        }
        self.record({"action": "results", "results": results})


class RecordFailure(_Recording):
    def run_action(self) -> None:
        failed = sorted(type(r.monitor).__name__ for r in self.result.monitors_failed_results)
        self.record({"action": "failed", "failed": failed})


class RecordingSuite(IngestMonitorSuite):
    monitors_finished_actions = [RecordResults]  # noqa: RUF012 (Spidermon's declaration)
    monitors_failed_actions = [RecordFailure]  # noqa: RUF012
