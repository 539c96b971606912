"""Record ids: UUID version 7, made at capture as ints and formatted by the writers."""

from __future__ import annotations

import random
import time


class IdFactory:
    """Make record ids: UUID version 7 (RFC 9562), as 128-bit ints.

    Time-ordered ids keep PostgreSQL's primary-key index appending at its right
    edge instead of touching random pages. The 74 random bits are drawn once
    per factory and then counted up, so ids are unique across processes and
    increase within one. Ids stay ints until a writer formats them
    (:func:`format_uuid`), which keeps capture on the reactor thread cheap.
    """

    def __init__(self) -> None:
        rand = random.SystemRandom()
        version = 0x7000 | rand.getrandbits(12)  # version 7, then 12 random bits
        # the variant bits, then 61 random bits that leave room to count up
        low = 0x8000_0000_0000_0000 | rand.getrandbits(61)
        self._base = (version << 64) | low
        self._seq = 0

    def __call__(self, epoch: float | None = None) -> int:
        """Return a new id; *epoch* (seconds) is the capture time, now by default."""
        self._seq += 1
        ms = int((time.time() if epoch is None else epoch) * 1000)
        return (ms << 80) + self._base + self._seq


def format_uuid(value: int | str) -> str:
    """Return the canonical text of a UUID given as an int (or as text already)."""
    if isinstance(value, str):
        return value
    h = value.to_bytes(16, "big").hex()  # a third faster than f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
