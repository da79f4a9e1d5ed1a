"""The Send Customer body (SPEC §9): one JSON object per account update.

Built like the Send Contact body (contact.py): once, when the update is planned, and
stored without `sent_at`; each attempt appends its own (`contact.with_sent_at`). Every
body carries all of the account's current fields, as a Group call carries all of its
traits; `custom` carries the changed account audience and trait keys only.
"""

from __future__ import annotations

import functools
import json
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from reconciler.pipeline.contact import is_valid_email, iso_millis

ACTION_TYPE = "Send Customer"
TEXT_FIELDS = ("name", "description")
ADDRESS_FIELDS = ("street", "city", "state", "postal_code", "country")
SKIP_NO_USER_ID = "no user_id: the account has no row with a user_id in the [accounts] query"
SKIP_NO_GROUP_ID = "no group_id"
NOTE_EMAIL = "email is not a valid address; left out of the body"
NOTE_WEBSITE = "website is not a URI reference; left out of the body"
NOTE_CREATED_AT = "created_at is not a date or time; left out of the body"


# Every update of a run shares its snapshot time: format it once, not per account.
_run_timestamp = functools.lru_cache(maxsize=4)(iso_millis)


@dataclass(frozen=True)
class Customer:
    """A planned body: `text` is the JSON without `sent_at`; `skip` says why not to send."""

    text: str
    skip: str | None
    note: str | None
    left_out: tuple[str, ...] = ()  # the fields that failed validation


def build_customer(
    message_id: str,
    observed_at: datetime,
    group_id: str | None,
    user_id: str | None,
    fields: Mapping[str, str],
    changed: Sequence[tuple[str, Any]],
    custom_attributes: bool,
) -> Customer:
    """The body for one account update; `changed` is (key, value) of the changed account
    audiences and traits, in key order.

    Promises: only the keys of SPEC §9, in its order; no null or blank value anywhere;
    `address` only with one of its members; `email`, `website` and `created_at` left
    out (and noted) when invalid; `skip` set when `user_id` or `group_id` is missing.
    """
    body: dict[str, Any] = {
        "type": ACTION_TYPE,
        "message_id": message_id,
        "timestamp": _run_timestamp(observed_at),
    }
    notes, left_out = [], []
    if _present(user_id):
        body["user_id"] = user_id
    if _present(group_id):
        body["group_id"] = group_id
    for field in TEXT_FIELDS:
        if _present(fields.get(field)):
            body[field] = str(fields[field])
    email = fields.get("email")
    if _present(email):
        if is_valid_email(str(email)):
            body["email"] = str(email)
        else:
            notes.append(NOTE_EMAIL)
            left_out.append("email")
    website = fields.get("website")
    if _present(website):
        if is_uri_reference(str(website)):
            body["website"] = str(website)
        else:
            notes.append(NOTE_WEBSITE)
            left_out.append("website")
    created_at = fields.get("created_at")
    if _present(created_at):
        moment = parse_moment(str(created_at))
        if moment is not None:
            body["created_at"] = iso_millis(moment)
        else:
            notes.append(NOTE_CREATED_AT)
            left_out.append("created_at")
    address = {f: str(fields[f]) for f in ADDRESS_FIELDS if _present(fields.get(f))}
    if address:
        body["address"] = address
    custom = [{"key": key, "value": value} for key, value in changed if _present(value)]
    if custom_attributes and custom:
        body["custom"] = custom
    skip = None
    if "user_id" not in body:
        skip = SKIP_NO_USER_ID
    elif "group_id" not in body:
        skip = SKIP_NO_GROUP_ID
    return Customer(
        json.dumps(body, ensure_ascii=False, separators=(",", ":")),
        skip,
        "; ".join(notes) or None,
        tuple(left_out),
    )


def _present(value: Any) -> bool:
    """Null and empty (or blank) strings are never sent (SPEC §5, §9)."""
    return value is not None and not (isinstance(value, str) and not value.strip())


def is_uri_reference(text: str) -> bool:
    """SPEC §9's `uri-reference`: no whitespace and no control characters."""
    return not any(c.isspace() or unicodedata.category(c) == "Cc" for c in text)


def parse_moment(text: str) -> datetime | None:
    """An ISO 8601 date or date-time as an aware UTC datetime; None when it is neither.

    A date is midnight UTC; a date-time without an offset is taken as UTC. Times
    without a date, numbers and other text are not dates.
    """
    try:
        moment = datetime.fromisoformat(text.strip())  # dates too, since Python 3.11
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC)
    except (ValueError, OverflowError):
        return None
