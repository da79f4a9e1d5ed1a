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

ACTION_TYPE = "Send Contact"
CONTACT_FIELDS = (
    "anonymous_id",
    "email",
    "first_name",
    "last_name",
    "name",
    "title",
    "phone",
    "linked_in",
    "twitter",
)
# A body needs more than type, message_id, timestamp, sent_at and one id to say anything.
MIN_KEYS = 6
SKIP_NO_ID = "no user_id or anonymous_id"
SKIP_EMPTY = "body of 5 keys or fewer carries nothing of interest"
# Why a field was left out of a body; history counts updates by these texts, so they
# stay as they are (`history.left_out_counts`).
NOTE_EMAIL = "email is not a valid address; left out of the body"
NOTE_LINKED_IN = "linked_in is not a URI with a scheme; left out of the body"


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
    left_out: tuple[str, ...] = ()  # the fields that failed validation: email, linked_in


def build_contact(
    message_id: str,
    observed_at: datetime,
    user_id: str | None,
    profile: Mapping[str, str],
    changed: Sequence[tuple[str, Any]],
    custom_attributes: bool,
) -> Contact:
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
    left_out: list[str] = []
    if _present(user_id):
        body["user_id"] = user_id
    for field in CONTACT_FIELDS:
        value = profile.get(field)
        if not _present(value):
            continue
        check = _FORMATS.get(field)
        if check is not None and not check(str(value)):
            left_out.append(field)
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
    note = "; ".join(_NOTES[field] for field in left_out) or None
    return Contact(
        json.dumps(body, ensure_ascii=False, separators=(",", ":")), skip, note, tuple(left_out)
    )


def _present(value: Any) -> bool:
    """Null and empty (or blank) strings are never sent (SPEC §5)."""
    return value is not None and not (isinstance(value, str) and not value.strip())


def with_sent_at(text: str, sent_at: datetime) -> bytes:
    """The stored body with this attempt's `sent_at`, ready for the wire."""
    return (text[:-1] + ',"sent_at":"' + iso_millis(sent_at) + '"}').encode()


# The Segment action's JSON schema declares `email` with format "email" and validates
# with ajv-formats in its default "full" mode; `linked_in` is judged by format "uri"
# (SPEC §5). Both patterns are ajv-formats' own, re-expressed part by part below; like
# JavaScript's /i without the u flag, only ASCII letters match case-insensitively.
_ATEXT = r"[a-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOMAIN_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
# No length limits and at least one dot in the domain: `jane@acme.local` is valid,
# `jane@localhost`, `josé@acme.com` and `a..b@acme.com` are not.
_EMAIL = re.compile(
    rf"{_ATEXT}+(?:\.{_ATEXT}+)*@(?:{_DOMAIN_LABEL}\.)+{_DOMAIN_LABEL}", re.IGNORECASE | re.ASCII
)

# RFC 3986 `URI` (a scheme is required; no relative references), as ajv-formats writes it.
_PCT = r"%[0-9a-f]{2}"
_UNRESERVED_SUB = r"a-z0-9\-._~!$&'()*+,;="  # unreserved and sub-delims, inside [...]
_PCHAR = rf"(?:[{_UNRESERVED_SUB}:@]|{_PCT})"
_H16 = r"[0-9a-f]{1,4}"
_DEC_OCTET = r"(?:25[0-5]|2[0-4]\d|[01]?\d\d?)"
_IPV4 = rf"(?:{_DEC_OCTET}\.){{3}}{_DEC_OCTET}"
_LS32 = rf"(?:{_H16}:{_H16}|{_IPV4})"
_IPV6 = "|".join(
    (
        "(?:"
        + "|".join(
            (
                rf"(?:{_H16}:){{6}}",
                rf"::(?:{_H16}:){{5}}",
                rf"(?:{_H16})?::(?:{_H16}:){{4}}",
                rf"(?:(?:{_H16}:){{0,1}}{_H16})?::(?:{_H16}:){{3}}",
                rf"(?:(?:{_H16}:){{0,2}}{_H16})?::(?:{_H16}:){{2}}",
                rf"(?:(?:{_H16}:){{0,3}}{_H16})?::{_H16}:",
                rf"(?:(?:{_H16}:){{0,4}}{_H16})?::",
            )
        )
        + f"){_LS32}",
        rf"(?:(?:{_H16}:){{0,5}}{_H16})?::{_H16}",
        rf"(?:(?:{_H16}:){{0,6}}{_H16})?::",
    )
)
_IP_LITERAL = rf"\[(?:{_IPV6}|[Vv][0-9a-f]+\.[{_UNRESERVED_SUB}:]+)\]"
_REG_NAME = rf"(?:[{_UNRESERVED_SUB}]|{_PCT})*"
_USERINFO = rf"(?:[{_UNRESERVED_SUB}:]|{_PCT})*@"
_SEGMENTS = rf"(?:/{_PCHAR}*)*"
_HIER_PART = "|".join(
    (
        # ajv accepts one slash as well as two before an authority.
        rf"/?/(?:{_USERINFO})?(?:{_IP_LITERAL}|{_IPV4}|{_REG_NAME})(?::\d*)?{_SEGMENTS}",
        rf"/(?:{_PCHAR}+{_SEGMENTS})?",
        rf"{_PCHAR}+{_SEGMENTS}",
    )
)
_QUERY_OR_FRAGMENT = rf"(?:[{_UNRESERVED_SUB}:@/?]|{_PCT})*"
_URI = re.compile(
    rf"[a-z][a-z0-9+\-.]*:(?:{_HIER_PART})(?:\?{_QUERY_OR_FRAGMENT})?"
    rf"(?:#{_QUERY_OR_FRAGMENT})?",
    re.IGNORECASE | re.ASCII,
)


def is_valid_email(address: str) -> bool:
    """Whether the Segment action's schema accepts `address` as format "email"."""
    return _EMAIL.fullmatch(address) is not None


# Plain web addresses: a subset of the language of _URI, checked in a fraction of its time.
_PLAIN_URI = re.compile(r"https?://[A-Za-z0-9.\-]+(?:/[A-Za-z0-9._~\-]*)*")


def is_valid_uri(value: str) -> bool:
    """Whether the Segment action's schema accepts `value` as format "uri": a scheme,
    then ASCII URI characters only (`https://linkedin.com/in/jane`, not
    `linkedin.com/in/jane`)."""
    return _PLAIN_URI.fullmatch(value) is not None or _URI.fullmatch(value) is not None


_FORMATS = {"email": is_valid_email, "linked_in": is_valid_uri}
_NOTES = {"email": NOTE_EMAIL, "linked_in": NOTE_LINKED_IN}
