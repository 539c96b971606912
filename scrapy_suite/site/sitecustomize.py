"""Switches scrapy_ingest on in every Python process of a scrapy_suite run.

scrapy_suite/run.py puts this directory on ``PYTHONPATH``, so Python imports this module at
start in the pytest process and in every process it starts (Scrapy's tests run ``scrapy`` and
crawl scripts in subprocesses with the same ``PYTHONPATH``). It does nothing unless
``SCRAPY_SUITE_MODE`` says so:

- ``addon``: every crawler gets ``scrapy_ingest.IngestAddon`` at 300 in ``ADDONS``, added to
  what the test set there (``AddonManager.load_settings`` adds it first: a test that sets
  ``ADDONS`` replaces Scrapy's default dict, so a default alone would miss those crawlers), unless
  ``SCRAPY_SUITE_NO_ADDON=1`` (set by the pytest plugin around the tests that count the loaded
  add-ons, for their subprocesses too). ``scrapy.settings.default_settings`` gets
  ``INGEST_DATABASE_URL`` pointing at an SQLite file of this process in ``SCRAPY_SUITE_SCRATCH``
  and ``INGEST_SPILL_DIR`` there too, so that no test writes into its working directory.
- ``backoff``: the same, and ``scrapy.downloadermiddlewares.retry.RetryMiddleware`` becomes
  ``scrapy_ingest.BackoffRetryMiddleware`` as soon as that module is imported: Scrapy's own
  retry tests, which build ``RetryMiddleware`` directly, then build ours, and every crawl gets
  ours from ``DOWNLOADER_MIDDLEWARES_BASE``, whose key is that import path.

Both are done by an import hook, so a process that never imports Scrapy (the writer process, the
mock servers) pays nothing. Each crawler that got the add-on appends its process id to
``SCRAPY_SUITE_SCRATCH/crawlers``, which run.py counts to show that the switch reached them.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from types import ModuleType

ADDON = "scrapy_ingest.IngestAddon"
ADDON_ORDER = 300


def _scratch_database(module: ModuleType) -> None:
    """Patch scrapy.settings.default_settings, just after it ran."""
    scratch = Path(os.environ["SCRAPY_SUITE_SCRATCH"])
    module.INGEST_DATABASE_URL = f"sqlite:///{scratch / f'ingest-{os.getpid()}.sqlite3'}"
    module.INGEST_SPILL_DIR = str(scratch / "spill")


def _add_addon(module: ModuleType) -> None:
    """Patch scrapy.addons, just after it ran."""
    manager = module.AddonManager
    load_settings = manager.load_settings

    def load_settings_with_ours(self: Any, settings: Any) -> None:
        if os.environ.get("SCRAPY_SUITE_NO_ADDON") != "1":
            from scrapy_ingest.addon import IngestAddon

            settings.setdefault_in_component_priority_dict("ADDONS", IngestAddon, ADDON_ORDER)
            scratch = Path(os.environ["SCRAPY_SUITE_SCRATCH"])
            with (scratch / "crawlers").open("a", encoding="utf-8") as file:
                file.write(f"{os.getpid()}\n")
        load_settings(self, settings)

    manager.load_settings = load_settings_with_ours


#: scrapy.downloadermiddlewares.retry, when scrapy_ingest._compat imported it (see below)
_RETRY_WAITING: list[ModuleType] = []
#: whether scrapy_ingest._compat has run (_after_compat)
_COMPAT_RAN: list[bool] = []


def _put_backoff_retry(module: ModuleType) -> None:
    """Patch scrapy.downloadermiddlewares.retry, just after it ran."""
    if "scrapy_ingest._compat" in sys.modules and not _COMPAT_RAN:
        # imported by scrapy_ingest._compat, which BackoffRetryMiddleware needs whole: patched
        # once that has run (when a test module run alone imports the add-on first)
        _RETRY_WAITING.append(module)
        return
    import scrapy_ingest

    module.RetryMiddleware = scrapy_ingest.BackoffRetryMiddleware


def _after_compat(_: ModuleType) -> None:
    _COMPAT_RAN.append(True)
    while _RETRY_WAITING:
        _put_backoff_retry(_RETRY_WAITING.pop())


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Runs a patch on a module right after its code ran, before anyone imports from it."""

    def __init__(self, patches: dict[str, Callable[[ModuleType], None]]) -> None:
        self._patches = patches

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        patch = self._patches.get(fullname)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


def _install() -> None:
    mode = os.environ.get("SCRAPY_SUITE_MODE", "")
    patches: dict[str, Callable[[ModuleType], None]] = {}
    if mode in {"addon", "backoff"}:
        patches["scrapy.settings.default_settings"] = _scratch_database
        patches["scrapy.addons"] = _add_addon
    if mode == "backoff":
        patches["scrapy.downloadermiddlewares.retry"] = _put_backoff_retry
        patches["scrapy_ingest._compat"] = _after_compat
    if patches:
        sys.meta_path.insert(0, _PatchAfterImport(patches))


_install()
