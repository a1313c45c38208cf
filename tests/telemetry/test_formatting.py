"""The figures the reports print: each helper's format and its mark for a missing figure."""

from __future__ import annotations

from rlhf_ray.telemetry.formatting import compact, fixed, gib, mib, number, percent


def test_bytes():
    assert mib(3 * 2**20) == "3.00" and mib(0) == "0.00" and mib(None) == "–"
    assert mib(None, missing="-") == "-"
    assert gib(80 * 2**30) == "80.00" and gib(2**29) == "0.50" and gib(None) == "–"


def test_fixed_decimals_and_percentages():
    assert fixed(0.12345) == "0.123" and fixed(12) == "12.000" and fixed(-0.5, 1) == "-0.5"
    assert fixed(None) == "–"
    assert percent(0.875) == "87.5%" and percent(1) == "100.0%" and percent(0.12345, 2) == "12.35%"
    assert percent(None) == "–"


def test_significant_digits():
    assert number(0.012345) == "0.0123" and number(12.34) == "12.3" and number(999.4) == "999"
    assert number(12345.6) == "12,346" and number(-2000.0) == "-2,000"
    assert number(16) == "16" and number(123456) == "123456"  # an int as it is
    assert number(0.012345, 2) == "0.012"
    assert number(None) == "–" and number(None, missing="-") == "-"


def test_compact_amounts():
    assert [compact(x) for x in (0, 1, 2.0, 0.5, 1 / 3, 12345678.0)] == ["0", "1", "2", "0.5", "0.333333",
                                                                         "12345678"]
