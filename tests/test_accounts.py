"""Accounts (SPEC §9): Send Customer beside Send Contact, through the real command line
and a loopback receiver, on both state backends."""

from __future__ import annotations

import json
import textwrap
from typing import Any

import pytest
from click.testing import Result
from sqlalchemy import Engine, select

from reconciler.state.schema import ack_versions, acked, changes, sync_runs, updates

from .conftest import Setup, Warehouse
from .helpers import cli
from .receiver import Reply

EA = "enterprise_accounts"
SEATS = "seats"
HV = "high_value_users"
ACCOUNT_COLUMNS = (
    "group_id",
    "user_id",
    "name",
    "description",
    "email",
    "website",
    "created_at",
    "street",
    "city",
    "state",
    "postal_code",
    "country",
)

ACCOUNTS = """
[accounts]
query = '''SELECT group_id, user_id, name, description, email, website, created_at, street,
           city, state, postal_code, country FROM companies'''

[[account_audiences]]
name = "Enterprise Accounts"
query = "SELECT group_id FROM account_members WHERE audience = 'Enterprise Accounts'"

[[account_traits]]
name = "Seats"
query = "SELECT group_id, value FROM account_traits WHERE trait = 'Seats'"
"""


def add_account_tables(w: Warehouse) -> None:
    w.execute(f"CREATE TABLE companies ({', '.join(ACCOUNT_COLUMNS)})")
    w.execute("CREATE TABLE account_members (audience TEXT, group_id)")
    w.execute("CREATE TABLE account_traits (trait TEXT, group_id, value)")


def company(w: Warehouse, group_id: Any, user_id: Any, **fields: Any) -> None:
    columns = ["group_id", "user_id", *fields]
    w.execute(
        f"INSERT INTO companies ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})",
        group_id,
        user_id,
        *fields.values(),
    )


def account_members(w: Warehouse, *group_ids: Any) -> None:
    w.execute("DELETE FROM account_members")
    w.executemany(
        "INSERT INTO account_members VALUES (?, ?)", [("Enterprise Accounts", g) for g in group_ids]
    )


def seats(w: Warehouse, values: dict[Any, Any]) -> None:
    w.execute("DELETE FROM account_traits")
    w.executemany(
        "INSERT INTO account_traits VALUES (?, ?, ?)", [("Seats", g, v) for g, v in values.items()]
    )


def sync(setup: Setup, *args: str, extra: str = ACCOUNTS, **config: Any) -> Result:
    return cli("sync", "--config", str(setup.write(extra=extra, **config)), *args)


def command(setup: Setup, *args: str) -> Result:
    return cli(*args, "--config", str(setup.tmp_path / "reconciler.toml"))


def customers(setup: Setup) -> dict[str, dict[str, Any]]:
    """group_id → the one Send Customer body each account got."""
    bodies = [b for b in setup.receiver.bodies() if b["type"] == "Send Customer"]
    got = {b["group_id"]: b for b in bodies}
    assert len(got) == len(bodies), "an account received two bodies"
    return got


def contacts(setup: Setup) -> dict[str, dict[str, Any]]:
    bodies = [b for b in setup.receiver.bodies() if b["type"] == "Send Contact"]
    got = {b["user_id"]: b for b in bodies}
    assert len(got) == len(bodies), "a user received two bodies"
    return got


def custom(body: dict[str, Any]) -> dict[str, Any]:
    return {item["key"]: item["value"] for item in body.get("custom", [])}


def last_run(engine: Engine) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(sync_runs).order_by(sync_runs.c.id.desc())).first()


@pytest.fixture
def accounts(setup: Setup) -> Setup:
    """Two accounts: g1 (two rows, full fields, enterprise, 120 seats) and g2 (bare)."""
    w = setup.warehouse
    add_account_tables(w)
    company(
        w,
        "g1",
        "u2",
        name="Acme",
        description="Rockets",
        email="ops@acme.com",
        website="https://acme.example",
        created_at="2024-03-01 10:00:00",
        street="1 Main St",
        city="Paris",
        postal_code=75001,
        country="FR",
    )
    company(
        w,
        "g1",
        "u10",
        name="Acme",
        description="Rockets",
        email="ops@acme.com",
        website="https://acme.example",
        created_at="2024-03-01 10:00:00",
        street="1 Main St",
        city="Paris",
        postal_code=75001,
        country="FR",
    )
    company(w, "g2", "u3")
    account_members(w, "g1")
    seats(w, {"g1": 120})
    return setup


