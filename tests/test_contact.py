"""The Send Contact body (SPEC §5): properties that hold for every input."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.pipeline.contact import (
    CONTACT_FIELDS,
    NOTE_EMAIL,
    NOTE_LINKED_IN,
    SKIP_EMPTY,
    SKIP_NO_ID,
    build_contact,
    is_valid_email,
    is_valid_uri,
    with_sent_at,
)

ALLOWED = {
    "type",
    "message_id",
    "timestamp",
    "sent_at",
    "user_id",
    "anonymous_id",
    "email",
    "first_name",
    "last_name",
    "name",
    "title",
    "phone",
    "linked_in",
    "twitter",
    "company",
    "custom",
}
OBSERVED = datetime(2026, 11, 24, 23, 9, 20, 123456, tzinfo=UTC)
SENT = datetime(2026, 11, 24, 23, 9, 21, tzinfo=UTC)

blankish = st.sampled_from(["", " ", "\t", "\n  "])
text = st.text(max_size=30) | blankish
maybe = st.none() | text
VALID_EMAILS = ["ann@example.com", "jane@acme.local"]
INVALID_EMAILS = ["not an email", "a@b", "@example.com", "ünï@exämple.com", "josé@acme.com"]
VALID_LINKS = ["https://linkedin.com/in/jane", "http://www.linkedin.com/in/j%C3%A9"]
INVALID_LINKS = ["linkedin.com/in/jane", "https://linkedin.com/in/josé", "in/jane"]
emails = st.sampled_from([*VALID_EMAILS, *INVALID_EMAILS, ""])
links = st.sampled_from([*VALID_LINKS, *INVALID_LINKS, ""])
profiles = st.fixed_dictionaries(
    {},
    optional={
        **dict.fromkeys(CONTACT_FIELDS, maybe),
        "email": st.none() | emails,
        "linked_in": st.none() | links,
        "company_id": maybe,
        "company_name": maybe,
    },
)
values = (
    st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.none()
)
changes = st.lists(
    st.tuples(st.from_regex(r"[a-z0-9_]{1,12}", fullmatch=True), values),
    max_size=4,
    unique_by=lambda c: c[0],
).map(sorted)


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
def test_body_has_only_allowed_keys_and_no_null_or_empty_value(
    user_id, profile, changed, custom_attributes
):
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
    expected = [
        {"key": k, "value": v}
        for k, v in changed
        if v is not None and not (isinstance(v, str) and not v.strip())
    ]
    assert body.get("custom", []) == expected
    for item in body.get("custom", []):
        assert type(item["value"]) is type(dict(changed)[item["key"]])


@settings(max_examples=200)
@given(profiles)
def test_without_custom_attributes_no_custom_key(profile):
    body = sent_body(build_contact("m", OBSERVED, "u1", profile, [("k", True)], False).text)
    assert "custom" not in body


@settings(max_examples=300)
@given(profiles)
def test_invalid_email_and_linked_in_are_left_out_with_the_reason(profile):
    """The rest of the body is sent; the note and `left_out` say what was left out."""
    contact = build_contact("m", OBSERVED, "u1", profile, [("k", 1)], True)
    body = sent_body(contact.text)
    expected_left_out = []
    for field, valid, invalid, note in (
        ("email", VALID_EMAILS, INVALID_EMAILS, NOTE_EMAIL),
        ("linked_in", VALID_LINKS, INVALID_LINKS, NOTE_LINKED_IN),
    ):
        value = profile.get(field)
        if value in invalid:
            assert field not in body
            assert contact.note is not None and note in contact.note
            expected_left_out.append(field)
        elif value in valid:
            assert body[field] == value
            assert note not in (contact.note or "")
    assert contact.left_out == tuple(expected_left_out)
    assert (contact.note is None) == (not expected_left_out)
    assert body["user_id"] == "u1" and body["custom"] == [{"key": "k", "value": 1}]


def test_non_ascii_and_long_values_survive_untouched():
    long = "x" * 100_000
    profile = {"first_name": "Zoë 李 👩‍💻", "last_name": "שלום", "title": long}
    body = sent_body(build_contact("m", OBSERVED, "ü-1", profile, [("k", "ñ" * 5000)], True).text)
    assert body["first_name"] == "Zoë 李 👩‍💻" and body["last_name"] == "שלום"
    assert body["title"] == long and body["user_id"] == "ü-1"
    assert body["custom"] == [{"key": "k", "value": "ñ" * 5000}]


# Cases from ajv-formats' own tests (tests/extras/propertyNames.json and $data/format.json)
# and from the JSON-Schema-Test-Suite draft7 optional/format/email.json they run, then
# the SPEC's examples and the edges of the "full" pattern.
EMAIL_CASES = [
    ("joe.bloggs@example.com", True),
    ("joe.bloggs@123.24-7-examples.com", True),
    ("2962", False),
    ("foo@example.com", True),
    ("bar.baz@email.example.com", True),
    ("foo", False),
    ("jane@acme.local", True),
    ("josé@acme.com", False),
    ("jane@acmé.com", False),
    ("Jane.Doe@ACME.COM", True),
    ("a!#$%&'*+/=?^_`{|}~-z@example.com", True),
    ("jane@localhost", False),  # the full pattern needs a dot in the domain
    ("jane..doe@example.com", False),
    (".jane@example.com", False),
    ("jane.@example.com", False),
    ("jane@-acme.com", False),
    ("jane@acme-.com", False),
    ("jane@acme..com", False),
    ("jane@acme.com.", False),
    ('"jane doe"@example.com', False),  # no quoted local parts
    ("jane@[127.0.0.1]", False),  # no address literals
    ("jane doe@example.com", False),
    ("jane@example.com\n", False),
    ("jane@example.com ", False),
    ("jane@ex_ample.com", False),
    ("jane@" + "a" * 64 + ".com", True),  # no length limits in the pattern
    ("jane@example.c-m", True),
    ("jane@1.2", True),
    ("\u212a@example.com", False),  # the Kelvin sign is not a K
]


@pytest.mark.parametrize("address, valid", EMAIL_CASES, ids=[a for a, _ in EMAIL_CASES])
def test_email_format_is_ajv_formats_full(address, valid):
    assert is_valid_email(address) is valid


# ajv-formats tests/extras/format.json ("format: uri") and the JSON-Schema-Test-Suite draft7
# optional/format/uri.json, then the SPEC's examples.
URI_CASES = [
    ("urn:isbn:978-3-531-18621-4", True),
    ("/abc", False),
    ("http://foo.bar/?baz=qux#quux", True),
    ("http://foo.com/blah_(wikipedia)_blah#cite-1", True),
    ("http://foo.bar/?q=Test%20URL-encoded%20stuff", True),
    ("http://xn--nw2a.xn--j6w193g/", True),
    ("http://-.~_!$&'()*+,;=:%40:80%2f::::::@example.com", True),
    ("http://223.255.255.254", True),
    ("ftp://ftp.is.co.za/rfc/rfc1808.txt", True),
    ("ldap://[2001:db8::7]/c=GB?objectClass?one", True),
    ("mailto:John.Doe@example.com", True),
    ("news:comp.infosystems.www.servers.unix", True),
    ("tel:+1-816-555-1212", True),
    ("urn:oasis:names:specification:docbook:dtd:xml:4.1.2", True),
    ("//foo.bar/?baz=qux#quux", False),
    ("\\\\WINDOWS\\fileshare", False),
    ("abc", False),
    ("http:// shouldfail.com", False),
    (":// should fail", False),
    ("bar,baz:foo", False),
    ("https://[@example.org/test.txt", False),
    ("https://example.org/foobar®.txt", False),
    ("https://example.org/foobar\\.txt", False),
    ('https://example.org/foobar".txt', False),
    ("https://example.org/foobar<>.txt", False),
    ("https://example.org/foobar{}.txt", False),
    ("https://example.org/foobar^.txt", False),
    ("https://example.org/foobar`.txt", False),
    ("https://example.org/foo bar.txt", False),
    ("https://example.org/foobar|.txt", False),
    ("http://087.10.0.1/", True),
    ("http://999.999.999.999/", True),
    ("http://example.com/%6G", False),
    ("http://example.com/%A", False),
    ("http://example.com/%", False),
    ("1http://example.com", False),
    ("ht_tp://example.com", False),
    # ajv accepts it (one slash, an empty host, then a path); newer suites do not.
    ("http://example.com:abc/path", True),
    ("https://linkedin.com/in/jane", True),
    ("linkedin.com/in/jane", False),
    ("www.linkedin.com/in/jane", False),
    ("HTTPS://LinkedIn.com/in/Jane", True),
    ("https://linkedin.com/in/jane\n", False),
    ("https://[::1]:8080/x", True),
    ("https://[::1/x", False),
]


@pytest.mark.parametrize("value, valid", URI_CASES, ids=[v for v, _ in URI_CASES])
def test_linked_in_format_is_ajv_formats_uri(value, valid):
    assert is_valid_uri(value) is valid


_ATEXT = "abcxyzABCXYZ0189!#$%&'*+/=?^_`{|}~-"
_LABEL = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,10}[A-Za-z0-9])?", fullmatch=True)
addresses = st.builds(
    lambda local, labels: ".".join(local) + "@" + ".".join(labels),
    st.lists(st.text(_ATEXT, min_size=1, max_size=8), min_size=1, max_size=3),
    st.lists(_LABEL, min_size=2, max_size=4),
)


@settings(max_examples=300)
@given(addresses)
def test_every_address_of_the_full_grammar_is_valid(address):
    assert is_valid_email(address)


@settings(max_examples=300)
@given(addresses, st.integers(min_value=0), st.characters(min_codepoint=128))
def test_a_non_ascii_character_anywhere_makes_an_address_invalid(address, where, char):
    at = where % (len(address) + 1)
    assert not is_valid_email(address[:at] + char + address[at:])


@settings(max_examples=300)
@given(addresses)
def test_an_address_without_a_dot_in_its_domain_is_invalid(address):
    local, _, domain = address.partition("@")
    assert not is_valid_email(f"{local}@{domain.replace('.', '')}")


@settings(max_examples=300)
@given(st.from_regex(r"https?://[A-Za-z0-9.\-]{1,12}(/[A-Za-z0-9._~\-]{0,8}){0,3}", fullmatch=True))
def test_the_fast_path_for_plain_web_addresses_accepts_only_what_the_uri_pattern_does(url):
    from reconciler.pipeline.contact import _URI

    assert is_valid_uri(url) and _URI.fullmatch(url) is not None
