"""`reconciler check` (SPEC §4): every part a sync needs, tried without syncing; one line
per check, `--json`, exit 0 / 1 / 2; nothing written, one POST of `{}`."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest
from click.testing import Result
from sqlalchemy import func, select

from reconciler.state.schema import sync_runs, updates

from .conftest import PG_ADMIN, Setup
from .helpers import cli
from .processes import free_port
from .receiver import Reply

NAMES = [
    "config",
    "state database",
    "source database",
    'audience "Order Completed Last 30 Days"',
    'audience "High Value Users"',
    'trait "Lifetime Value"',
    "[profile]",
    "webhook",
]


def check(path: Path, *args: str) -> Result:
    return cli("check", "--config", str(path), *args)


def lines(result: Result) -> dict[str, str]:
    found = {}
    for line in result.stdout.splitlines():
        name, _, message = line.partition(": ")
        found[name] = message
    return found


@pytest.fixture
def filled(setup: Setup) -> Setup:
    for n in range(20):
        setup.warehouse.user(f"u{n}", email=f"u{n}@example.com")
    setup.warehouse.members("High Value Users", *(f"u{n}" for n in range(20)))
    setup.warehouse.trait("Lifetime Value", {"u1": 10})
    return setup


def test_everything_ok_exits_0_and_writes_nothing(filled: Setup, engine_of):
    result = check(filled.write())
    assert result.exit_code == 0, result.output
    found = lines(result)
    assert list(found) == NAMES
    assert all(message.startswith("ok") for message in found.values()), result.stdout
    assert "20 sample rows" not in result.stdout and "5 sample rows" in found[NAMES[4]]
    assert "the query returns no rows" in found[NAMES[3]]
    assert "columns user_id, anonymous_id, email, first_name" in found["[profile]"]
    assert found["webhook"].startswith(
        f"ok (http://127.0.0.1:{filled.receiver.server.server_port}/*** answered 200"
    )
    assert filled.receiver.bodies() == [{}]
    assert "s3cr3t-token" not in result.output
    with engine_of(filled).connect() as conn:
        assert conn.execute(select(func.count()).select_from(sync_runs)).scalar() == 0
        assert conn.execute(select(func.count()).select_from(updates)).scalar() == 0


def test_json_lists_every_check(filled: Setup):
    result = check(filled.write(), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is True
    assert [c["name"] for c in data["checks"]] == NAMES
    assert all(c["ok"] and c["message"].startswith("ok") for c in data["checks"])


def test_a_failing_query_exits_1_naming_the_entry_and_the_fix(filled: Setup):
    extra = (
        '\n[[traits]]\nname = "Order Total"\nquery = "SELECT user_id, amount FROM t"\n'
        '\n[[audiences]]\nname = "Typo"\nquery = "SELEC user_id FROM members"\n'
    )
    filled.warehouse.execute("CREATE TABLE t (user_id TEXT, amount)")
    result = check(filled.write(extra=extra))
    assert result.exit_code == 1
    found = lines(result)
    assert found['trait "Order Total"'] == (
        "query returned columns (user_id, amount) but needs value; alias it, e.g. "
        "SELECT amount AS value"
    )
    assert found['audience "Typo"'].startswith('query failed: near "SELEC": syntax error (source')
    assert found["webhook"].startswith("ok") and found['trait "Lifetime Value"'].startswith("ok")


def test_unusable_values_fail_the_query_check(filled: Setup):
    filled.warehouse.trait("Lifetime Value", {"u1": b"\x00"})
    found = lines(check(filled.write()))
    assert found['trait "Lifetime Value"'] == (
        'user "u1": binary values cannot be sent; cast it to text or a number in the query'
    )


def test_query_with_a_trailing_semicolon_and_comment_is_checked(filled: Setup):
    extra = (
        '\n[[audiences]]\nname = "Commented"\nquery = """SELECT user_id FROM members;'
        ' -- all of them"""\n'
    )
    found = lines(check(filled.write(extra=extra)))
    assert found['audience "Commented"'].startswith("ok (5 sample rows")