@pytest.fixture
def synced(accounts: Setup, engine_of) -> tuple[Setup, Engine]:
    """`accounts` after a first acknowledged sync; the receiver is cleared."""
    assert sync(accounts).exit_code == 0
    accounts.receiver.clear()
    return accounts, engine_of(accounts)


def test_first_sync_sends_every_account_with_its_fields(accounts, engine_of):
    result = sync(accounts)
    assert result.exit_code == 0, result.output
    got = customers(accounts)
    assert set(got) == {"g1", "g2"}
    g1 = got["g1"]
    assert list(g1) == [
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
    assert {k: v for k, v in g1.items() if k not in ("message_id", "timestamp", "sent_at")} == {
        "type": "Send Customer",
        "user_id": "u10",
        "group_id": "g1",
        "name": "Acme",
        "description": "Rockets",
        "email": "ops@acme.com",
        "website": "https://acme.example",
        "created_at": "2024-03-01T10:00:00.000Z",
        "address": {
            "street": "1 Main St",
            "city": "Paris",
            "postal_code": "75001",
            "country": "FR",
        },
        "custom": [{"key": EA, "value": True}, {"key": SEATS, "value": 120}],
    }
    assert list(got["g2"]) == ["type", "message_id", "timestamp", "user_id", "group_id", "sent_at"]
    assert got["g2"]["user_id"] == "u3"
    run = last_run(engine_of(accounts))
    assert (run.accounts_seen, run.accounts_changed, run.users_changed) == (2, 2, 0)
    assert (run.entered, run.traits_changed, run.sent, run.status) == (1, 1, 2, "succeeded")
    assert "2 accounts seen, 2 changed" in result.stdout


def test_no_change_sends_nothing(synced):
    setup, engine = synced
    assert sync(setup).exit_code == 0
    assert setup.receiver.bodies() == []
    run = last_run(engine)
    assert (run.accounts_seen, run.accounts_changed, run.sent) == (2, 0, 0)


def test_a_field_change_sends_one_send_customer_with_all_fields(synced):
    setup, _ = synced
    setup.warehouse.execute("UPDATE companies SET city = 'Lyon' WHERE group_id = 'g1'")
    assert sync(setup).exit_code == 0
    (body,) = setup.receiver.bodies()
    assert body["group_id"] == "g1" and "custom" not in body
    assert body["address"] == {
        "street": "1 Main St",
        "city": "Lyon",
        "postal_code": "75001",
        "country": "FR",
    }
    assert (body["name"], body["email"], body["user_id"]) == ("Acme", "ops@acme.com", "u10")


def test_a_field_that_becomes_empty_is_not_a_change_by_itself(synced):
    setup, _ = synced
    setup.warehouse.execute("UPDATE companies SET description = NULL, street = ''")
    assert sync(setup).exit_code == 0
    assert setup.receiver.bodies() == []
    setup.warehouse.execute("UPDATE companies SET name = 'Acme Inc' WHERE group_id = 'g1'")
    assert sync(setup).exit_code == 0
    (body,) = setup.receiver.bodies()
    assert body["name"] == "Acme Inc" and "description" not in body
    assert "street" not in body["address"]


def test_an_account_leaving_an_audience_gets_false(synced):
    setup, engine = synced
    account_members(setup.warehouse)
    assert sync(setup).exit_code == 0
    (body,) = setup.receiver.bodies()
    assert body["group_id"] == "g1" and custom(body) == {EA: False}
    assert body["name"] == "Acme"  # every body carries all current fields
    assert last_run(engine).exited == 1


def test_an_account_trait_change_is_sent_and_counted(synced):
    setup, engine = synced
    seats(setup.warehouse, {"g1": 150, "g2": 5})
    assert sync(setup).exit_code == 0
    assert {g: custom(b) for g, b in customers(setup).items()} == {
        "g1": {SEATS: 150},
        "g2": {SEATS: 5},
    }
    run = last_run(engine)
    assert (run.traits_changed, run.accounts_changed, run.sent) == (2, 2, 2)


@pytest.fixture
def mixed(accounts: Setup) -> Setup:
    """Accounts and users changing in the same run."""
    for user in ("u1", "u2", "u3", "u4"):
        accounts.warehouse.user(user, email=f"{user}@example.com", company_id="g1")
    accounts.warehouse.members("High Value Users", "u1", "u2", "u3", "u4")
    return accounts


def test_customers_are_sent_before_the_contacts_of_the_same_run(mixed, engine_of):
    assert sync(mixed).exit_code == 0
    kinds = [b["type"] for b in mixed.receiver.bodies()]
    assert kinds == ["Send Customer"] * 2 + ["Send Contact"] * 4
    with engine_of(mixed).connect() as conn:
        ids = dict(
            conn.execute(select(updates.c.entity, updates.c.id).order_by(updates.c.id)).all()
        )
        first_contact = (
            conn.execute(
                select(updates.c.id).where(updates.c.entity == "contact").order_by(updates.c.id)
            )
            .scalars()
            .first()
        )
    assert ids["customer"] < first_contact  # planned first too


def test_pending_contacts_of_an_earlier_run_wait_for_this_runs_customers(mixed, engine_of):
    mixed.receiver.respond = lambda _n, body: Reply(
        503 if body.get("user_id") == "u4" and body["type"] == "Send Contact" else 200
    )
    assert sync(mixed, destination="max_attempts = 1").exit_code == 1
    mixed.receiver.respond = lambda _n, body: Reply(200)
    mixed.receiver.clear()
    seats(mixed.warehouse, {"g1": 120, "g2": 9})
    assert sync(mixed).exit_code == 0
    assert [(b["type"], b.get("group_id") or b["user_id"]) for b in mixed.receiver.bodies()] == [
        ("Send Customer", "g2"),
        ("Send Contact", "u4"),
    ]
    with engine_of(mixed).connect() as conn:
        pending_contact = conn.execute(
            select(updates.c.id).where(updates.c.user_id == "u4", updates.c.entity == "contact")
        ).scalar_one()
        new_customer = (
            conn.execute(
                select(updates.c.id)
                .where(updates.c.user_id == "g2", updates.c.status == "sent")
                .order_by(updates.c.id.desc())
            )
            .scalars()
            .first()
        )
    assert pending_contact < new_customer  # an older id, and still sent after it


def test_a_pending_customer_is_resent_with_its_id(synced):
    setup, _ = synced
    seats(setup.warehouse, {"g1": 121})
    setup.receiver.respond = lambda _n, body: Reply(503)
    assert sync(setup, destination="max_attempts = 1").exit_code == 1
    (first,) = setup.receiver.bodies()
    setup.receiver.respond = lambda _n, body: Reply(200)
    setup.receiver.clear()
    assert sync(setup).exit_code == 0
    (again,) = setup.receiver.bodies()
    assert (again["message_id"], again["timestamp"]) == (first["message_id"], first["timestamp"])


def test_a_rejected_customer_waits_for_a_change(synced):
    setup, engine = synced
    seats(setup.warehouse, {"g1": 121})
    setup.receiver.respond = lambda _n, body: Reply(422, "no such customer")
    assert sync(setup).exit_code == 1
    with engine.connect() as conn:
        rejected = conn.execute(select(updates).where(updates.c.status == "rejected")).one()
    assert (rejected.entity, rejected.user_id, rejected.last_status_code) == ("customer", "g1", 422)
    setup.receiver.respond = lambda _n, body: Reply(200)
    setup.receiver.clear()
    assert sync(setup).exit_code == 0 and setup.receiver.bodies() == []
    seats(setup.warehouse, {"g1": 122})
    assert sync(setup).exit_code == 0
    assert [custom(b) for b in setup.receiver.bodies()] == [{SEATS: 122}]


def test_an_account_without_a_user_id_is_skipped_and_settled(accounts, engine_of):
    account_members(accounts.warehouse, "g1", "g3", "g4")  # g3: no companies row
    company(accounts.warehouse, "g4", None, name="Orphan")  # g4: no user_id
    result = sync(accounts)
    assert result.exit_code == 0, result.output
    assert set(customers(accounts)) == {"g1", "g2"}
    engine = engine_of(accounts)
    with engine.connect() as conn:
        skipped = conn.execute(
            select(updates.c.user_id, updates.c.note)
            .where(updates.c.status == "skipped")
            .order_by(updates.c.user_id)
        ).all()
        settled = (
            conn.execute(
                select(acked.c.user_id).where(acked.c.entity == "customer", acked.c.key == EA)
            )
            .scalars()
            .all()
        )
    assert [u for u, _ in skipped] == ["g3", "g4"]
    assert all(note.startswith("no user_id") for _, note in skipped)
    assert sorted(settled) == ["g1", "g3", "g4"]
    assert last_run(engine).skipped == 2
    accounts.receiver.clear()
    assert sync(accounts).exit_code == 0 and accounts.receiver.bodies() == []


def test_a_user_and_an_account_with_the_same_id_never_share_state_or_ids(accounts, engine_of):
    company(accounts.warehouse, "42", "u42", name="Forty-Two Ltd")
    accounts.warehouse.user("42", email="someone@example.com")
    accounts.warehouse.members("High Value Users", "42")
    assert sync(accounts).exit_code == 0
    (user,) = contacts(accounts).values()
    account = customers(accounts)["42"]
    assert user["user_id"] == "42" and account["group_id"] == "42"
    assert user["message_id"] != account["message_id"]
    engine = engine_of(accounts)
    with engine.connect() as conn:
        versions = conn.execute(
            select(ack_versions.c.entity, ack_versions.c.version)
            .where(ack_versions.c.user_id == "42")
            .order_by(ack_versions.c.entity)
        ).all()
    assert [tuple(v) for v in versions] == [("contact", 1), ("customer", 1)]
    shown = json.loads(command(accounts, "user", "42", "--json").stdout)
    assert set(shown["acknowledged"]) == {HV}
    accounts.receiver.clear()
    assert sync(accounts).exit_code == 0 and accounts.receiver.bodies() == []


def test_account_json_shows_the_acknowledged_state_and_timeline(synced):
    setup, _ = synced
    account_members(setup.warehouse)
    assert sync(setup).exit_code == 0
    result = command(setup, "account", "g1", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["group_id"] == "g1" and "user_id" not in data
    acknowledged = {k: v["value"] for k, v in data["acknowledged"].items()}
    assert acknowledged[EA] is False and acknowledged[SEATS] == 120
    assert acknowledged["@name"] == "Acme" and acknowledged["@postal_code"] == "75001"
    assert acknowledged["@group_id"] == "g1"
    assert [u["status"] for u in data["timeline"]] == ["sent", "sent"]
    assert [c["new_value"] for c in data["timeline"][1]["changes"]] == [False]
    assert data["timeline"][1]["deliveries"][0]["status_code"] == 200
    terminal = command(setup, "account", "g1")
    assert terminal.exit_code == 0 and 'account "g1": acknowledged state' in terminal.stdout
    nothing = command(setup, "account", "nope")
    assert 'nothing recorded for account "nope"' in nothing.stdout


def test_show_names_the_kind_of_every_change_and_delivery(mixed, engine_of):
    assert sync(mixed).exit_code == 0
    run = json.loads(command(mixed, "show", "1", "--json").stdout)
    assert {(c["entity"], c["user_id"]) for c in run["changes"] if c["key"] in (EA, HV)} == {
        ("customer", "g1"),
        *(("contact", u) for u in ("u1", "u2", "u3", "u4")),
    }
    assert {d["entity"] for d in run["deliveries"]} == {"contact", "customer"}
    terminal = command(mixed, "show", "1")
    assert "customer" in terminal.stdout and "contact" in terminal.stdout
    with engine_of(mixed).connect() as conn:
        kinds = set(
            conn.execute(
                select(changes.c.entity, updates.c.entity).join(
                    updates, updates.c.id == changes.c.update_id
                )
            ).all()
        )
    assert kinds == {("contact", "contact"), ("customer", "customer")}


def test_history_counts_both_kinds(mixed):
    assert sync(mixed).exit_code == 0
    (run,) = json.loads(command(mixed, "history", "--json").stdout)
    assert (run["users_changed"], run["accounts_changed"], run["accounts_seen"]) == (4, 2, 2)
    assert (run["entered"], run["sent"]) == (5, 6)


def test_resync_of_an_account_key(synced):
    setup, _ = synced
    first = command(setup, "resync", "--audience", EA)
    assert first.exit_code == 0, first.output
    (body,) = setup.receiver.bodies()
    assert body["group_id"] == "g1" and custom(body) == {EA: True} and body["name"] == "Acme"
    setup.receiver.clear()
    assert command(setup, "resync").exit_code == 0
    assert {g: custom(b) for g, b in customers(setup).items()} == {
        "g1": {EA: True, SEATS: 120},
        "g2": {},
    }
    setup.receiver.clear()
    assert sync(setup).exit_code == 0 and setup.receiver.bodies() == []


def test_dry_run_counts_accounts_and_keeps_nothing(accounts, engine_of):
    engine = engine_of(accounts)
    result = sync(accounts, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["accounts_seen"], report["accounts_changed"], report["skipped"]) == (2, 2, 0)
    assert {s["body"]["group_id"] for s in report["sample"]} == {"g1", "g2"}
    assert accounts.receiver.bodies() == []
    with engine.connect() as conn:
        assert conn.execute(select(updates)).all() == []
        assert conn.execute(select(acked)).all() == []


# Config errors: exit 2, one line naming the entry and the fix, nothing written.


def config_error(setup: Setup, extra: str) -> str:
    result = cli("sync", "--config", str(setup.write(extra=extra)))
    assert result.exit_code == 2, result.output
    assert setup.receiver.bodies() == []
    assert not (setup.tmp_path / "state.db").exists()
    return result.stderr


def test_account_entries_need_an_accounts_section(accounts):
    error = config_error(accounts, ACCOUNTS[ACCOUNTS.index("[[account_audiences]]") :])
    assert '[[account_audiences]] "Enterprise Accounts"' in error
    assert "needs an [accounts] section" in error and "SELECT group_id, user_id" in error


def test_a_key_collision_across_kinds_names_both_entries(accounts):
    extra = ACCOUNTS.replace('name = "Seats"', 'name = "High Value Users"')
    error = config_error(accounts, extra)
    assert 'audience "High Value Users" and account trait "High Value Users"' in error
    assert 'both produce the key "high_value_users"' in error


def test_an_accounts_query_without_group_id_fails_the_run(accounts, engine_of):
    extra = ACCOUNTS.replace("SELECT group_id, user_id,", "SELECT user_id,")
    result = sync(accounts, extra=extra)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "[accounts]: query returned columns" in result.stderr
    assert "needs group_id" in result.stderr
    assert accounts.receiver.bodies() == []
    assert last_run(engine_of(accounts)).status == "failed"


def test_an_account_audience_without_group_id_fails_that_entry(synced):
    setup, engine = synced
    seats(setup.warehouse, {"g1": 7})
    extra = ACCOUNTS.replace(
        "SELECT group_id FROM account_members", "SELECT group_id AS gid FROM account_members"
    )
    result = sync(setup, extra=extra)
    assert result.exit_code == 1
    assert (
        'account audience "Enterprise Accounts": query returned columns (gid) but needs group_id'
    ) in result.output
    assert [custom(b) for b in setup.receiver.bodies()] == [{SEATS: 7}]
    assert last_run(engine).status == "partial"


# [profile] send_changes


def test_contact_field_change_alone_sends_nothing_by_default(mixed):
    assert sync(mixed).exit_code == 0
    mixed.receiver.clear()
    mixed.warehouse.execute("UPDATE users SET email = 'new@example.com' WHERE user_id = 'u1'")
    assert sync(mixed).exit_code == 0 and mixed.receiver.bodies() == []


SEND_CHANGES = "query = '''SELECT user_id, email,"


def with_send_changes(setup: Setup) -> None:
    text = setup.config_text(extra=ACCOUNTS)
    start = text.index("[profile]")
    text = text[:start] + "[profile]\nsend_changes = true\n" + text[start + len("[profile]\n") :]
    (setup.tmp_path / "reconciler.toml").write_text(text)


def test_send_changes_sends_a_contact_field_change_alone(mixed, engine_of):
    with_send_changes(mixed)
    mixed.warehouse.user("u9", email="nine@example.com")  # in no audience
    assert command(mixed, "sync").exit_code == 0
    assert set(contacts(mixed)) == {"u1", "u2", "u3", "u4", "u9"}
    assert custom(contacts(mixed)["u9"]) == {}
    mixed.receiver.clear()
    assert command(mixed, "sync").exit_code == 0 and mixed.receiver.bodies() == []
    mixed.warehouse.execute(
        "UPDATE users SET email = 'new@example.com', first_name = 'Ann' WHERE user_id = 'u1'"
    )
    assert command(mixed, "sync").exit_code == 0
    (body,) = mixed.receiver.bodies()
    assert body["user_id"] == "u1" and "custom" not in body
    assert (body["email"], body["first_name"], body["company"]) == (
        "new@example.com",
        "Ann",
        {"id": "g1"},
    )
    run = last_run(engine_of(mixed))
    assert (run.users_changed, run.entered, run.traits_changed) == (1, 0, 0)
    mixed.receiver.clear()
    mixed.warehouse.execute("UPDATE users SET first_name = NULL WHERE user_id = 'u1'")
    assert command(mixed, "sync").exit_code == 0 and mixed.receiver.bodies() == []


def test_send_changes_keeps_audience_updates_as_they_are(mixed):
    with_send_changes(mixed)
    assert command(mixed, "sync").exit_code == 0
    mixed.receiver.clear()
    mixed.warehouse.members("High Value Users", "u1", "u2", "u3")
    assert command(mixed, "sync").exit_code == 0
    (body,) = mixed.receiver.bodies()
    assert body["user_id"] == "u4" and custom(body) == {HV: False}


# Bad source rows for accounts: the same treatment as for users.


def test_null_and_blank_group_ids_are_ignored_and_counted(accounts, engine_of):
    company(accounts.warehouse, None, "u5", name="No Id")
    company(accounts.warehouse, "  ", "u6")
    account_members(accounts.warehouse, "g1", None, "")
    seats(accounts.warehouse, {"g1": 120, None: 3, "": 4})
    result = sync(accounts)
    assert result.exit_code == 0, result.output
    assert set(customers(accounts)) == {"g1", "g2"}
    assert last_run(engine_of(accounts)).rows_ignored == 6
    assert "ignored 6 rows without user_id (or group_id)" in result.stdout


def test_two_values_of_one_account_trait_fail_that_entry_naming_one_account(synced):
    setup, engine = synced
    setup.warehouse.executemany(
        "INSERT INTO account_traits VALUES (?, ?, ?)", [("Seats", "g2", 1), ("Seats", "g2", 2)]
    )
    account_members(setup.warehouse, "g1", "g2")
    result = sync(setup)
    assert result.exit_code == 1
    assert (
        'account trait "Seats": account "g2" has two different values' in result.output
        and "GROUP BY group_id" in result.output
    )
    assert {g: custom(b) for g, b in customers(setup).items()} == {"g2": {EA: True}}
    with engine.connect() as conn:
        assert conn.execute(
            select(acked.c.user_id, acked.c.value).where(acked.c.key == SEATS)
        ).all() == [("g1", "120")]


@pytest.mark.parametrize(
    "change, message, status, sent",
    [
        (
            lambda w: seats(w, {"g1": b"\x00", "g2": 3}),
            'account trait "Seats": account "g1": binary values cannot be sent',
            1,
            {},
        ),
        (
            lambda w: seats(w, {"g1": float("inf")}),
            'account trait "Seats": account "g1": inf is not a finite number',
            1,
            {},
        ),
        (
            lambda w: account_members(w, "g1", b"\x01"),
            'account audience "Enterprise Accounts": group_id is binary',
            1,
            {},
        ),
        (
            lambda w: account_members(w, "g1", "g" * 300),
            'account audience "Enterprise Accounts": group_id "ggg',
            1,
            {},
        ),
    ],
    ids=["binary-trait", "infinite-trait", "binary-group-id", "long-group-id"],
)
def test_unrepresentable_account_values_fail_their_entry(synced, change, message, status, sent):
    setup, engine = synced
    change(setup.warehouse)
    result = sync(setup)
    assert result.exit_code == status and "Traceback" not in result.output
    assert message in result.output
    assert {g: custom(b) for g, b in customers(setup).items()} == sent
    assert last_run(engine).status == "partial"


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda w: company(w, "g3", "u1", name=b"\xff"),
            '[accounts]: account "g3": name: binary values cannot be sent',
        ),
        (lambda w: company(w, "g3", b"\x01"), '[accounts]: account "g3": user_id is binary'),
    ],
    ids=["binary-field", "binary-user-id"],
)
def test_an_unusable_accounts_row_fails_the_run(synced, change, message):
    """Without the accounts query no account body can be built right: nothing is sent."""
    setup, engine = synced
    change(setup.warehouse)
    seats(setup.warehouse, {"g1": 1})
    result = sync(setup)
    assert result.exit_code == 1 and message in result.stderr
    assert setup.receiver.bodies() == []
    assert last_run(engine).status == "failed"


