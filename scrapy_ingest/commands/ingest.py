"""``scrapy ingest ACTION``: look after the databases a crawl stores into.

::

    scrapy ingest check                         # would a crawl store everything?
    scrapy ingest jobs [--running] [--spider NAME] [--limit N] [--json]
    scrapy ingest export JOB_ID -O items.jsonl  # a job's items, through Scrapy's feed exporters
    scrapy ingest prune --older-than 30d [--kinds requests,logs]
    scrapy ingest migrate [--sql]               # create/upgrade the tables, or print the DDL
    scrapy ingest replay [--spill-dir DIR] [--url URL ...]

Each action reads the project's settings (``INGEST_DATABASE_URL``,
``INGEST_ROUTES``, ``INGEST_SPILL_DIR``...) like a crawl would, and works on
every database they name. ``scrapy ingest ACTION --help`` tells more. Exit
codes: 0 done (for ``check``: a crawl would store everything), 1 the action
could not do all it was asked (a database unavailable, batches left, a
problem found), 2 wrong usage or invalid settings.
"""

from __future__ import annotations

import argparse
import importlib
from typing import TYPE_CHECKING, Any, ClassVar, cast

from scrapy.commands import ScrapyCommand
from scrapy.exceptions import UsageError

from scrapy_ingest.exceptions import IngestError

if TYPE_CHECKING:
    from types import ModuleType

#: action -> the module that implements it: ``HELP`` (one line), ``DESCRIPTION``,
#: ``add_arguments(parser)`` and ``run(context) -> exit code``
ACTIONS: dict[str, str] = {
    "check": "scrapy_ingest.commands._check",
    "jobs": "scrapy_ingest.commands._jobs",
    "export": "scrapy_ingest.commands._export",
    "prune": "scrapy_ingest.commands._prune",
    "migrate": "scrapy_ingest.commands._migrate",
    "replay": "scrapy_ingest.commands._replay",
}


class _WithoutDefaults:
    """Adds options to *parser* (and its groups) without their defaults: an option given to the
    main parser only keeps its value when the action's parser does not know it."""

    def __init__(self, parser: Any) -> None:  # a parser, or one of its argument groups
        self._parser = parser

    def add_argument_group(self, *args: Any, **kwargs: Any) -> _WithoutDefaults:
        return _WithoutDefaults(self._parser.add_argument_group(*args, **kwargs))

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action: argparse.Action = self._parser.add_argument(
            *args, **{**kwargs, "default": argparse.SUPPRESS}
        )
        return action


def _action(name: str) -> ModuleType:
    return importlib.import_module(ACTIONS[name])


class Command(ScrapyCommand):
    requires_project = False
    requires_crawler_process = False
    default_settings: ClassVar[dict[str, Any]] = {"LOG_LEVEL": "INFO"}

    def syntax(self) -> str:
        return "ACTION [options]"

    def short_desc(self) -> str:
        return "Check, query, export, prune and migrate scrapy_ingest's databases"

    def long_desc(self) -> str:
        return (
            "Look after the databases scrapy_ingest stores crawls in, as the project's "
            "settings name them (INGEST_DATABASE_URL, INGEST_ROUTES); `scrapy ingest ACTION "
            "--help` tells more of each action. The spill journal is INGEST_SPILL_DIR, by "
            "default .scrapy/ingest-spill beside scrapy.cfg (in the working directory outside "
            "a project).\n\nExit codes: 0 done; 1 not all done (a database unavailable, "
            "batches left in the spill journal, a problem found: the output says which and "
            "the fix); 2 wrong usage or an invalid setting."
        )

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        super().add_options(parser)
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        actions = parser.add_subparsers(dest="action", metavar="ACTION")
        for name in ACTIONS:
            module = _action(name)
            sub = actions.add_parser(
                name,
                help=module.HELP,
                description=module.DESCRIPTION,
                formatter_class=argparse.RawDescriptionHelpFormatter,
                prog=f"scrapy ingest {name}",
            )
            module.add_arguments(sub)
            # Scrapy's global options are taken after the action too; given before it only,
            # they must keep their value (an action's parser would reset them to its defaults)
            super().add_options(cast("argparse.ArgumentParser", _WithoutDefaults(sub)))

    def run(self, args: list[str], opts: argparse.Namespace) -> None:
        if opts.action is None:
            raise UsageError(f"say what to do: scrapy ingest {{{','.join(ACTIONS)}}}")
        if args:
            raise UsageError(f"unexpected arguments: {' '.join(args)}")
        assert self.settings is not None
        # imported here: Scrapy imports this module for every command it runs (an entry
        # point), and a crawl with the add-on off needs neither the settings model nor backends
        from scrapy_ingest.commands._common import Context
        from scrapy_ingest.config import IngestConfig

        try:
            config = IngestConfig.from_settings(self.settings)
        except IngestError as exc:
            raise UsageError(str(exc), print_help=False) from None
        context = Context(self.settings, config, opts)
        self.exitcode = _action(opts.action).run(context)
