"""`[schedule] cron` with the meaning crontab(5) gives it, as an APScheduler 3.x trigger.

APScheduler 3.x's `CronTrigger.from_crontab` differs from cron in two ways (its own
docstring and agronholm/apscheduler#286): weekday numbers count from Monday = 0
where cron has Sunday = 0 (and 7), so `* * * * 1` would fire on Tuesdays; and when
both day of month and day of week are restricted, cron fires on either, APScheduler
only on both. Day-of-week fields are therefore rewritten as weekday names, and the
"either" case becomes an `OrTrigger` of two cron triggers.
"""

from __future__ import annotations

from datetime import tzinfo
from typing import Any

from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger

DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _day(text: str) -> int:
    """0-7 (0 and 7 are Sunday) or a three-letter name."""
    if text in DAYS:
        return DAYS.index(text)
    if text.isdigit() and int(text) <= 7:
        return int(text)
    raise ValueError(f'"{text}" is not a day of the week (0-7 or sun-sat)')


def day_of_week(field: str) -> str:
    """A crontab day-of-week field as a comma-separated list of APScheduler day names."""
    days: set[int] = set()
    for part in field.lower().split(","):
        spec, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if step < 1:
            raise ValueError(f'step "/{step_text}" must be at least 1')
        if spec == "*":
            first, last = 0, 6
        elif "-" in spec:
            start, _, end = spec.partition("-")
            first, last = _day(start), _day(end)
            if last == 0 and first > 0:  # "fri-sun": Sunday ends the week here
                last = 7
        else:
            first = _day(spec)
            last = 7 if step_text else first  # "1/2": from Monday to the end of the week
        if first > last:
            raise ValueError(f'range "{spec}" runs backwards')
        days.update(day % 7 for day in range(first, last + 1, step))
    if len(days) == 7:
        return "*"
    return ",".join(DAYS[day] for day in sorted(days))


def cron_trigger(expression: str, timezone: tzinfo) -> Any:
    """The trigger for a five-field crontab expression. ValueError if it is invalid."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"wrong number of fields: {len(fields)}, expected 5")
    minute, hour, day, month, weekday = fields
    common = {"minute": minute, "hour": hour, "month": month, "timezone": timezone}
    if day.startswith("*") or weekday.startswith("*"):
        return CronTrigger(day=day, day_of_week=day_of_week(weekday), **common)
    return OrTrigger(
        [
            CronTrigger(day=day, day_of_week="*", **common),
            CronTrigger(day="*", day_of_week=day_of_week(weekday), **common),
        ]
    )
