"""Key derivation (SPEC §2): the SPEC's examples exactly, and properties of every name."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from reconciler.config import load_config
from reconciler.errors import ConfigError
from reconciler.keys import EXPLICIT_KEY, derive_key

KEY = re.compile(r"^[a-z0-9]+(_[a-z0-9]+)*$")


@pytest.mark.parametrize(
    "name, key",
    [
        ("Order Completed Last 30 Days", "order_completed_last_30_days"),
        ("order completed last 30days", "order_completed_last_30days"),
        ("High-Value Users", "high_value_users"),
        ("HighValueUsers", "high_value_users"),
        ("NPS Score", "nps_score"),
        ("Café Users", "cafe_users"),
    ],
)
def test_spec_examples(name, key):
    assert derive_key(name) == key


@pytest.mark.parametrize(
    "name, key",
    [
        ("  Trailing -- punctuation!! ", "trailing_punctuation"),
        ("__already_snake__", "already_snake"),
        ("Ünïcödé Ñame", "unicode_name"),
        ("HTTPStatus Code", "http_status_code"),
        ("100% Club", "100_club"),
        ("日本語", ""),
        ("!!!", ""),
    ],
)
def test_more_names(name, key):
    assert derive_key(name) == key


names = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",)),  # type: ignore[arg-type]
    max_size=60,
)


@settings(max_examples=300)
@given(names)
@example("Order Completed Last 30 Days")
@example("ǅemal ß ﬁ ⅷ ²")
def test_key_is_snake_case_of_only_allowed_characters(name):
    key = derive_key(name)
    assert key == "" or KEY.match(key), key
    assert key == "" or EXPLICIT_KEY.match(key)


@settings(max_examples=300)
@given(names)
def test_derivation_is_idempotent(name):
    key = derive_key(name)
    assert derive_key(key) == key


def _toml(text: str) -> str:
    """A TOML basic string holding `text` exactly."""
    escaped = []
    for char in text:
        if char in '"\\':
            escaped.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def _load(*entries: tuple[str, str]) -> None:
    text = (
        '[source]\nurl = "sqlite:///w.db"\n[destination]\n'
        'webhook_url = "https://hooks.example.com/x"\n'
    )
    for section, name in entries:
        text += f'[[{section}]]\nname = {_toml(name)}\nquery = "SELECT user_id FROM t"\n'
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "reconciler.toml"
        path.write_text(text, encoding="utf-8")
        load_config(path, env={})


def _variant(name: str, style: int) -> str:
    """Another spelling of `name` that must produce the same key."""
    key = derive_key(name)
    return [key.upper(), key.replace("_", " "), key.replace("_", "-") + "!", f"  {key}  "][style]


@settings(max_examples=100, deadline=None)
@given(
    names.filter(lambda n: derive_key(n) != "" and n.strip() != ""),
    st.integers(0, 3),
    st.sampled_from(["audiences", "traits"]),
)
def test_two_names_with_one_key_are_a_config_error_naming_both(name, style, section):
    other = _variant(name, style)
    if other == name or derive_key(other) != derive_key(name):
        return  # an upper-cased key may split differently (e.g. digits): not a collision
    with pytest.raises(ConfigError) as error:
        _load(("audiences", name), (section, other))
    message = str(error.value)
    assert f'"{derive_key(name)}"' in message and "both produce the key" in message
    assert f'"{name}"' in message and f'"{other}"' in message


@settings(max_examples=100, deadline=None)
@given(names.filter(lambda n: derive_key(n) == "" and n.strip() != ""))
@example("---")
@example("日本語")
def test_name_without_key_characters_is_a_config_error(name):
    with pytest.raises(ConfigError, match="name yields an empty key"):
        _load(("traits", name))


@settings(max_examples=100, deadline=None)
@given(st.lists(names.filter(lambda n: n.strip() != ""), min_size=2, max_size=5))
def test_distinct_keys_load_and_equal_keys_do_not(entry_names):
    keys = [derive_key(n) for n in entry_names]
    if "" in keys:
        return
    if len(set(keys)) == len(keys):
        _load(*(("audiences", n) for n in entry_names))
    else:
        with pytest.raises(ConfigError, match="both produce the key"):
            _load(*(("audiences", n) for n in entry_names))
