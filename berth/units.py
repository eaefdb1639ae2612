"""Sizes and CPU counts as users write them (`256m`, `1.5g`, `0.5`), parsed with errors that say what to
write instead."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_FACTOR = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class UnitError(ValueError):
    """A size or CPU count that could not be parsed; the message is meant for a user."""


def parse_size(text: str, what: str = "size") -> int:
    """`256m` -> 268435456. Units b, k, m, g, t (powers of 1024), as Docker reads them."""
    match = _SIZE.match(text)
    if not match:
        raise UnitError(
            f"invalid {what} {text!r}: write a number with an optional unit b, k, m or g (for example 256m)"
        )
    value = float(match.group(1)) * _FACTOR[match.group(2).lower()]
    if value < 1:
        raise UnitError(f"invalid {what} {text!r}: it must be at least 1 byte")
    return int(value)


def parse_cpus(text: str) -> int:
    """`0.5` -> 500000000 nano-CPUs, as Docker's --cpus."""
    try:
        value = float(text)
    except ValueError:
        raise UnitError(f"invalid --cpus {text!r}: write a number of CPUs such as 0.5 or 2") from None
    if not value > 0 or value > 1024:
        raise UnitError(f"invalid --cpus {text!r}: it must be more than 0 and at most 1024")
    return int(value * 1e9)


def format_size(n: int) -> str:
    """268435456 -> `256MiB`."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor:
            value = n / factor
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{n}B"
