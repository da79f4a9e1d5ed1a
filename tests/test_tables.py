"""Terminal tables never cut a number or an id (issue 13): `history`, `show` and `user`
rendered at fixed widths, through the command (`COLUMNS`) and through rich's Console."""

from __future__ import annotations

import io
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from rich.console import Console
from sqlalchemy import insert

from reconciler import views
from reconciler.state.schema import sync_runs
from reconciler.tables import NUMBER, TEXT, Column, print_table
from reconciler.views import error_gist

from .conftest import Setup
from .helpers import cli
from .receiver import Reply

WIDTHS = [60, 80, 100, 120, 160, 200]
COUNTS = list(views.RUN_COUNTS)
LONG_ERROR = (
    "source database postgresql://analytics@warehouse.internal/prod: audience "
    '"High Value Users": query failed: relation "userz" does not exist; LINE 1: '
    "SELECT user_id FROM userz WHERE plan = 'enterprise' AND seats >= 100 AND "
    "region IN ('emea', 'amer', 'apac') ^ HINT: perhaps you meant users"
)
# the longest fits the narrowest width on a line of its own
USERS = ["u-1", "customer-000000000000123456789", "acct-" + "x" * 40 + "-9876543210"]


def tokens(text: str) -> Counter[str]:
    """The words of the output, quotes and separators around them removed."""
    return Counter(word.strip('"{}[],:;()') for word in text.split())


def assert_fits(text: str, width: int) -> None:
    assert "…" not in text, text
    too_long = [line for line in text.splitlines() if len(line) > width]
    assert too_long == [], "\n".join(too_long)


def assert_all_whole(text: str, expected: Counter[str]) -> None:
    """Each expected word appears, whole, at least as often as expected."""
    seen = tokens(text)
    missing = {word: (n, seen[word]) for word, n in expected.items() if seen[word] < n}
    assert missing == {}, f"cut or missing (wanted, found): {missing}\n{text}"


@pytest.fixture
def history(setup: Setup) -> Setup:
    """A real failed run with a long error, then runs with large, distinct counts."""
    setup.warehouse.members("High Value Users", "u1")
    path = setup.write(audiences=("High Value Users",), traits=())
    path.write_text(path.read_text().replace("FROM members", "FROM userz"))
    assert cli("sync", "--config", str(path)).exit_code == 1
    setup.write()
    started = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    engine = setup.engine()
    with engine.begin() as conn:
        for n in range(2, 7):
            counts = {key: 1_000_000 * n + 1_000 * i + n for i, key in enumerate(COUNTS)}
            conn.execute(
                insert(sync_runs).values(
                    trigger="full_resync" if n % 2 else "schedule",
                    resync_key="order_completed_last_30_days" if n == 3 else None,
                    status=("partial", "succeeded")[n % 2],
                    started_at=started + timedelta(hours=n),
                    finished_at=started + timedelta(hours=n, seconds=n * 7.5),
                    error=LONG_ERROR if n == 4 else None,
                    **counts,
                )
            )
    engine.dispose()
    return setup


def run_words(runs: list[dict[str, Any]]) -> Counter[str]:
    return Counter(str(v) for run in runs for v in (run["id"], *(run[k] for k in COUNTS)))


@pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("width", WIDTHS)
def test_history_never_cuts_a_number_at_any_width(history, width):
    result = cli(
        "history",
        "--config",
        str(history.tmp_path / "reconciler.toml"),
        env={"COLUMNS": str(width)},
    )
    assert result.exit_code == 0, result.output
    runs = json.loads(
        cli("history", "--json", "--config", str(history.tmp_path / "reconciler.toml")).stdout
    )
    assert len(runs) == 6 and runs[-1]["status"] == "failed"
    assert_fits(result.stdout, width)
    assert_all_whole(
        result.stdout, run_words(runs) + Counter(["order_completed_last_30_days", "users"])
    )
    # the cause is shown whole (history leaves only the database URL and fixes out)
    assert tokens(result.stdout)[error_gist(runs[-1]["error"]).split()[-1].strip('"{}[],:;()')] >= 1


