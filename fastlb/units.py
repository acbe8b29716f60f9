"""Durations and sizes as people write them in config files and environment variables.

Durations become float seconds and sizes int bytes at config load, so nothing on the request path ever
parses a unit. Both parsers raise ``ValueError`` whose message is a complete, one-line reason
(``invalid duration '5x': ...``) that the config loader puts after the key path.
"""

from __future__ import annotations

import math
import re

__all__ = ["format_duration", "format_size", "parse_duration", "parse_size"]

# asyncio/uvloop turn a delay into integer milliseconds on a 64-bit clock; anything near that overflows,
# and a timeout of more than a year is a typo, not a policy.
MAX_DURATION = 365 * 24 * 3600.0

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", re.IGNORECASE)
# "1h30m", "1m30s", "1s500ms": Go's time.ParseDuration habit, handy for long drains.
_DURATION_FULL = re.compile(r"(?:\d+(?:\.\d+)?\s*(?:ms|s|m|h)\s*)+", re.IGNORECASE)
_BARE_NUMBER = re.compile(r"\d+(?:\.\d+)?")

_DURATION_HELP = 'expected a number of seconds or a number with a unit ms, s, m or h (e.g. "250ms", "10s")'


def parse_duration(value: str | int | float) -> float:
    """``"250ms"``, ``"10s"``, ``"2m"``, ``"1h"``, ``"1.5s"``, ``"1m30s"`` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}: {_DURATION_HELP}")
    if isinstance(value, (int, float)):
        seconds = float(value)
        if math.isnan(seconds):
            raise ValueError(f"invalid duration {value!r}: {_DURATION_HELP}")
        return _check_duration(value, seconds)
    text = value.strip()
    if text.startswith("-"):
        raise ValueError(f"invalid duration {value!r}: must not be negative")
    if _BARE_NUMBER.fullmatch(text):
        return _check_duration(value, float(text))
    if not _DURATION_FULL.fullmatch(text):
        raise ValueError(f"invalid duration {value!r}: {_DURATION_HELP}")
    seconds = sum(
        float(number) * _DURATION_UNITS[unit.lower()] for number, unit in _DURATION_PART.findall(text)
    )
    return _check_duration(value, seconds)


def _check_duration(original: object, seconds: float) -> float:
    if seconds < 0:
        raise ValueError(f"invalid duration {original!r}: must not be negative")
    if seconds > MAX_DURATION:
        raise ValueError(f"invalid duration {original!r}: must be at most 365 days")
    return seconds


# IEC 80000-13: KiB/MiB/GiB are powers of 1024, KB/MB/GB powers of 1000 (as Kubernetes quantities).
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)", re.IGNORECASE)
_SIZE_HELP = (
    'expected a number of bytes or a number with a unit B, KiB, MiB, GiB, KB, MB or GB (e.g. "16KiB")'
)


def parse_size(value: str | int) -> int:
    """``"16KiB"``, ``"1MiB"``, ``"1GiB"``, ``"64KB"``, ``"512"`` or an integer: a number of bytes."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"invalid size {value!r}: {_SIZE_HELP}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid size {value!r}: must not be negative")
        return value
    text = value.strip()
    if text.startswith("-"):
        raise ValueError(f"invalid size {value!r}: must not be negative")
    match = _SIZE.fullmatch(text)
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"invalid size {value!r}: {_SIZE_HELP}")
    number, unit = match.groups()
    multiplier = _SIZE_UNITS[unit.lower()]
    if "." in number:
        size = float(number) * multiplier
        if size != int(size):
            raise ValueError(f"invalid size {value!r}: not a whole number of bytes")
        return int(size)
    return int(number) * multiplier


def format_duration(seconds: float) -> str:
    """The shortest exact spelling ``parse_duration`` reads back: 0.25 -> "250ms", 30.0 -> "30s"."""
    if seconds == 0:
        return "0s"
    for unit, scale in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        count = seconds / scale
        if count >= 1 and count == int(count):
            return f"{int(count)}{unit}"
    millis = seconds * 1000
    if millis == int(millis):
        return f"{int(millis)}ms"
    return f"{seconds:g}s"


def format_size(size: int) -> str:
    """The shortest exact spelling ``parse_size`` reads back: 16384 -> "16KiB", 1000 -> "1000"."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)
