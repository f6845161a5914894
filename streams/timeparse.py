"""The one way a person writes a point in time: ``dlq list --since`` and ``replay --to-datetime``.

Why one function: an operator who reads dead letters ``--since 2h`` and then replays the
stage ``--to-datetime 2h`` must mean the same moment with the same words. Two forms:

- an ISO 8601 time (``2026-05-01T14:30:00Z``, ``2026-05-01T16:30:00.250+02:00``,
  ``2026-05-01``): a time without a zone is UTC, as everywhere in ragstream (the letters'
  ``failed_at`` and Kafka's timestamps are UTC);
- a duration back from now: a number, optionally with a fraction, and one unit of ``s``,
  ``m``, ``h``, ``d`` or ``w`` (``90s``, ``30m``, ``1.5h``, ``7d``, ``2w``).

Pure: ``now`` is a parameter, so a test pins it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from streams.errors import InvalidTime

__all__ = ["parse_time", "to_epoch_ms"]

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """``text`` in one of the two forms above, as an aware datetime; ``now`` defaults to the
    clock. Raises :class:`~streams.errors.InvalidTime` (a ``ValueError``, so an argparse
    ``type=`` converter can pass it on) for anything else."""
    text = text.strip()
    m = _DURATION.match(text)
    if m:
        return (now or datetime.now(UTC)) - timedelta(seconds=float(m[1]) * _UNIT_S[m[2]])
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidTime(
            f"{text!r} is neither an ISO 8601 time (2026-05-01T14:30:00Z) "
            "nor a duration back from now (30m, 2h, 7d)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def to_epoch_ms(when: datetime) -> int:
    """Milliseconds since the epoch, as Kafka's timestamps count: exact (integer
    arithmetic), so a time written to the millisecond is that millisecond."""
    return (when - _EPOCH) // timedelta(milliseconds=1)
