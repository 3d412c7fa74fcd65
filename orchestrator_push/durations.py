"""Durations as people write them: ``7d``, ``12h``, ``1h30m``, ``90s``."""

from __future__ import annotations

import re

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(w|d|h|m|s)")
_UNIT = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> float:
    """``7d``, ``12h``, ``1h30m``, ``90s``, ``2w`` -> seconds; ValueError otherwise."""
    s = text.strip().lower()
    pos, total = 0, 0.0
    for m in _DURATION.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if not s or pos != len(s) or total <= 0:
        raise ValueError(f"{text!r} is not a duration like 7d, 12h, 1h30m or 90s")
    return total
