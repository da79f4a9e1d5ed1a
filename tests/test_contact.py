"""The Send Contact body (SPEC §5): properties that hold for every input."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.contact import (
    CONTACT_FIELDS,
    SKIP_EMPTY,
    SKIP_NO_ID,
    build_contact,
    is_valid_email,
    with_sent_at,
)

ALLOWED = {"type", "message_id", "timestamp", "sent_at", "user_id", "anonymous_id", "email",
           "first_name", "last_name", "name", "title", "phone", "linked_in", "twitter",
           "company", "custom"}
OBSERVED = datetime(2026, 11, 24, 23, 9, 20, 123456, tzinfo=UTC)
SENT = datetime(2026, 11, 24, 23, 9, 21, tzinfo=UTC)

blankish = st.sampled_from(["", " ", "\t", "\n  "])
text = st.text(max_size=30) | blankish
maybe = st.none() | text
emails = st.sampled_from(["ann@example.com", "not an email", "a@b", "@example.com",
                          "ünï@exämple.com", ""])
profiles = st.fixed_dictionaries({}, optional={
    **dict.fromkeys(CONTACT_FIELDS, maybe),
    "email": st.none() | emails,
    "company_id": maybe, "company_name": maybe,
})
values = (st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
          | st.text(max_size=20) | st.none())
changes = st.lists(st.tuples(st.from_regex(r"[a-z0-9_]{1,12}", fullmatch=True), values),
                   max_size=4, unique_by=lambda c: c[0]).map(sorted)


def sent_body(contact_text: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(with_sent_at(contact_text, SENT))
    return body


def walk(value: Any) -> list[Any]:
    """Every value inside a JSON document."""
    if isinstance(value, dict):
        return [v for item in value.values() for v in [item, *walk(item)]]
    if isinstance(value, list):
        return [v for item in value for v in [item, *walk(item)]]
    return []


@settings(max_examples=400)
@given(st.none() | text, profiles, changes, st.booleans())
def test_body_has_only_allowed_keys_and_no_null_or_empty_value(user_id, profile, changed,
                                                                custom_attributes):
    contact = build_contact("mid-1", OBSERVED, user_id, profile, changed, custom_attributes)
    body = sent_body(contact.text)
    assert set(body) <= ALLOWED
    for value in walk(body):
        assert value is not None
        assert not (isinstance(value, str) and not value.strip())
    assert body["type"] == "Send Contact" and body["message_id"] == "mid-1"
    assert body["timestamp"] == "2026-11-24T23:09:20.123Z"
    assert body["sent_at"] == "2026-11-24T23:09:21.000Z"


@settings(max_examples=400)
@given(profiles, changes)
def test_company_only_with_an_id_which_is_a_string(profile, changed):
    body = sent_body(build_contact("m", OBSERVED, "u1", profile, changed, True).text)
    company_id = profile.get("company_id")
    if company_id is None or not company_id.strip():
        assert "company" not in body
    else:
        assert body["company"]["id"] == str(company_id)
        assert set(body["company"]) <= {"id", "name"}


@settings(max_examples=400)
@given(st.none() | text, profiles, changes, st.booleans())
def test_skip_rules(user_id, profile, changed, custom_attributes):
    """No id: skipped for that reason; otherwise skipped iff 5 keys or fewer."""
    contact = build_contact("m", OBSERVED, user_id, profile, changed, custom_attributes)
    body = sent_body(contact.text)
    if "user_id" not in body and "anonymous_id" not in body:
        assert contact.skip == SKIP_NO_ID
    elif len(body) <= 5:
        assert contact.skip == SKIP_EMPTY
        assert not custom_attributes or not [v for _k, v in changed if v not in (None, "")]
    else:
        assert contact.skip is None


@settings(max_examples=200)
@given(profiles, changes)
def test_custom_carries_each_changed_key_in_order_with_its_json_value(profile, changed):
    body = sent_body(build_contact("m", OBSERVED, "u1", profile, changed, True).text)
    expected = [{"key": k, "value": v} for k, v in changed
                if v is not None and not (isinstance(v, str) and not v.strip())]
    assert body.get("custom", []) == expected
    for item in body.get("custom", []):
        assert type(item["value"]) is type(dict(changed)[item["key"]])


@settings(max_examples=200)
@given(profiles)
def test_without_custom_attributes_no_custom_key(profile):
    body = sent_body(build_contact("m", OBSERVED, "u1", profile, [("k", True)], False).text)
    assert "custom" not in body


@settings(max_examples=200)
@given(profiles)
def test_invalid_email_is_left_out_with_the_reason(profile):
    contact = build_contact("m", OBSERVED, "u1", profile, [("k", 1)], True)
    body = sent_body(contact.text)
    email = profile.get("email")
    if email in ("not an email", "a@b", "@example.com"):
        assert "email" not in body
        assert contact.note is not None and "email is not a valid address" in contact.note
    elif email:
        assert body["email"] == email and contact.note is None


def test_non_ascii_and_long_values_survive_untouched():
    long = "x" * 100_000
    profile = {"first_name": "Zoë 李 👩‍💻", "last_name": "שלום", "title": long}
    body = sent_body(build_contact("m", OBSERVED, "ü-1", profile, [("k", "ñ" * 5000)],
                                   True).text)
    assert body["first_name"] == "Zoë 李 👩‍💻" and body["last_name"] == "שלום"
    assert body["title"] == long and body["user_id"] == "ü-1"
    assert body["custom"] == [{"key": "k", "value": "ñ" * 5000}]


@settings(max_examples=400)
@given(st.from_regex(r"[A-Za-z0-9_+.\-]{1,20}@([A-Za-z0-9\-]{1,12}\.){1,3}[A-Za-z0-9]{1,8}",
                     fullmatch=True))
def test_fast_email_check_agrees_with_email_validator(address):
    from email_validator import EmailNotValidError, validate_email
    try:
        validate_email(address, check_deliverability=False)
        expected = True
    except EmailNotValidError:
        expected = False
    assert is_valid_email(address) is expected
