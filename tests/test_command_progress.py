"""Progress of the long ``scrapy ingest`` actions: counts and a rate on a terminal, nothing
at all elsewhere (a log file, a pipe, cron)."""

from __future__ import annotations

import io

from scrapy_ingest.commands._common import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal() -> None:
    stream = _Terminal()
    progress = Progress("rows replayed", stream)
    progress.add(1500)
    progress.add(500)  # within a quarter of a second: not redrawn
    assert progress.count == 2000
    shown = stream.getvalue()
    assert shown.startswith("\r\033[Krows replayed: 1,500 (")
    assert shown.endswith("/s)")
    progress.done()
    assert stream.getvalue().endswith("\r\033[K")  # the line is cleared for the result


def test_no_progress_elsewhere() -> None:
    stream = io.StringIO()
    progress = Progress("rows replayed", stream)
    progress.add(1500)
    progress.done()
    assert progress.count == 1500
    assert stream.getvalue() == ""
