"""Figures as the reports print them: bytes in MiB or GiB, fixed decimals, significant digits,
percentages and compact resource amounts.

Each function takes a figure or None, a figure the run did not produce; None prints as
`missing`, "–" unless a report marks it otherwise (the benchmark tables use "-").
"""

from __future__ import annotations

MiB = 2**20
GiB = 2**30
MISSING = "–"


def mib(nbytes: float | None, *, missing: str = MISSING) -> str:
    """Bytes in MiB with two decimals: 3 * 2**20 -> "3.00"."""
    return missing if nbytes is None else f"{nbytes / MiB:.2f}"


def gib(nbytes: float | None, *, missing: str = MISSING) -> str:
    """Bytes in GiB with two decimals: 80 * 2**30 -> "80.00"."""
    return missing if nbytes is None else f"{nbytes / GiB:.2f}"


def fixed(x: float | None, decimals: int = 3, *, missing: str = MISSING) -> str:
    """`x` with `decimals` decimals: 0.12345 -> "0.123", 12 -> "12.000"."""
    return missing if x is None else f"{x:.{decimals}f}"


def number(x: float | None, digits: int = 3, *, missing: str = MISSING) -> str:
    """A float to `digits` significant digits below 1000 (0.012345 -> "0.0123", 12.34 -> "12.3"),
    whole with thousands separators from 1000 on (12345.6 -> "12,346"); an int as it is."""
    if x is None:
        return missing
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def percent(fraction: float | None, decimals: int = 1, *, missing: str = MISSING) -> str:
    """A fraction as a percentage: 0.875 -> "87.5%"."""
    return missing if fraction is None else f"{100 * fraction:.{decimals}f}%"


def compact(x: float) -> str:
    """A number without a trailing ".0", as resource amounts print: 2.0 -> "2", 0.5 -> "0.5"
    (six significant digits)."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


__all__ = ["GiB", "MISSING", "MiB", "compact", "fixed", "gib", "mib", "number", "percent"]