def test_account_field_values_are_sent_as_text(accounts, engine_of):
    company(
        accounts.warehouse,
        "g5",
        77,
        name=12,
        postal_code=1000.0,
        state=2.5,
        created_at="not a date",
        website="https://x.example/a b",
    )
    assert sync(accounts).exit_code == 0
    body = customers(accounts)["g5"]
    assert (body["user_id"], body["name"]) == ("77", "12")
    assert body["address"] == {"postal_code": "1000", "state": "2.5"}
    assert "created_at" not in body and "website" not in body
    with engine_of(accounts).connect() as conn:
        note = conn.execute(select(updates.c.note).where(updates.c.user_id == "g5")).scalar()
    assert "created_at is not a date or time" in note and "website" in note


def test_metrics_count_updates_by_kind(mixed, engine_of):
    from reconciler.config import load_config
    from reconciler.ops.metrics import Metrics
    from reconciler.run import sync as run_sync

    engine = engine_of(mixed)
    result = run_sync(load_config(mixed.write(extra=ACCOUNTS), env={}), engine)
    metrics = Metrics()
    metrics.run_finished(result, 1.0, 0.0)
    sample = metrics.registry.get_sample_value
    assert sample("reconciler_updates_total", {"outcome": "sent", "kind": "customer"}) == 2
    assert sample("reconciler_updates_total", {"outcome": "sent", "kind": "contact"}) == 4
    assert sample("reconciler_snapshot_accounts") == 2


