"""Times as a person writes them (``dlq list --since``, ``replay --to-datetime``): one syntax,
one function (streams/timeparse.py). No broker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from ops.replay import parse_datetime
from streams.errors import ConfigError, InvalidTime
from streams.timeparse import parse_time, to_epoch_ms

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def test_durations_count_back_from_now() -> None:
    assert parse_time("2h", NOW) == datetime(2026, 5, 1, 10, 0, tzinfo=UTC)
    assert parse_time("30m", NOW) == datetime(2026, 5, 1, 11, 30, tzinfo=UTC)
    assert parse_time("90s", NOW) == NOW - timedelta(seconds=90)
    assert parse_time("7d", NOW) == datetime(2026, 4, 24, 12, 0, tzinfo=UTC)
    assert parse_time("2w", NOW) == datetime(2026, 4, 17, 12, 0, tzinfo=UTC)
    assert parse_time("1.5h", NOW) == datetime(2026, 5, 1, 10, 30, tzinfo=UTC)
    assert parse_time(" 2 h ", NOW) == datetime(2026, 5, 1, 10, 0, tzinfo=UTC)
    assert abs(parse_time("0s") - datetime.now(UTC)) < timedelta(minutes=1)  # the clock


def test_iso_times_without_a_zone_are_utc() -> None:
    assert parse_time("2026-04-30", NOW) == datetime(2026, 4, 30, tzinfo=UTC)
    assert parse_time("2026-05-01T14:30") == datetime(2026, 5, 1, 14, 30, tzinfo=UTC)
    assert parse_time("2026-05-01T14:30:00Z") == datetime(2026, 5, 1, 14, 30, tzinfo=UTC)
    assert parse_time("2026-04-30T08:00:00+02:00") == datetime(2026, 4, 30, 6, tzinfo=UTC)
    plus2 = timezone(timedelta(hours=2))
    assert parse_time("2026-05-01T16:30:00.250+02:00") == datetime(
        2026, 5, 1, 16, 30, 0, 250000, tzinfo=plus2
    )


@pytest.mark.parametrize("text", ["yesterday", "", "2", "2H", "h2", "-2h", "2 hours", "2026-13-01"])
def test_anything_else_is_refused_with_both_forms_named(text: str) -> None:
    with pytest.raises(InvalidTime, match="neither an ISO 8601 time .* nor a duration"):
        parse_time(text, NOW)


def test_a_refusal_is_a_config_error_and_a_value_error() -> None:
    # the CLI prints a ConfigError as one line; argparse converters catch ValueError
    with pytest.raises(ConfigError):
        parse_time("yesterday")
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_time("yesterday")


def test_epoch_ms_is_exact() -> None:
    assert to_epoch_ms(datetime(1970, 1, 1, tzinfo=UTC)) == 0
    assert to_epoch_ms(parse_time("2026-05-01T14:30:00.250Z")) == 1_777_645_800_250
    assert to_epoch_ms(parse_time("2026-05-01T14:30:00.000999Z")) == 1_777_645_800_000
    assert to_epoch_ms(datetime(2026, 5, 1, 16, 30, tzinfo=timezone(timedelta(hours=2)))) == (
        1_777_645_800_000
    )


@pytest.mark.parametrize(
    "text", ["2h", "90s", "1.5h", "7d", "2026-04-30", "2026-05-01T14:30", "2026-05-01T16:30+02:00"]
)
def test_replay_reads_times_as_the_dead_letter_filters_do(text: str) -> None:
    now_ms = to_epoch_ms(NOW)
    assert parse_datetime(text, now_ms=now_ms) == to_epoch_ms(parse_time(text, NOW))


def test_replay_names_its_flag_in_a_refusal() -> None:
    with pytest.raises(InvalidTime, match="^--to-datetime: 'yesterday' is neither"):
        parse_datetime("yesterday")
