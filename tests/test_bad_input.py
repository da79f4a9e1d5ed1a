"""Messy source data (SPEC §3) and SQL safety, through the real command line.

Each case starts from an acknowledged first run, changes the warehouse, runs
`reconciler sync`, and checks the exit status, the message naming the entry (and one
offending user), exactly what went on the wire, and that the acknowledged state of a
failed entry did not move.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from click.testing import Result
from sqlalchemy import Engine, select

from reconciler.state.schema import acked, sync_runs, updates

from .conftest import Setup, Warehouse
from .helpers import cli

HV = "high_value_users"
LTV = "lifetime_value"


def custom(body: dict[str, Any]) -> dict[str, Any]:
    return {item["key"]: item["value"] for item in body.get("custom", [])}


def wire(setup: Setup) -> dict[str, dict[str, Any]]:
    """user_id → custom attributes of every body received (one body per user)."""
    bodies = setup.receiver.bodies()
    got = {b["user_id"]: custom(b) for b in bodies}
    assert len(got) == len(bodies), "a user received two bodies"
    return got


def sync(setup: Setup, *args: str, **config: Any) -> Result:
    return cli("sync", "--config", str(setup.write(**config)), *args)


def acked_rows(engine: Engine, key: str) -> list[Any]:
    with engine.connect() as conn:
        return conn.execute(
            select(acked.c.user_id, acked.c.value)
            .where(acked.c.key == key)
            .order_by(acked.c.user_id)
        ).all()


def last_run(engine: Engine) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(sync_runs).order_by(sync_runs.c.id.desc())).first()


def extra_entry(section: str, name: str, query: str) -> str:
    return f'\n[[{section}]]\nname = "{name}"\nquery = "{query}"\n'


@dataclass
class Case:
    id: str
    change: Callable[[Warehouse], object]
    sent: dict[str, dict[str, Any]]  # what goes on the wire, by user
    status: int = 0  # exit status of `reconciler sync`
    message: list[str] = field(default_factory=list)  # in the output
    failed_key: str | None = None  # its acknowledged state must not move
    rows_ignored: int = 0
    extra: str = ""  # more config entries


def trait(values: dict[str, Any]) -> Callable[[Warehouse], None]:
    return lambda w: w.trait("Lifetime Value", {"u0": 1, **values})


def members(*user_ids: Any) -> Callable[[Warehouse], None]:
    return lambda w: w.members("High Value Users", "u0", *user_ids)


def nothing(_w: Warehouse) -> None:
    pass


LONG = "ñ" * 50_000 + "👩‍💻" + "x" * 50_000

CASES = [
    Case(
        "null-empty-blank-user-ids",
        members(None, "", "   ", "u1"),
        {"u1": {HV: True}},
        rows_ignored=3,
        message=["ignored 3 rows without user_id"],
    ),
    Case("duplicate-audience-rows", members("u1", "u1", "u1"), {"u1": {HV: True}}),
    Case(
        "duplicate-equal-trait-rows",
        lambda w: w.executemany(
            "INSERT INTO traits VALUES (?, ?, ?)", [("Lifetime Value", "u1", 5)] * 3
        ),
        {"u1": {LTV: 5}},
    ),
    Case(
        "two-values-of-one-trait",
        lambda w: (
            w.executemany(
                "INSERT INTO traits VALUES (?, ?, ?)",
                [
                    ("Lifetime Value", "u1", 5),
                    ("Lifetime Value", "u1", 6),
                    ("Lifetime Value", "u0", 2),
                ],
            ),
            w.members("High Value Users", "u0", "u2"),
        ),
        {"u2": {HV: True}},
        status=1,
        failed_key=LTV,
        message=['trait "Lifetime Value": user "u', "has two different values", "GROUP BY user_id"],
    ),
    Case(
        "audience-query-without-user-id",
        members("u2"),
        {"u2": {HV: True}},
        status=1,
        extra=extra_entry(
            "audiences", "Bad Columns", "SELECT user_id AS id, audience FROM members"
        ),
        message=[
            'audience "Bad Columns": query returned columns (id, audience) but needs user_id',
            "SELECT id AS user_id",
        ],
    ),
    Case(
        "trait-query-without-value",
        nothing,
        {},
        status=1,
        extra=extra_entry("traits", "No Value", "SELECT user_id, trait FROM traits"),
        message=[
            'trait "No Value": query returned columns (user_id, trait) but needs '
            "value; alias it, e.g. SELECT trait AS value"
        ],
    ),
    Case(
        "trait-query-without-value-or-user-id",
        nothing,
        {},
        status=1,
        extra=extra_entry("traits", "Sums", "SELECT 'u0' AS id, 5 AS amount"),
        message=[
            'trait "Sums": query returned columns (id, amount) but needs user_id, '
            "value; alias them, e.g. SELECT id AS user_id, amount AS value"
        ],
    ),
    Case(
        "upper-case-columns-match",
        nothing,
        {"u0": {"upper": 7}},
        extra=extra_entry("traits", "Upper", "SELECT 'u0' AS USER_ID, 7 AS VALUE"),
    ),
    Case(
        "json-types-kept",
        trait(
            {"i": 3, "f": 2.5, "t": "gold", "big": 2**62, "neg": -4, "zeros": "0012", "tf": "true"}
        ),
        {
            "i": {LTV: 3},
            "f": {LTV: 2.5},
            "t": {LTV: "gold"},
            "big": {LTV: 2**62},
            "neg": {LTV: -4},
            "zeros": {LTV: "0012"},
            "tf": {LTV: "true"},
        },
    ),
    Case(
        "null-and-blank-trait-values-mean-no-value",
        trait({"n": None, "e": "", "b": "  \t", "u1": 9}),
        {"u1": {LTV: 9}},
    ),
    Case(
        "binary-trait-value",
        trait({"u1": b"\x00\xff", "u2": 3}),
        {},
        status=1,
        failed_key=LTV,
        message=[
            'trait "Lifetime Value": user "u1": binary values cannot be sent',
            "cast it to text or a number",
        ],
    ),
    Case(
        "infinite-trait-value",
        trait({"u1": float("inf")}),
        {},
        status=1,
        failed_key=LTV,
        message=['trait "Lifetime Value": user "u1": inf is not a finite number'],
    ),
    Case(
        "binary-user-id",
        members(b"\x01\x02", "u3"),
        {},
        status=1,
        failed_key=HV,
        message=['audience "High Value Users": user_id is binary'],
    ),
    Case(
        "user-id-too-long",
        members("u" * 300),
        {},
        status=1,
        failed_key=HV,
        message=['audience "High Value Users": user_id "uuu', "longer than 255 characters"],
    ),
    Case(
        "not-a-select",
        nothing,
        {},
        status=1,
        # A statement that writes nothing (a write fails the run: test_source_snapshot).
        extra=extra_entry("audiences", "Scratch", "PRAGMA query_only = ON"),
        message=['audience "Scratch": query returns no rows; it must be a SELECT'],
    ),
    Case(
        "long-and-non-ascii-values-untouched",
        lambda w: (
            w.members("High Value Users", "u0", "用户-1", "ü ser 2"),
            w.trait("Lifetime Value", {"u0": 1, "rtl": "שלום עולם", "long": LONG}),
        ),
        {
            "用户-1": {HV: True},
            "ü ser 2": {HV: True},
            "rtl": {LTV: "שלום עולם"},
            "long": {LTV: LONG},
        },
    ),
]


@pytest.fixture
def acknowledged(setup: Setup, engine_of) -> tuple[Setup, Engine]:
    """u0 is a High Value User with a Lifetime Value of 1, acknowledged."""
    setup.warehouse.members("High Value Users", "u0")
    setup.warehouse.trait("Lifetime Value", {"u0": 1})
    assert sync(setup).exit_code == 0
    setup.receiver.clear()
    return setup, engine_of(setup)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_source_data(acknowledged, case: Case):
    setup, engine = acknowledged
    before = acked_rows(engine, case.failed_key) if case.failed_key else None
    case.change(setup.warehouse)
    result = sync(setup, extra=case.extra)
    assert result.exit_code == case.status, result.output
    assert "Traceback" not in result.output
    for fragment in case.message:
        assert fragment in result.output
    assert wire(setup) == case.sent
    run = last_run(engine)
    assert run.status == ("succeeded" if case.status == 0 else "partial")
    assert run.rows_ignored == case.rows_ignored
    if case.failed_key:
        assert acked_rows(engine, case.failed_key) == before
        assert all(case.failed_key not in c for c in wire(setup).values())
        assert case.message[0] in run.error


def test_types_survive_a_second_run_unchanged(acknowledged):
    """Canonical values compare equal across runs: nothing is re-sent."""
    setup, _ = acknowledged
    trait({"i": 3, "f": 2.5, "t": "gold", "u": "ü"})(setup.warehouse)
    sync(setup)
    setup.receiver.clear()
    assert sync(setup).exit_code == 0
    assert setup.receiver.bodies() == []


def test_invalid_email_is_left_out_and_the_reason_shown(acknowledged):
    setup, engine = acknowledged
    setup.warehouse.user("u1", email="ann at example", first_name="Ann")
    setup.warehouse.members("High Value Users", "u0", "u1")
    assert sync(setup).exit_code == 0
    (body,) = setup.receiver.bodies()
    assert "email" not in body and body["first_name"] == "Ann"
    run_id = str(last_run(engine).id)
    shown = cli("show", run_id, "--json", "--config", str(setup.tmp_path / "reconciler.toml"))
    (change,) = json.loads(shown.stdout)["changes"]
    assert "email is not a valid address" in change["note"]


@pytest.mark.parametrize(
    "change, query, message",
    [
        (
            lambda w: w.user("u1", first_name=b"\xff\x00"),
            None,
            '[profile]: user "u1": first_name: binary values cannot be sent',
        ),
        (
            nothing,
            "SELECT email FROM users",
            "[profile]: query returned columns (email) but needs user_id",
        ),
    ],
    ids=["binary-field", "no-user-id"],
)
def test_unusable_profile_fails_the_run_and_sends_nothing(acknowledged, change, query, message):
    """Without contact fields no body can be built right: the whole run fails."""
    setup, engine = acknowledged
    change(setup.warehouse)
    setup.warehouse.members("High Value Users", "u0", "u1")
    text = setup.config_text()
    if query:
        text = text.replace(
            text[text.index("query = '''") : text.index("'''\n") + 4], f'query = "{query}"\n'
        )
    path = setup.tmp_path / "reconciler.toml"
    path.write_text(text)
    before = acked_rows(engine, HV)
    result = cli("sync", "--config", str(path))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert message in result.stderr and len(result.stderr.splitlines()) == 1
    assert setup.receiver.bodies() == [] and acked_rows(engine, HV) == before
    run = last_run(engine)
    assert run.status == "failed" and message in run.error


@pytest.fixture
def pg_source(pg_url: str) -> str:
    return pg_url


TYPED = {  # name: (SQL expression, the JSON value on the wire)
    "int": ("42::int", 42),
    "bigint": ("9007199254740993::bigint", 9007199254740993),
    "numeric": ("12.50::numeric", 12.5),
    "numeric whole": ("100::numeric(10,2)", 100),
    "float": ("2.5::float8", 2.5),
    "bool": ("true", True),
    "text": ("'gold'", "gold"),
    "date": ("'2026-01-02'::date", "2026-01-02"),
    "timestamp": ("'2026-01-02 03:04:05+00'::timestamptz", "2026-01-02T03:04:05+00:00"),
    "uuid": (
        "'0b7c7d3e-8f4a-4a57-9d87-3f1e2b8f6a10'::uuid",
        "0b7c7d3e-8f4a-4a57-9d87-3f1e2b8f6a10",
    ),
    "percent and colon": ("'a%b :c ?d'", "a%b :c ?d"),
}
UNSENDABLE = {  # name: (SQL expression, message)
    "bytea": ("'\\x00ff'::bytea", "binary values cannot be sent"),
    "float nan": ("'NaN'::float8", "nan is not a finite number"),
    "numeric nan": ("'NaN'::numeric", "NaN is not a finite number"),
    "infinity": ("'-Infinity'::float8", "-inf is not a finite number"),
    "json": ("'{\"a\": 1}'::json", "values of type dict cannot be sent"),
}


def test_postgresql_source_types(setup: Setup, pg_source: str, engine_of):
    """Each type keeps its JSON type; unsendable ones fail their own entry only."""
    with psycopg.connect(pg_source.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("CREATE TABLE people (user_id text)")
        conn.execute("INSERT INTO people VALUES ('u1')")
    entries = "".join(
        f"\n[[traits]]\nname = \"{name}\"\nquery = '''SELECT user_id, {sql} AS value "
        "FROM people'''\n"
        for name, (sql, _) in {**TYPED, **UNSENDABLE}.items()
    )
    text = setup.config_text(audiences=(), traits=(), extra=entries)
    text = text.replace(setup.warehouse.url, pg_source).replace(
        text[text.index("[profile]") : text.index("'''\n") + 4], ""
    )
    path = setup.tmp_path / "reconciler.toml"
    path.write_text(text)
    result = cli("sync", "--config", str(path))
    assert result.exit_code == 1, result.output
    (body,) = setup.receiver.bodies()
    sent = custom(body)
    assert sent == {name.replace(" ", "_"): value for name, (_, value) in TYPED.items()}
    for name, (_, value) in TYPED.items():
        assert type(sent[name.replace(" ", "_")]) is type(value)
    run = last_run(engine_of(setup))
    assert run.status == "partial"
    for name, (_, message) in UNSENDABLE.items():
        assert f'trait "{name}": user "u1": {message}' in run.error


# SQL safety: keys and values are bound parameters; user queries run as given, on the
# source connection only.

NASTY = [
    "o'brien\"; DROP TABLE acked; --",
    "'); DELETE FROM acked; --",
    "%s %(x)s :x ? $1",
    "\\'; SELECT pg_sleep(10); --",
]


def test_quotes_and_sql_in_ids_and_values_are_data(setup: Setup, engine_of):
    setup.warehouse.members("High Value Users", *NASTY)
    setup.warehouse.trait("Lifetime Value", {user: user for user in NASTY})
    result = sync(setup)
    assert result.exit_code == 0, result.output
    assert wire(setup) == {u: {HV: True, LTV: u} for u in NASTY}
    engine = engine_of(setup)
    with engine.connect() as conn:
        stored = conn.execute(select(acked.c.user_id, acked.c.key, acked.c.value)).all()
        assert len(conn.execute(select(updates)).all()) == len(NASTY)
    assert {(u, k, json.loads(v) if k == LTV else v) for u, k, v in stored} == {
        (u, k, u if k == LTV else "true") for u in NASTY for k in (HV, LTV)
    }
    setup.receiver.clear()
    assert sync(setup).exit_code == 0 and setup.receiver.bodies() == []
    for user in NASTY:
        shown = cli("user", user, "--json", "--config", str(setup.tmp_path / "reconciler.toml"))
        assert shown.exit_code == 0
        assert json.loads(shown.stdout)["acknowledged"][LTV]["value"] == user


@pytest.mark.parametrize(
    "args, status, expected",
    [
        (["user", "x' OR '1'='1", "--json"], 0, '"acknowledged": {}'),
        (["resync", "--audience", "x'; DROP TABLE acked; --"], 2, "unknown key"),
        (["show", "1 OR 1=1"], 2, "'1 OR 1=1' is not a valid integer"),
    ],
    ids=["user", "resync-key", "show"],
)
def test_arguments_are_never_sql(setup: Setup, engine_of, args, status, expected):
    setup.warehouse.members("High Value Users", "u1")
    assert sync(setup).exit_code == 0
    result = cli(*args, "--config", str(setup.tmp_path / "reconciler.toml"))
    assert result.exit_code == status and expected in result.output
    assert len(acked_rows(engine_of(setup), HV)) == 1


def test_user_query_runs_exactly_as_written(setup: Setup):
    """`:name`, `?` and `%` inside a query mean what the source database says."""
    setup.warehouse.members("High Value Users", "u1")
    query = (
        "SELECT user_id FROM members WHERE audience = 'High Value Users' "
        "AND ':name ? %s %' = ':name ? %s %'"
    )
    result = sync(setup, audiences=(), extra=extra_entry("audiences", "Literal", query))
    assert result.exit_code == 0, result.output
    assert wire(setup) == {"u1": {"literal": True}}


def test_user_query_cannot_change_a_sqlite_source(setup: Setup):
    setup.warehouse.members("High Value Users", "u1")
    query = "DELETE FROM members RETURNING user_id"
    result = sync(setup, extra=extra_entry("audiences", "Deleter", query))
    assert result.exit_code == 1
    assert (
        "source database sqlite:///" in result.stderr
        and 'audience "Deleter": query tried to change the source, and source queries '
        "are read-only: attempt to write a readonly database"
        in result.stderr
    )
    setup.receiver.clear()
    assert sync(setup).exit_code == 0
    assert wire(setup) == {"u1": {HV: True}}
