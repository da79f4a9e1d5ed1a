"""The Send Customer body (SPEC §9): exact keys, validation, skips, for every input."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.config import ACCOUNT_FIELDS
from reconciler.pipeline.contact import with_sent_at
from reconciler.pipeline.customer import (
    NOTE_CREATED_AT,
    NOTE_EMAIL,
    NOTE_WEBSITE,
    SKIP_NO_GROUP_ID,
    SKIP_NO_USER_ID,
    build_customer,
    is_uri_reference,
    parse_moment,
)
from reconciler.pipeline.plan import message_id

ORDER = [
    "type",
    "message_id",
    "timestamp",
    "user_id",
    "group_id",
    "name",
    "description",
    "email",
    "website",
    "created_at",
    "address",
    "custom",
    "sent_at",
]
OBSERVED = datetime(2026, 11, 24, 23, 9, 20, 123456, tzinfo=UTC)
SENT = datetime(2026, 11, 24, 23, 9, 21, tzinfo=UTC)
FULL = {
    "group_id": "g1",
    "name": "Acme",
    "description": "Rockets",
    "email": "ops@acme.com",
    "website": "https://acme.example/about?x=1",
    "created_at": "2024-03-01 10:00:00",
    "street": "1 Main St",
    "city": "Paris",
    "state": "IDF",
    "postal_code": "75001",
    "country": "FR",
}


def body_of(
    fields: dict[str, str],
    user_id: str | None = "u1",
    group_id: str | None = "g1",
    changed: list[tuple[str, Any]] | None = None,
    custom_attributes: bool = True,
) -> tuple[dict[str, Any], str | None, str | None]:
    built = build_customer(
        "mid", OBSERVED, group_id, user_id, fields, changed or [], custom_attributes
    )
    return json.loads(with_sent_at(built.text, SENT)), built.skip, built.note


def test_a_full_body_has_exactly_the_spec_keys_in_order():
    body, skip, note = body_of(FULL, changed=[("enterprise", True), ("seats", 120)])
    assert list(body) == ORDER
    assert body == {
        "type": "Send Customer",
        "message_id": "mid",
        "timestamp": "2026-11-24T23:09:20.123Z",
        "user_id": "u1",
        "group_id": "g1",
        "name": "Acme",
        "description": "Rockets",
        "email": "ops@acme.com",
        "website": "https://acme.example/about?x=1",
        "created_at": "2024-03-01T10:00:00.000Z",
        "address": {
            "street": "1 Main St",
            "city": "Paris",
            "state": "IDF",
            "postal_code": "75001",
            "country": "FR",
        },
        "custom": [{"key": "enterprise", "value": True}, {"key": "seats", "value": 120}],
        "sent_at": "2026-11-24T23:09:21.000Z",
    }
    assert (skip, note) == (None, None)


def test_address_holds_only_its_present_members_and_only_when_one_is():
    body, _, _ = body_of({"city": "Paris", "street": "  ", "country": ""})
    assert body["address"] == {"city": "Paris"}
    body, _, _ = body_of({"street": " ", "name": "Acme"})
    assert "address" not in body


def test_an_account_with_no_fields_and_no_changes_is_still_a_body():
    body, skip, _ = body_of({})
    assert list(body) == ["type", "message_id", "timestamp", "user_id", "group_id", "sent_at"]
    assert skip is None  # no 5-keys rule for Send Customer


@pytest.mark.parametrize(
    "user_id, group_id, reason",
    [
        (None, "g1", SKIP_NO_USER_ID),
        ("  ", "g1", SKIP_NO_USER_ID),
        ("u1", None, SKIP_NO_GROUP_ID),
        ("u1", "", SKIP_NO_GROUP_ID),
    ],
)
def test_a_body_without_user_id_or_group_id_is_skipped(user_id, group_id, reason):
    body, skip, _ = body_of(FULL, user_id=user_id, group_id=group_id)
    assert skip == reason
    assert ("user_id" in body) == (reason != SKIP_NO_USER_ID)


@pytest.mark.parametrize(
    "field, value, note",
    [
        ("email", "not an email", NOTE_EMAIL),
        ("email", "ops@", NOTE_EMAIL),
        ("website", "https://acme.example/a b", NOTE_WEBSITE),
        ("website", "https://acme.example/\x07", NOTE_WEBSITE),
        ("created_at", "yesterday", NOTE_CREATED_AT),
        ("created_at", "1700000000", NOTE_CREATED_AT),
        ("created_at", "10:00:00", NOTE_CREATED_AT),
    ],
)
def test_an_invalid_value_is_left_out_and_noted(field, value, note):
    body, skip, got = body_of({**FULL, field: value})
    assert field not in body and got == note and skip is None
    assert body["name"] == "Acme"  # the rest is sent


def test_every_note_is_kept():
    _, _, note = body_of({"email": "x", "website": "a b", "created_at": "soon"})
    assert note == f"{NOTE_EMAIL}; {NOTE_WEBSITE}; {NOTE_CREATED_AT}"


@pytest.mark.parametrize(
    "website",
    [
        "https://acme.example",
        "acme.example",
        "/relative/path",
        "mailto:ops@acme.com",
        "#frag",
        "https://ü.example/ä",
    ],
)
def test_uri_references_are_accepted(website):
    assert is_uri_reference(website)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2024-03-01", "2024-03-01T00:00:00.000Z"),
        ("2024-03-01T10:00:00", "2024-03-01T10:00:00.000Z"),
        ("2024-03-01 10:00:00.5", "2024-03-01T10:00:00.500Z"),
        ("2024-03-01T10:00:00Z", "2024-03-01T10:00:00.000Z"),
        ("2024-03-01T12:00:00+02:00", "2024-03-01T10:00:00.000Z"),
        (" 2024-03-01T10:00:00.123456-01:00 ", "2024-03-01T11:00:00.123Z"),
    ],
)
def test_created_at_becomes_iso_8601_utc_with_milliseconds(text, expected):
    body, _, note = body_of({"created_at": text})
    assert body["created_at"] == expected and note is None


@pytest.mark.parametrize("text", ["", "2024-13-01", "2024-02-30", "3", "now", "10:00"])
def test_what_is_not_a_date_or_time_is_not_parsed(text):
    assert parse_moment(text) is None


def test_custom_attributes_false_sends_no_custom():
    body, skip, _ = body_of(FULL, changed=[("seats", 3)], custom_attributes=False)
    assert "custom" not in body and skip is None


def test_message_ids_of_a_user_and_an_account_with_the_same_id_text_differ():
    changed = [("k", "true")]
    assert message_id("42", 0, None, changed) != message_id("42", 0, None, changed, "customer")


def test_contact_message_ids_are_what_they_were_before_accounts():
    """Pending updates planned before the upgrade keep their ids."""
    import hashlib
    import uuid

    canonical = "\x1f".join(("2:u1", "3", "None", "high_value_users=true", "ltv=12"))
    before = str(uuid.UUID(bytes=hashlib.sha256(canonical.encode()).digest()[:16], version=5))
    assert message_id("u1", 3, None, [("high_value_users", "true"), ("ltv", "12")]) == before


@given(
    st.text(min_size=1, max_size=30),
    st.integers(min_value=0, max_value=10**6),
    st.none() | st.integers(min_value=1, max_value=10**6),
    st.lists(st.tuples(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), st.text(max_size=12))),
    st.sampled_from(["contact", "customer"]),
)
def test_message_ids_are_the_uuid5_form_of_the_digest(user_id, version, resync, changed, entity):
    """message_id formats the digest itself; it must be exactly what uuid.UUID writes."""
    import hashlib
    import uuid

    parts = [f"{len(user_id)}:{user_id}", str(version), str(resync)]
    parts += [f"{key}={value}" for key, value in changed]
    if entity != "contact":
        parts.insert(0, entity)
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()[:16]
    expected = str(uuid.UUID(bytes=digest, version=5))
    assert message_id(user_id, version, resync, changed, entity) == expected


blankish = st.sampled_from(["", " ", "\t"])
maybe = st.none() | st.text(max_size=20) | blankish
fields = st.fixed_dictionaries(
    {},
    optional={
        **dict.fromkeys(ACCOUNT_FIELDS, maybe),
        "created_at": st.none() | st.sampled_from(["2024-01-01", "x", "2024-01-01T00:00:00Z"]),
    },
)
values = st.booleans() | st.integers() | st.text(max_size=10) | st.none()
changes = st.lists(
    st.tuples(st.from_regex(r"[a-z0-9_]{1,12}", fullmatch=True), values),
    max_size=4,
    unique_by=lambda c: c[0],
).map(sorted)


@settings(max_examples=300)
@given(
    st.none() | st.text(max_size=10),
    st.none() | st.text(max_size=10),
    fields,
    changes,
    st.booleans(),
)
def test_body_keys_are_allowed_in_order_and_never_null_or_blank(
    user_id, group_id, fields, changed, custom_attributes
):
    body, skip, _ = body_of(fields, user_id, group_id, changed, custom_attributes)
    assert [k for k in ORDER if k in body] == list(body)
    inner = [
        *body.values(),
        *body.get("address", {}).values(),
        *(c["value"] for c in body.get("custom", [])),
    ]
    for value in inner:
        assert value is not None and not (isinstance(value, str) and not value.strip())
    assert all(isinstance(v, str) for v in body.get("address", {}).values())
    assert (skip is None) == ("user_id" in body and "group_id" in body)
