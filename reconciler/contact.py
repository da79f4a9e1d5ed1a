"""The Send Contact body (SPEC §5): one JSON object per update.

Built once, when the update is planned, and stored without `sent_at`; each attempt
appends its own `sent_at` (`with_sent_at`), so every retry of one update sends the
same message id, timestamp and contact fields.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from email_validator import EmailNotValidError, validate_email

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


@dataclass(frozen=True)
class Contact:
    """A planned body: `text` is the JSON without `sent_at`; `skip` says why not to send."""

    text: str
    skip: str | None
    note: str | None


def build_contact(message_id: str, observed_at: datetime, user_id: str | None,
                  profile: Mapping[str, str], changed: Sequence[tuple[str, Any]],
                  custom_attributes: bool) -> Contact:
    """The body for one update; `changed` is (key, value) in key order."""
    body: dict[str, Any] = {
        "type": ACTION_TYPE,
        "message_id": message_id,
        "timestamp": iso_millis(observed_at),
    }
    note = None
    if user_id:
        body["user_id"] = user_id
    for field in CONTACT_FIELDS:
        value = profile.get(field)
        if not value:
            continue
        if field == "email" and not is_valid_email(value):
            note = "email is not a valid address; left out of the body"
            continue
        body[field] = value
    company_id = profile.get("company_id")
    if company_id:
        company = {"id": str(company_id)}
        if profile.get("company_name"):
            company["name"] = profile["company_name"]
        body["company"] = company
    if custom_attributes and changed:
        body["custom"] = [{"key": key, "value": value} for key, value in changed]
    skip = None
    if not body.get("user_id") and not body.get("anonymous_id"):
        skip = SKIP_NO_ID
    elif len(body) + 1 < MIN_KEYS:  # + 1: sent_at, added when sending
        skip = SKIP_EMPTY
    return Contact(json.dumps(body, ensure_ascii=False, separators=(",", ":")), skip, note)


def with_sent_at(text: str, sent_at: datetime) -> bytes:
    """The stored body with this attempt's `sent_at`, ready for the wire."""
    return (text[:-1] + ',"sent_at":"' + iso_millis(sent_at) + '"}').encode()


def is_valid_email(address: str) -> bool:
    """Syntax only: no DNS look-ups."""
    try:
        validate_email(address, check_deliverability=False)
    except EmailNotValidError:
        return False
    return True
