"""When a scheduled command is due: a cron line in a time zone, or a fixed period.

Cron lines are read by cronsim (the parser Healthchecks.io runs on): five
fields, the usual names and ranges, ``L`` and ``#``, and daylight-saving
changes handled as cron does (a tick in a skipped hour runs at the first
minute after it; a tick in a repeated hour runs once). Times are unix seconds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo

#: Unless ``--grace`` says, a run may start this late (or one period, if shorter).
DEFAULT_GRACE = 300.0
_EPSILON = 0.001  # a tick at exactly ``at`` counts as at or before it


@dataclass(frozen=True)
class Cron:
    """A cron line in a time zone."""

    expr: str
    zone: tzinfo

    def at_or_before(self, at: float) -> float:
        """The latest tick at or before ``at``."""
        from cronsim import CronSim

        dt = datetime.fromtimestamp(at + _EPSILON, self.zone)
        tick = next(CronSim(self.expr, dt, reverse=True)).timestamp()
        # Backwards, a tick moved by a daylight-saving change (02:30 on the night
        # clocks go forward runs at 03:00) can be missed on some Pythons (3.10):
        # forwards, as cron runs them, from the tick found.
        for _ in range(3):
            following = self.after(tick)
            if following > at + _EPSILON:
                break
            tick = following
        return tick

    def after(self, at: float) -> float:
        """The first tick after ``at``."""
        from cronsim import CronSim

        return next(CronSim(self.expr, datetime.fromtimestamp(at, self.zone))).timestamp()

    def period(self, at: float) -> float:
        """The time between the next two ticks after ``at``."""
        first = self.after(at)
        return self.after(first) - first


def parse_cron(expr: str, zone: str | None = None) -> Cron:
    """A :class:`Cron`, in ``zone`` (an IANA name such as ``Europe/Berlin``) or
    the machine's local time zone; ValueError naming what is wrong."""
    from cronsim import CronSim, CronSimError

    tz = local_zone() if zone is None else _zone(zone)
    try:
        # cronsim checks the fields as it builds the iterator; next() finds a
        # line that can never match (30 February) by looking for a tick.
        next(CronSim(expr, datetime.now(tz)))
    except (CronSimError, StopIteration) as exc:
        raise ValueError(f"{expr!r} is not a cron schedule ({exc or 'never due'})") from None
    return Cron(expr, tz)


def _zone(name: str) -> tzinfo:
    # zoneinfo (and cronsim) are imported where a schedule is read: an `exec`
    # without one starts without them (2 ms of its 90).
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{name!r} is not a time zone name like Europe/Berlin or UTC") from None


def local_zone() -> tzinfo:
    """The machine's time zone, as cron uses it: ``TZ``, else /etc/localtime
    (with its daylight-saving rules, not only today's offset), else UTC."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    try:
        with open("/etc/localtime", "rb") as f:
            return ZoneInfo.from_file(f)
    except (OSError, ValueError):
        return timezone.utc


def default_grace(period: float | None) -> float:
    """5 minutes, or one period if that is shorter."""
    return DEFAULT_GRACE if period is None else min(DEFAULT_GRACE, period)
