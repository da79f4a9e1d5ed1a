"""Audience and trait keys (SPEC §2): the snake_cased names ChartMogul receives."""

from __future__ import annotations

import re

import inflection

EXPLICIT_KEY = re.compile(r"^[a-z0-9_]+$")
_NOT_KEY_CHARS = re.compile(r"[^a-z0-9]+")


def derive_key(name: str) -> str:
    """The key for an entry name; an empty string when nothing usable is left.

    "Order Completed Last 30 Days" → "order_completed_last_30_days",
    "HighValueUsers" → "high_value_users", "Café Users" → "cafe_users".
    """
    text = inflection.underscore(inflection.transliterate(name)).lower()
    return _NOT_KEY_CHARS.sub("_", text).strip("_")
