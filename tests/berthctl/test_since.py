"""`logs --since` given a line's own `logs --timestamps` stamp (RFC 3339 with nanoseconds) means exactly that
nanosecond: that line is kept. The stamp was read through datetime (microseconds) and a float of seconds
(~240 ns apart at today's times), so ~4% of stamps came out later than themselves and `--since <stamp>` left
that line out (tests/e2e/test_lifecycle.py's logs test failed now and then)."""

from __future__ import annotations

import random

from berthctl.lifecycle import parse_since, timestamp_prefix


def test_a_stamp_reads_back_as_its_own_nanosecond() -> None:
    rng = random.Random(6)
    times = [1_795_900_000_000_000_123, 1_795_900_000_000_000_001, 1_795_900_000_999_999_999]
    times += [1_795_900_000_000_000_000 + rng.randrange(10**15) for _ in range(2000)]
    for ns in times:
        stamp = timestamp_prefix(ns).decode().strip()
        assert parse_since(stamp, 0) == ns, stamp


def test_other_times_still_read() -> None:
    assert parse_since("2026-11-27T18:00:00Z", 0) == 1_795_802_400 * 10**9
    assert parse_since("2026-11-27T18:00:00.5+01:00", 0) == 1_795_798_800 * 10**9 + 500_000_000
    assert parse_since("2026-11-27", 0) == 1_795_737_600 * 10**9
    assert parse_since("1795802400.25", 0) == 1_795_802_400_250_000_000
    assert parse_since("10m", 1000.0) == 400 * 10**9
