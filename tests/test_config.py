"""Config mistakes (SPEC §3): caught before anything runs, one line naming file, entry
and fix, exit status 2, nothing written, nothing sent."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from reconciler.config import DEFAULT_DATABASE_URL, load_config
from reconciler.errors import ConfigError
from reconciler.state.schema import acked, sync_runs

from .conftest import Setup, Warehouse
from .helpers import assert_one_clean_line, cli
from .receiver import Receiver

BASE = """
    [database]
    url = "{state}"

    [source]
    url = "{source}"

    [destination]
    webhook_url = "{webhook}"
    requests_per_second = 0
    max_concurrency = 4

    [profile]
    query = "SELECT user_id, email FROM users"

    [[audiences]]
    name = "High Value Users"
    query = "SELECT user_id FROM members WHERE audience = 'High Value Users'"

    [[traits]]
    name = "Lifetime Value"
    query = "SELECT user_id, value FROM traits WHERE trait = 'Lifetime Value'"
    """


class Edit:
    """How a case changes the base config: replace one snippet, or append text."""

    def __init__(self, old: str = "", new: str = "", append: str = "") -> None:
        self.old, self.new, self.append = old, new, append

    def __call__(self, text: str) -> str:
        if self.old:
            assert self.old in text, self.old
            text = text.replace(self.old, self.new, 1)
        return text + textwrap.dedent(self.append)


def swap(old: str, new: str) -> Edit:
    return Edit(old, new)


def add(text: str) -> Edit:
    return Edit(append=text)


HV_QUERY = "query = \"SELECT user_id FROM members WHERE audience = 'High Value Users'\""
HV = f'name = "High Value Users"\n{HV_QUERY}'
AUDIENCE = '\n[[audiences]]\nname = "{name}"\nquery = "SELECT user_id FROM members"\n'

# (id, edit of the base text, [fragments the one-line message must contain: entry, problem, fix])
CASES: list[tuple[str, Callable[[str], str], list[str]]] = [
    (
        "toml-syntax",
        swap("max_concurrency = 4", "max_concurrency = = 4"),
        ["TOML syntax", "line 11", "fix the syntax"],
    ),
    (
        "toml-unclosed-string",
        swap('webhook_url = "', 'webhook_url = "x\n'),
        ["TOML syntax", "line 9"],
    ),
    (
        "toml-duplicate-key",
        add("\n[database]\nurl = 'sqlite:///other.db'\n"),
        ["TOML syntax", "line"],
    ),
    (
        "unknown-section",
        add('\n[audience]\nname = "x"\n'),
        ["top level", "unknown section [audience]", 'did you mean "audiences"?'],
    ),
    (
        "unknown-section-array",
        add('\n[[trait]]\nname = "x"\nquery = "q"\n'),
        ["unknown section [trait]", 'did you mean "traits"?'],
    ),
    (
        "unknown-key",
        swap("max_concurrency = 4", "max_concurency = 4"),
        ["[destination]", 'unknown key "max_concurency"', 'did you mean "max_concurrency"?'],
    ),
    (
        "misplaced-key",
        swap("max_concurrency = 4", "interval_minutes = 5"),
        ["[destination]", 'unknown key "interval_minutes"', "it belongs in [schedule]"],
    ),
    (
        "unknown-entry-key",
        swap(HV_QUERY, HV_QUERY.replace("query", "querry")),
        ["[[audiences]] #1", 'unknown key "querry"', 'did you mean "query"?'],
    ),
    (
        "unknown-key-no-match",
        swap("[source]\n", "[source]\nzzz = 1\n"),
        ["[source]", 'unknown key "zzz"', "allowed: url"],
    ),
    (
        "tls-verify-off",
        swap("max_concurrency = 4", "verify = false"),
        ["[destination]", 'unknown key "verify"', "cannot be switched off"],
    ),
    (
        "tls-insecure",
        swap("max_concurrency = 4", "insecure = true"),
        ["[destination]", "cannot be switched off"],
    ),
    (
        "type-string-for-int",
        swap("max_concurrency = 4", 'max_concurrency = "8"'),
        [
            "[destination] max_concurrency",
            "must be a whole number, got a string",
            "max_concurrency = 5",
        ],
    ),
    (
        "type-float-for-int",
        swap("max_concurrency = 4", "max_concurrency = 4.5"),
        ["[destination] max_concurrency", "must be a whole number, got the number 4.5"],
    ),
    (
        "type-bool-for-number",
        swap("requests_per_second = 0", "requests_per_second = true"),
        ["[destination] requests_per_second", "must be a number, got true"],
    ),
    (
        "type-string-for-bool",
        swap("max_concurrency = 4", 'max_concurrency = 4\ncustom_attributes = "yes"'),
        ["[destination] custom_attributes", "must be true or false, got a string"],
    ),
    (
        "type-name",
        swap('name = "High Value Users"', "name = 5"),
        ["[[audiences]] #1 name", "must be a string, got the number 5"],
    ),
    (
        "type-query",
        swap(HV_QUERY, 'query = ["SELECT user_id FROM members"]'),
        ['[[audiences]] "High Value Users" query', "must be a string, got an array"],
    ),
    (
        "type-database-url",
        swap('url = "{state}"', "url = 5"),
        ["[database] url", "must be a string, got the number 5"],
    ),
    (
        "type-section",
        lambda t: 'source = "sqlite:///w.db"\n' + t.replace('[source]\nurl = "{source}"\n', ""),
        ["source", "must be a section, got a string", "[source]"],
    ),
    (
        "type-audiences-table",
        swap("[[audiences]]", "[audiences]"),
        ["audiences", "must be an array of tables", "[[audiences]]"],
    ),
    ("type-cron", add("\n[schedule]\ncron = 5\n"), ["[schedule] cron", "must be a string"]),
    (
        "missing-query",
        swap(HV, 'name = "High Value Users"'),
        ['[[audiences]] "High Value Users"', "has no query", 'add query = "SELECT user_id'],
    ),
    (
        "blank-query",
        swap(HV_QUERY, 'query = "   "'),
        ['[[audiences]] "High Value Users"', "has no query"],
    ),
    (
        "missing-profile-query",
        swap('query = "SELECT user_id, email FROM users"', ""),
        ["[profile]", "has no query"],
    ),
    (
        "missing-name",
        swap('name = "High Value Users"\n', ""),
        ["[[audiences]] #1", "has no name", 'add name = "..."'],
    ),
    (
        "blank-name",
        swap('name = "High Value Users"', 'name = "  "'),
        ["[[audiences]] #1", "has no name"],
    ),
    (
        "interval-and-cron",
        add('\n[schedule]\ninterval_minutes = 60\ncron = "0 * * * *"\n'),
        ["[schedule]", "has both interval_minutes and cron", "keep exactly one"],
    ),
    (
        "schedule-empty",
        add("\n[schedule]\n"),
        ["[schedule]", "has neither interval_minutes nor cron", "interval_minutes = 120"],
    ),
    (
        "cron-value-out-of-range",
        add('\n[schedule]\ncron = "61 * * * *"\n'),
        ["[schedule] cron", '"61 * * * *" is invalid', "five fields"],
    ),
    (
        "cron-field-count",
        add('\n[schedule]\ncron = "*/5 * * *"\n'),
        ["[schedule] cron", "wrong number of fields: 4, expected 5"],
    ),
    (
        "cron-weekday-8",
        add('\n[schedule]\ncron = "0 9 * * 8"\n'),
        ["[schedule] cron", '"8" is not a day of the week'],
    ),
    (
        "cron-words",
        add('\n[schedule]\ncron = "every two hours"\n'),
        ["[schedule] cron", "is invalid"],
    ),
    (
        "interval-negative",
        add("\n[schedule]\ninterval_minutes = -10\n"),
        ["[schedule] interval_minutes", "is -10", "use a value >= 0.001"],
    ),
    (
        "concurrency-zero",
        swap("max_concurrency = 4", "max_concurrency = 0"),
        ["[destination] max_concurrency", "is 0", "between 1 and 20"],
    ),
    (
        "concurrency-21",
        swap("max_concurrency = 4", "max_concurrency = 21"),
        ["[destination] max_concurrency", "is 21", "between 1 and 20"],
    ),
    (
        "rate-negative",
        swap("requests_per_second = 0", "requests_per_second = -1"),
        ["[destination] requests_per_second", "is -1", ">= 0"],
    ),
    (
        "rate-nan",
        swap("requests_per_second = 0", "requests_per_second = nan"),
        ["[destination] requests_per_second", "is nan"],
    ),
    (
        "timeout-negative",
        swap("max_concurrency = 4", "max_concurrency = 4\ntimeout_seconds = -5"),
        ["[destination] timeout_seconds", "is -5"],
    ),
    (
        "timeout-infinite",
        swap("max_concurrency = 4", "max_concurrency = 4\ntimeout_seconds = inf"),
        ["[destination] timeout_seconds", "is inf"],
    ),
    (
        "attempts-zero",
        swap("max_concurrency = 4", "max_concurrency = 4\nmax_attempts = 0"),
        ["[destination] max_attempts", "is 0", ">= 1"],
    ),
    (
        "budget-negative",
        swap("max_concurrency = 4", "max_concurrency = 4\nretry_budget_seconds = -1"),
        ["[destination] retry_budget_seconds", "is -1"],
    ),
    (
        "metrics-port",
        add("\n[daemon]\nmetrics_port = 70000\n"),
        ["[daemon] metrics_port", "is 70000", "between 1 and 65535"],
    ),
    ("keep-days-zero", add("\n[history]\nkeep_days = 0\n"), ["[history] keep_days", "is 0"]),
    (
        "webhook-http-remote",
        swap("{webhook}", "http://hooks.example.com/hook/t0ken-123456"),
        [
            "[destination] webhook_url",
            "http://hooks.example.com/*** uses http",
            "localhost, 127.0.0.0/8 and ::1",
        ],
    ),
    (
        "webhook-http-lookalike",
        swap("{webhook}", "http://127.0.0.1.evil.example/t0ken-123456"),
        ["[destination] webhook_url", "uses http"],
    ),
    (
        "webhook-http-any",
        swap("{webhook}", "http://0.0.0.0/t0ken-123456"),
        ["[destination] webhook_url", "uses http"],
    ),
    (
        "webhook-ftp",
        swap("{webhook}", "ftp://hooks.example.com/t0ken-123456"),
        ["[destination] webhook_url", "ftp://hooks.example.com/*** is not an https URL"],
    ),
    (
        "webhook-no-scheme",
        swap("{webhook}", "hooks.example.com/t0ken-123456"),
        ["[destination] webhook_url", "is not an https URL", "https://"],
    ),
    (
        "webhook-no-host",
        swap("{webhook}", "https:///t0ken-123456"),
        ["[destination] webhook_url", "is not an https URL"],
    ),
    (
        "webhook-bad-port",
        swap("{webhook}", "https://hooks.example.com:99999/t0ken-123456"),
        ["[destination] webhook_url", "is not a valid URL"],
    ),
    (
        "webhook-spaces",
        swap("{webhook}", "https://hooks.example.com/t0ken 123456"),
        ["[destination] webhook_url", "contains spaces"],
    ),
    (
        "webhook-missing",
        swap('webhook_url = "{webhook}"', ""),
        ["[destination] webhook_url", "is missing", "CHARTMOGUL_WEBHOOK_URL"],
    ),
    (
        "destination-missing",
        swap(
            '[destination]\nwebhook_url = "{webhook}"\n'
            "requests_per_second = 0\nmax_concurrency = 4\n",
            "",
        ),
        ["[destination]", "section is missing", "add a [destination] section"],
    ),
    (
        "database-url-garbage",
        swap('url = "{state}"', 'url = "not a url"'),
        ["[database] url", "is not a database URL", "sqlite:///file.db"],
    ),
    (
        "database-url-bad-port",
        swap('url = "{state}"', 'url = "postgresql://u:pw@h:port/db"'),
        ["[database] url", "is not a database URL"],
    ),
    (
        "database-url-memory",
        swap('url = "{state}"', 'url = "sqlite://"'),
        ["[database] url", "in-memory SQLite", "give a file path"],
    ),
    (
        "source-url-unknown-kind",
        swap('url = "{source}"', 'url = "foo://warehouse"'),
        ["[source] url", 'unknown database kind "foo"'],
    ),
    (
        "source-url-driver-missing",
        swap('url = "{source}"', 'url = "mysql://u@host/db"'),
        ["[source] url", 'needs the driver module "MySQLdb"', "SQLAlchemy driver"],
    ),
    (
        "source-url-missing",
        swap('url = "{source}"', ""),
        ["[source] url", "is missing", "RECONCILER_SOURCE_URL"],
    ),
    (
        "key-collision",
        add(AUDIENCE.format(name="high-value users")),
        [
            'audience "High Value Users" and audience "high-value users"',
            'both produce the key "high_value_users"',
            "explicit key",
        ],
    ),
    (
        "key-collision-audience-trait",
        add(AUDIENCE.format(name="LifetimeValue")),
        ['audience "LifetimeValue" and trait "Lifetime Value"', '"lifetime_value"'],
    ),
    (
        "key-collision-explicit",
        add(AUDIENCE.format(name="VIPs") + 'key = "high_value_users"\n'),
        ['"High Value Users"', '"VIPs"', 'both produce the key "high_value_users"'],
    ),
    (
        "key-empty",
        add(AUDIENCE.format(name="!!! ???")),
        ['[[audiences]] "!!! ???"', "name yields an empty key", 'set key = "..."'],
    ),
    (
        "key-empty-non-latin",
        add(AUDIENCE.format(name="日本語")),
        ['[[audiences]] "日本語"', "name yields an empty key"],
    ),
    (
        "key-explicit-bad",
        add(AUDIENCE.format(name="VIPs") + 'key = "VIP Users"\n'),
        ['[[audiences]] "VIPs" key', '"VIP Users" is not a valid key', "a-z, 0-9 and _"],
    ),
    (
        "key-explicit-empty",
        add(AUDIENCE.format(name="VIPs") + 'key = ""\n'),
        ['[[audiences]] "VIPs" key', '"" is not a valid key'],
    ),
    (
        "key-too-long",
        add(AUDIENCE.format(name="x" * 300)),
        ["key is 300 characters long", "at most 255"],
    ),
]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Any]:
    warehouse = Warehouse(tmp_path / "warehouse.db")
    return {
        "state": f"sqlite:///{tmp_path / 'state.db'}",
        "source": warehouse.url,
        "webhook": "https://hooks.example.com/hook/s3cr3t-token",
        "dir": tmp_path,
        "warehouse": warehouse,
    }


def write(
    files: dict[str, Any], edit: Callable[[str], str] = lambda t: t, name: str = "reconciler.toml"
) -> Path:
    text = edit(textwrap.dedent(BASE))
    path: Path = files["dir"] / name
    path.write_text(
        text.replace("{state}", files["state"])
        .replace("{source}", files["source"])
        .replace("{webhook}", files["webhook"]),
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize("edit, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
@pytest.mark.parametrize(
    "command", [["sync"], ["sync", "--dry-run"], ["migrate"]], ids=["sync", "dry-run", "migrate"]
)
def test_config_mistake_is_one_line_exit_2_and_nothing_written(files, edit, expected, command):
    path = write(files, edit)
    line = assert_one_clean_line(cli(*command, "--config", str(path)), 2)
    assert line.startswith(f"reconciler: {path}: ")
    for fragment in expected:
        assert fragment in line
    assert "s3cr3t-token" not in line and "t0ken-123456" not in line
    assert not (files["dir"] / "state.db").exists()


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/x",
        "http://localhost:8080/x",
        "http://LOCALHOST/x",
        "http://127.0.0.1/x",
        "http://127.45.6.7:9/x",
        "http://[::1]:8000/x",
        " https://hooks.example.com/x\t ",
    ],
)
def test_webhook_urls_accepted(files, url):
    files["webhook"] = url
    config = load_config(write(files), env={})
    assert config.destination.webhook_url.reveal() == url.strip()


@pytest.mark.parametrize(
    "cron", ["0 */2 * * *", "0 9 * * 7", "0 9 * * mon-fri", "30 2 1 * 0", "*/15 * * * *"]
)
def test_crontab_expressions_accepted(files, cron):
    path = write(files, add(f'\n[schedule]\ncron = "{cron}"\n'))
    schedule = load_config(path, env={}).schedule
    assert schedule is not None and schedule.cron == cron


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.toml"
    line = assert_one_clean_line(cli("sync", "--config", str(missing)), 2)
    assert line == (
        f"reconciler: {missing}: file: not found; create it, pass --config PATH "
        "or set RECONCILER_CONFIG"
    )


def test_missing_config_file_named_by_environment(tmp_path):
    missing = tmp_path / "from-env.toml"
    line = assert_one_clean_line(cli("history", env={"RECONCILER_CONFIG": str(missing)}), 2)
    assert str(missing) in line and "the path comes from RECONCILER_CONFIG" in line


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_bytes(b"\xff\xfe[database]"), "is not UTF-8 text"),
    ],
    ids=["directory", "not-utf8"],
)
def test_unreadable_config_file(tmp_path, make, expected):
    path = tmp_path / "reconciler.toml"
    make(path)
    line = assert_one_clean_line(cli("sync", "--config", str(path)), 2)
    assert str(path) in line and expected in line


def test_config_path_comes_from_environment(files):
    path = write(files, name="elsewhere.toml")
    result = cli("migrate", env={"RECONCILER_CONFIG": str(path)})
    assert result.exit_code == 0, result.output
    assert (files["dir"] / "state.db").exists()


@pytest.mark.parametrize(
    "variable, value, expected",
    [
        ("RECONCILER_DATABASE_URL", "not a url", "RECONCILER_DATABASE_URL (environment): is not"),
        (
            "RECONCILER_DATABASE_URL",
            "sqlite://",
            "RECONCILER_DATABASE_URL (environment): is an in-memory",
        ),
        ("RECONCILER_SOURCE_URL", "oracle+nodriver://x", "RECONCILER_SOURCE_URL (environment):"),
        (
            "CHARTMOGUL_WEBHOOK_URL",
            "http://hooks.example.com/env-t0ken-99",
            "CHARTMOGUL_WEBHOOK_URL (environment): http://hooks.example.com/*** uses http",
        ),
    ],
    ids=["database", "database-memory", "source", "webhook"],
)
def test_bad_environment_override_is_named_as_such(files, variable, value, expected):
    line = assert_one_clean_line(
        cli("sync", "--config", str(write(files)), env={variable: value}), 2
    )
    assert expected in line and "env-t0ken-99" not in line


def test_environment_overrides_win_over_the_file(tmp_path, receiver: Receiver):
    """RECONCILER_DATABASE_URL, RECONCILER_SOURCE_URL and CHARTMOGUL_WEBHOOK_URL."""
    real = Warehouse(tmp_path / "real.db")
    real.members("High Value Users", "u1")
    files = {
        "state": "sqlite:///ignored.db",
        "source": "sqlite:///ignored-too.db",
        "webhook": "https://hooks.example.com/never-used",
        "dir": tmp_path,
    }
    state = tmp_path / "state-from-env.db"
    result = cli(
        "sync",
        "--config",
        str(write(files)),
        env={
            "RECONCILER_DATABASE_URL": f"sqlite:///{state}",
            "RECONCILER_SOURCE_URL": real.url,
            "CHARTMOGUL_WEBHOOK_URL": receiver.url + "\n",
        },
    )
    assert result.exit_code == 0, result.output
    assert [b["user_id"] for b in receiver.bodies()] == ["u1"]
    assert state.exists() and not (tmp_path / "ignored.db").exists()


def test_webhook_from_environment_needs_no_destination_section(files):
    path = write(
        files,
        swap(
            '[destination]\nwebhook_url = "{webhook}"\n'
            "requests_per_second = 0\nmax_concurrency = 4\n",
            "",
        ),
    )
    env = {"CHARTMOGUL_WEBHOOK_URL": "https://hooks.example.com/x"}
    assert (
        load_config(path, env=env).destination.webhook_url.reveal() == env["CHARTMOGUL_WEBHOOK_URL"]
    )
    with pytest.raises(ConfigError, match=r"\[destination\]: section is missing"):
        load_config(path, env={})


def test_state_database_defaults_to_sqlite_file(files):
    path = write(files, swap('[database]\nurl = "{state}"\n', ""))
    default = DEFAULT_DATABASE_URL.replace("sqlite:///", f"sqlite:///{path.parent}/")
    assert load_config(path, env={}).database_url == default


def test_no_entries_is_allowed(files):
    path = write(files)
    text = path.read_text()
    path.write_text(text[: text.index("[[audiences]]")])
    config = load_config(path, env={})
    assert config.entries == ()


def test_config_error_leaves_existing_state_untouched(setup: Setup, engine_of):
    """A mistake made after runs have happened changes nothing in the state database."""
    setup.warehouse.members("High Value Users", "u1")
    path = setup.write()
    assert cli("sync", "--config", str(path)).exit_code == 0
    engine = engine_of(setup)
    with engine.connect() as conn:
        before = [conn.execute(select(t)).all() for t in (sync_runs, acked)]
    setup.receiver.clear()
    setup.warehouse.members("High Value Users", "u1", "u2")
    path.write_text(path.read_text().replace("max_concurrency = 4", "max_concurrency = 40"))
    assert_one_clean_line(cli("sync", "--config", str(path)), 2)
    with engine.connect() as conn:
        assert [conn.execute(select(t)).all() for t in (sync_runs, acked)] == before
    assert setup.receiver.bodies() == []