@pytest.mark.parametrize(
    "status, fix",
    [
        (401, "ChartMogul does not accept this URL"),
        (404, "ChartMogul does not accept this URL"),
        (503, "try again in a few minutes"),
        (422, "check the webhook URL"),
    ],
)
def test_a_webhook_that_does_not_accept_exits_1(filled: Setup, status, fix):
    filled.receiver.respond = lambda _n, _b: Reply(status, "")
    result = check(filled.write())
    assert result.exit_code == 1
    message = lines(result)["webhook"]
    port = filled.receiver.server.server_port
    assert message.startswith(f"http://127.0.0.1:{port}/*** answered {status}; ") and fix in message
    assert "s3cr3t-token" not in result.output and len(filled.receiver.bodies()) == 1


def test_a_webhook_nobody_answers(filled: Setup):
    down = f"http://127.0.0.1:{free_port()}/hook/s3cr3t-token"
    result = check(filled.write(webhook_url=down))
    assert result.exit_code == 1
    assert lines(result)["webhook"].startswith(
        f"{down.rsplit('/', 2)[0]}/*** did not answer: connection refused; check the host"
    )
    assert "s3cr3t-token" not in result.output


def test_a_config_error_exits_2_with_one_line(filled: Setup):
    path = filled.write(destination="bogus = 1")
    result = check(path)
    assert result.exit_code == 2
    (line,) = result.stdout.splitlines()
    assert line.startswith(f'config: {path}: [destination]: unknown key "bogus"')
    data = json.loads(check(path, "--json").stdout)
    assert data["ok"] is False and [c["name"] for c in data["checks"]] == ["config"]
    assert filled.receiver.bodies() == []


def test_a_missing_source_file_fails_the_source_and_skips_its_queries(filled: Setup):
    path = filled.write()
    path.write_text(
        path.read_text().replace(filled.warehouse.url, f"sqlite:///{filled.tmp_path / 'typo.db'}")
    )
    result = check(path)
    assert result.exit_code == 1
    found = lines(result)
    assert found["source database"].startswith(
        "unable to open database file; check the path: the file must exist"
    )
    assert found['audience "High Value Users"'] == ("not run: the source database cannot be opened")
    assert found["state database"].startswith("ok") and found["webhook"].startswith("ok")
    assert not (filled.tmp_path / "typo.db").exists()


def test_an_unreachable_state_database_is_one_failed_line(tmp_path, warehouse, receiver):
    url = PG_ADMIN.rsplit(":", 1)[0] + ":1/state"
    setup = Setup(tmp_path, url, warehouse, receiver)
    result = check(setup.write())
    assert result.exit_code == 1
    found = lines(result)
    assert found["state database"].startswith("connection failed: ")
    assert found["state database"].endswith(f"(state database {url})")
    assert found["source database"].startswith("ok") and found["webhook"].startswith("ok")


def test_the_first_check_says_where_it_created_the_state_database(tmp_path, warehouse, receiver):
    setup = Setup(tmp_path, "sqlite:///state/new.db", warehouse, receiver)
    (tmp_path / "state").mkdir()
    first = check(setup.write())
    assert first.exit_code == 0, first.output
    created = tmp_path / "state" / "new.db"
    assert first.stderr == f"reconciler: created state database {created}\n"
    assert "created now" in lines(first)["state database"]
    second = check(setup.write())
    assert second.stderr == "" and "created now" not in lines(second)["state database"]


def test_rows_without_a_user_id_are_counted_as_ignored(filled: Setup):
    filled.warehouse.members("High Value Users", None, "", "u1")  # type: ignore[arg-type]
    found = lines(check(filled.write()))
    assert found['audience "High Value Users"'].startswith(
        "ok (1 sample row and 2 without a user_id (ignored)"
    )


