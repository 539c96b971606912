"""Timestamps as the backends store them: timezone-aware UTC."""

from __future__ import annotations

import datetime as dt
import math
import time

_UTC = dt.timezone.utc
_DIGITS = [f"{n:03d}" for n in range(1000)]


class TimestampFormatter:
    """Format epoch seconds as ``2024-05-01 12:00:00.123456+00:00``.

    The text form is read the same way by PostgreSQL (``timestamptz``) and by
    SQLite's date functions. The part up to the second is cached, since
    consecutive records share it.
    """

    def __init__(self) -> None:
        self._cache: tuple[int, str] = (-1, "")

    def __call__(self, epoch: float) -> str:
        # rounded exactly as datetime.fromtimestamp rounds, carrying into the next second
        if type(epoch) is float and epoch >= 1.0:
            # the usual case, cheaper: from 1 on, int() and the subtraction are exactly the
            # whole and the fraction that math.modf gives
            second = int(epoch)
            micros = round((epoch - second) * 1e6)
        else:
            fraction, whole = math.modf(epoch)
            second, micros = int(whole), round(fraction * 1e6)
        if micros >= 1_000_000:
            second, micros = second + 1, micros - 1_000_000
        elif micros < 0:
            second, micros = second - 1, micros + 1_000_000
        cached_second, prefix = self._cache
        if second != cached_second:
            prefix = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second))
            self._cache = (second, prefix)
        # the six digits from a table of three: a third of the cost of a format spec
        return f"{prefix}.{_DIGITS[micros // 1000]}{_DIGITS[micros % 1000]}+00:00"


def utc_from_epoch(epoch: float) -> dt.datetime:
    """Return the aware UTC datetime of *epoch* seconds."""
    return dt.datetime.fromtimestamp(epoch, _UTC)