@pytest.mark.parametrize("width", [80, 120, 160])
def test_history_rendered_by_rich_at_fixed_widths_keeps_every_count(width):
    """The same check on the view alone, with rich's recording Console."""
    runs = [
        {
            "id": 10_000 + n,
            "trigger": "full_resync",
            "resync_key": "*",
            "status": "partial",
            "started_at": "2026-05-01T12:00:00Z",
            "finished_at": "2026-05-01T12:03:00Z",
            "error": LONG_ERROR,
            **{k: 9_000_000 + 10 * n + i for i, k in enumerate(COUNTS)},
        }
        for n in range(4)
    ]
    out = Console(width=width, record=True, file=io.StringIO())
    views.print_runs(out, runs)
    text = out.export_text()
    assert_fits(text, width)
    assert_all_whole(text, run_words(runs))
    assert "users" in tokens(text)


@pytest.fixture
def deliveries(setup: Setup) -> Setup:
    """One run: long user ids, large values, a long 422 body for every user."""
    for user in USERS:
        setup.warehouse.user(user, email=f"{user[:20]}@example.com")
    setup.warehouse.members("High Value Users", *USERS)
    setup.warehouse.trait("Lifetime Value", {u: 1_234_567_890 + n for n, u in enumerate(USERS)})
    setup.receiver.respond = lambda _n, _b: Reply(
        422,
        '{"errors":[{"field":"email","message":'
        '"Email has already been taken by '
        'another contact; merge them first"}]}',
    )
    assert cli("sync", "--config", str(setup.write(destination="max_attempts = 1"))).exit_code == 1
    return setup


@pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("width", WIDTHS)
def test_show_never_cuts_a_user_id_or_a_number(deliveries, width):
    result = cli(
        "show",
        "1",
        "--config",
        str(deliveries.tmp_path / "reconciler.toml"),
        env={"COLUMNS": str(width)},
    )
    assert result.exit_code == 0, result.output
    assert_fits(result.stdout, width)
    # each user: 2 changes and 1 attempt; each attempt answered 422
    expected = Counter({user: 3 for user in USERS})
    expected.update(
        {"422": len(USERS), "high_value_users": len(USERS), "lifetime_value": len(USERS)}
    )
    expected.update(str(1_234_567_890 + n) for n in range(len(USERS)))
    assert_all_whole(result.stdout, expected)
    assert "first" in tokens(result.stdout)  # the end of each error is there too


@pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("width", WIDTHS)
def test_user_never_cuts_an_id_or_a_value(deliveries, width):
    user = USERS[-1]
    result = cli(
        "user",
        user,
        "--config",
        str(deliveries.tmp_path / "reconciler.toml"),
        env={"COLUMNS": str(width)},
    )
    assert result.exit_code == 0, result.output
    assert_fits(result.stdout, width)
    words = tokens(result.stdout)
    assert words[user] >= 1 and words["422"] >= 1
    assert words["lifetime_value=1234567892"] >= 1


def render(width: int, columns: list[Column], rows: list[list[str]]) -> str:
    out = Console(width=width, record=True, file=io.StringIO())
    print_table(out, columns, rows)
    text = out.export_text()
    assert_fits(text, width)
    return text


def test_wide_gives_a_row_a_line_narrower_puts_texts_under_narrowest_gives_blocks():
    columns = [Column("id", NUMBER), Column("name"), Column("note", TEXT)]
    rows = [["123456", "alpha beta", "a note that is rather long " * 3]]
    lines = render(160, columns, rows).splitlines()
    assert [line.split() for line in lines[:1]] == [["id", "name", "note"]]
    assert len(lines) == 3 and lines[2].split()[:3] == ["123456", "alpha", "beta"]
    lines = render(30, columns, rows).splitlines()
    assert lines[0].split() == ["id", "name"] and lines[2].split() == ["123456", "alpha", "beta"]
    assert "note:" in lines[3] and "".join(lines[3:]).count("rather") == 3
    numbers = [Column("a", NUMBER), Column("b", NUMBER)]  # 13 wide as a table
    assert render(12, numbers, [["123456", "654321"]]).splitlines() == ["a 123456", "  b 654321"]


def test_cells_are_data_not_markup():
    out = Console(width=80, record=True, file=io.StringIO())
    print_table(out, [Column("user")], [["[bold]u1[/bold]"]])
    assert "[bold]u1[/bold]" in out.export_text()