def test_queries_on_a_postgresql_source_run_read_only(filled: Setup, pg_url):
    with psycopg.connect(pg_url.replace("+psycopg", "")) as conn:
        conn.execute("CREATE TABLE members (user_id text)")
        conn.execute("INSERT INTO members VALUES ('u1'), ('u2')")
        conn.execute("CREATE SEQUENCE bumps")
    path = filled.tmp_path / "pg-source.toml"
    path.write_text(f"""
[database]
url = "{filled.state_url}"

[source]
url = "{pg_url}"

[destination]
webhook_url = "{filled.receiver.url}"

[[audiences]]
name = "Bumper"
query = "SELECT user_id, nextval('bumps') FROM members"
""")
    result = check(path)
    found = lines(result)
    assert found["source database"].startswith("ok (postgresql+psycopg://")
    assert found['audience "Bumper"'].startswith(
        "query tried to change the source, and source queries are read-only: "
        "cannot execute nextval() in a read-only transaction"
    )
    with psycopg.connect(pg_url.replace("+psycopg", "")) as conn:
        assert conn.execute("SELECT last_value, is_called FROM bumps").fetchone() == (1, False)


def test_the_webhook_check_follows_307_as_the_sender_does(filled: Setup):
    filled.receiver.respond = lambda n, _b: (
        Reply(307, headers={"Location": "/hook/moved-token-1234"}) if n == 1 else Reply(200)
    )
    result = check(filled.write())
    assert result.exit_code == 0, result.output
    assert lines(result)["webhook"].endswith("answered 200 to a POST of {} after 1 redirect)")
    assert [r.path for r in filled.receiver.requests] == [
        "/hook/s3cr3t-token",
        "/hook/moved-token-1234",
    ]
    assert filled.receiver.bodies() == [{}, {}] and "moved-token" not in result.output


@pytest.mark.parametrize(
    "status, location, expected",
    [
        (
            302,
            "https://elsewhere.example/new-token-5678",
            'answered 302 "ok"; paste the webhook URL from ChartMogul again; it redirects to '
            "https://elsewhere.example/***",
        ),
        (
            307,
            "http://elsewhere.example/new-token-5678",
            "redirects to a URL that is neither https nor on a loopback host; paste the webhook "
            "URL from ChartMogul again; it redirects to http://elsewhere.example/***",
        ),
    ],
)
def test_a_webhook_redirecting_where_the_sender_would_not_go_fails(
    filled: Setup, status, location, expected
):
    filled.receiver.respond = lambda _n, _b: Reply(status, headers={"Location": location})
    result = check(filled.write())
    assert result.exit_code == 1
    assert expected in lines(result)["webhook"] and "new-token" not in result.output


ACCOUNTS = """
[accounts]
query = "SELECT group_id, user_id, name FROM companies"

[[account_audiences]]
name = "Enterprise Accounts"
query = "SELECT group_id FROM companies WHERE seats >= 100"

[[account_traits]]
name = "Seats"
query = "SELECT group_id, seats AS value FROM companies"
"""


def test_account_queries_are_checked_with_their_group_id_columns(filled: Setup):
    filled.warehouse.execute("CREATE TABLE companies (group_id, user_id, name, seats)")
    filled.warehouse.execute("INSERT INTO companies VALUES ('g1', 'u1', 'Acme', 120)")
    result = check(filled.write(extra=ACCOUNTS))
    found = lines(result)
    assert result.exit_code == 0, result.output
    assert found["[accounts]"] == "ok (1 sample row; columns group_id, user_id, name)"
    assert found['account audience "Enterprise Accounts"'].startswith("ok (1 sample row")
    assert found['account trait "Seats"'] == "ok (1 sample row; columns group_id, value)"


def test_an_accounts_query_without_group_id_fails_its_check(filled: Setup):
    filled.warehouse.execute("CREATE TABLE companies (id, user_id, name, seats)")
    result = check(
        filled.write(
            extra=ACCOUNTS.replace("SELECT group_id, user_id, name", "SELECT id, user_id, name")
        )
    )
    assert result.exit_code == 1
    assert "group_id" in lines(result)["[accounts]"]
