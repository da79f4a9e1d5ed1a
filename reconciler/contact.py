"""The Send Contact body (SPEC §5): one JSON object per update.

Built once, when the update is planned, and stored without `sent_at`; each attempt
appends its own `sent_at` (`with_sent_at`), so every retry of one update sends the
same message id, timestamp and contact fields.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email

ACTION_TYPE = "Send Contact"
CONTACT_FIELDS = ("anonymous_id", "email", "first_name", "last_name", "name", "title",
                  "phone", "linked_in", "twitter")
# A body needs more than type, message_id, timestamp, sent_at and one id to say anything.
MIN_KEYS = 6
SKIP_NO_ID = "no user_id or anonymous_id"
SKIP_EMPTY = "body of 5 keys or fewer carries nothing of interest"


def iso_millis(moment: datetime) -> str:
    """`2026-11-24T23:09:20.123Z`: ISO 8601 UTC with milliseconds."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


# Every update of a run shares its snapshot time: format it once, not per user.
_run_timestamp = functools.lru_cache(maxsize=4)(iso_millis)


@dataclass(frozen=True)
class Contact:
    """A planned body: `text` is the JSON without `sent_at`; `skip` says why not to send."""

    text: str
    skip: str | None
    note: str | None


def build_contact(message_id: str, observed_at: datetime, user_id: str | None,
                  profile: Mapping[str, str], changed: Sequence[tuple[str, Any]],
                  custom_attributes: bool) -> Contact:
    """The body for one update; `changed` is (key, value) in key order.

    Promises: only the keys of SPEC §5; no null or blank value anywhere; `company` only
    with a `company_id`, its `id` a string; `skip` set when the body has no id, or when
    it would carry 5 keys or fewer once `sent_at` is added.
    """
    body: dict[str, Any] = {
        "type": ACTION_TYPE,
        "message_id": message_id,
        "timestamp": _run_timestamp(observed_at),
    }
    note = None
    if _present(user_id):
        body["user_id"] = user_id
    for field in CONTACT_FIELDS:
        value = profile.get(field)
        if not _present(value):
            continue
        if field == "email" and not is_valid_email(str(value)):
            note = "email is not a valid address; left out of the body"
            continue
        body[field] = str(value)
    company_id = profile.get("company_id")
    if _present(company_id):
        company = {"id": str(company_id)}
        if _present(profile.get("company_name")):
            company["name"] = str(profile["company_name"])
        body["company"] = company
    custom = [{"key": key, "value": value} for key, value in changed if _present(value)]
    if custom_attributes and custom:
        body["custom"] = custom
    skip = None
    if not body.get("user_id") and not body.get("anonymous_id"):
        skip = SKIP_NO_ID
    elif len(body) + 1 < MIN_KEYS:  # + 1: sent_at, added when sending
        skip = SKIP_EMPTY
    return Contact(json.dumps(body, ensure_ascii=False, separators=(",", ":")), skip, note)


def _present(value: Any) -> bool:
    """Null and empty (or blank) strings are never sent (SPEC §5)."""
    return value is not None and not (isinstance(value, str) and not value.strip())


def with_sent_at(text: str, sent_at: datetime) -> bytes:
    """The stored body with this attempt's `sent_at`, ready for the wire."""
    return (text[:-1] + ',"sent_at":"' + iso_millis(sent_at) + '"}').encode()


# Plain ASCII addresses that email-validator certainly accepts; checking those with
# it costs ~18 µs each, the planning loop's largest cost at a million users.
_PLAIN_EMAIL = re.compile(
    r"[A-Za-z0-9_+\-]+(?:\.[A-Za-z0-9_+\-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+([A-Za-z]{2,63})")


def is_valid_email(address: str) -> bool:
    """Syntax only: no DNS look-ups.

    A fast path accepts plain addresses (letters, digits, `_+-.` before the @, a
    dotted domain of letters, digits and single hyphens); everything else is decided
    by email-validator, so the two always agree.
    """
    plain = _PLAIN_EMAIL.fullmatch(address)
    if (plain is not None and len(address) <= 254 and address.index("@") <= 64
            and "--" not in address[address.index("@"):]
            and plain.group(1).lower() not in SPECIAL_USE_DOMAIN_NAMES):
        return True
    try:
        validate_email(address, check_deliverability=False)
    except EmailNotValidError:
        return False
    return True
