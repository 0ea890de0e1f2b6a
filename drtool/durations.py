"""Durations as written in policy files: ``90s``, ``30m``, ``24h``, ``7d``, ``2w``, ``1h30m``."""
from __future__ import annotations

import re
from datetime import timedelta

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DURATION_PATTERN = r"^\s*(\d+\s*[smhdw]\s*)+$"
_PART = re.compile(r"(\d+)\s*([smhdw])")


def parse_duration(text: str) -> timedelta:
    if not isinstance(text, str) or not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(
            f"invalid duration {text!r}: write a number and a unit (s, m, h, d, w), e.g. '24h', '7d', '1h30m'"
        )
    seconds = sum(int(n) * _UNITS[u] for n, u in _PART.findall(text))
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: must be greater than zero")
    return timedelta(seconds=seconds)


def format_duration(td: timedelta) -> str:
    """Compact human form, largest units first: 93784 s -> '1d2h3m'."""
    total = int(td.total_seconds())
    if total < 0:
        return "-" + format_duration(-td)
    if total == 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        n, total = divmod(total, size)
        if n:
            parts.append(f"{n}{unit}")
        if len(parts) == 2:
            break
    return "".join(parts)
