"""`[schedule] cron` means what crontab(5) says, not what APScheduler 3.x's parser says."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from reconciler.ops.crontab import cron_trigger, day_of_week

SATURDAY = datetime(2026, 11, 28, 12, 30, tzinfo=UTC)


def next_fire(expression: str, after: datetime = SATURDAY) -> datetime:
    moment: datetime = cron_trigger(expression, UTC).get_next_fire_time(None, after)
    return moment


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("0 9 * * 1", datetime(2026, 11, 30, 9, tzinfo=UTC)),  # 1 is Monday
        ("0 9 * * 0", datetime(2026, 11, 29, 9, tzinfo=UTC)),  # 0 is Sunday
        ("0 9 * * 7", datetime(2026, 11, 29, 9, tzinfo=UTC)),  # and so is 7
        ("0 9 * * 1-5", datetime(2026, 11, 30, 9, tzinfo=UTC)),  # weekdays
        ("0 9 * * mon-fri", datetime(2026, 11, 30, 9, tzinfo=UTC)),
        ("0 9 * * 5-7", datetime(2026, 11, 29, 9, tzinfo=UTC)),  # Fri, Sat, Sun
        ("0 */2 * * *", datetime(2026, 11, 28, 14, tzinfo=UTC)),
    ],
)
def test_weekday_numbers_count_from_sunday(expression, expected):
    assert next_fire(expression) == expected


def test_day_of_month_and_weekday_both_restricted_fire_on_either():
    # cron: the 1st of the month OR any Monday.
    assert next_fire("0 0 1 * 1") == datetime(2026, 11, 30, tzinfo=UTC)  # Monday
    assert next_fire("0 0 1 * 1", datetime(2026, 11, 30, 1, tzinfo=UTC)) == datetime(
        2026, 12, 1, tzinfo=UTC
    )  # the 1st


def test_a_starred_day_field_keeps_both_conditions():
    # cron ANDs the fields when either starts with "*": odd days that are Mondays.
    assert next_fire("0 0 */2 * 1") == datetime(2026, 12, 7, tzinfo=UTC)


@pytest.mark.parametrize(
    "field, expected",
    [
        ("*", "*"),
        ("1-5", "mon,tue,wed,thu,fri"),
        ("0,7", "sun"),
        ("*/2", "sun,tue,thu,sat"),
        ("sat,sun", "sun,sat"),
        ("fri-sun", "sun,fri,sat"),
        ("0-6", "*"),
    ],
)
def test_day_of_week_field_becomes_names(field, expected):
    assert day_of_week(field) == expected


@pytest.mark.parametrize("field", ["8", "5-2", "funday", "*/0"])
def test_invalid_day_of_week_is_refused(field):
    with pytest.raises(ValueError):
        day_of_week(field)