def test_existing_rows_become_contacts_on_upgrade(state_url):
    """A database from before accounts: its acknowledged state stays the users'."""
    from alembic import command as alembic

    from reconciler.state.db import alembic_config, migrate, state_engine

    engine = state_engine(state_url)
    config = alembic_config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        alembic.upgrade(config, "0002")
        conn.exec_driver_sql(
            textwrap.dedent("""
            INSERT INTO acked (user_id, key, value, update_id, acked_at)
            VALUES ('u1', 'high_value_users', 'true', 1, '2026-01-01 00:00:00')""")
        )
        conn.exec_driver_sql("INSERT INTO ack_versions (user_id, version) VALUES ('u1', 3)")
    migrate(engine)
    with engine.connect() as conn:
        assert conn.execute(select(acked.c.entity, acked.c.user_id)).all() == [("contact", "u1")]
        assert conn.execute(select(ack_versions.c.entity, ack_versions.c.version)).all() == [
            ("contact", 3)
        ]
    engine.dispose()


@pytest.mark.parametrize(
    "reply, resent",
    [(Reply(503), []), (Reply(500), [{EA: True}])],
    ids=["turned-away", "maybe-applied"],
)
def test_a_superseded_customer_update_that_may_have_arrived_is_corrected(synced, reply, resent):
    """As for contacts (SPEC §6): only an update that may have reached ChartMogul makes
    the current value go out again when the state returns to the acknowledged one."""
    setup, _ = synced
    account_members(setup.warehouse)
    setup.receiver.respond = lambda _n, body: reply
    assert sync(setup, destination="max_attempts = 1").exit_code == 1
    setup.receiver.respond = lambda _n, body: Reply(200)
    setup.receiver.clear()
    account_members(setup.warehouse, "g1")
    assert sync(setup).exit_code == 0
    assert [custom(b) for b in setup.receiver.bodies()] == resent
    assert all(b["type"] == "Send Customer" for b in setup.receiver.bodies())
