"""docs/operations.md stays true: its SQL recipes run, and it names every command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from reconciler.cli import main
from reconciler.run import sync

from .conftest import Setup
from .receiver import Reply

DOC = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
USER = "user-42"  # the user the recipes name
ACCOUNT = "acme-1"  # the account they name
ACCOUNTS = """
[accounts]
query = "SELECT group_id, user_id, name FROM companies"

[[account_audiences]]
name = "Enterprise Accounts"
query = "SELECT group_id FROM enterprise"
"""


def recipes() -> list[str]:
    return re.findall(r"```sql\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)


def runs_on(recipe: str, backend: str) -> bool:
    first = recipe.splitlines()[0].strip().lower()
    return first not in ("-- sqlite", "-- postgresql") or first == f"-- {backend}"


def test_the_guide_has_recipes_for_each_backend():
    assert len(recipes()) >= 7
    assert sum(runs_on(r, "sqlite") for r in recipes()) == len(recipes()) - 1
    assert sum(runs_on(r, "postgresql") for r in recipes()) == len(recipes()) - 1


@pytest.mark.parametrize("name", sorted(main.commands))
def test_the_guide_names_every_command(name):
    assert f"reconciler {name}" in DOC.read_text(encoding="utf-8")


def test_every_sql_recipe_runs_and_finds_the_failure(setup: Setup, engine_of):
    """A run where USER's and ACCOUNT's updates are rejected (an account without a
    user_id skipped before): each recipe returns rows about them."""
    engine = engine_of(setup)
    setup.warehouse.user(USER, email="someone@example.com")
    setup.warehouse.members("High Value Users", USER)
    setup.warehouse.execute("CREATE TABLE companies (group_id TEXT, user_id TEXT, name TEXT)")
    setup.warehouse.execute("INSERT INTO companies VALUES (?, ?, 'Acme')", ACCOUNT, USER)
    setup.warehouse.execute("CREATE TABLE enterprise (group_id TEXT)")
    setup.warehouse.executemany("INSERT INTO enterprise VALUES (?)", [(ACCOUNT,), ("orphan",)])
    sync(setup.config(extra=ACCOUNTS), engine)
    setup.warehouse.trait("Lifetime Value", {USER: 5})
    setup.warehouse.execute("UPDATE companies SET name = 'Acme Inc'")
    setup.receiver.respond = lambda _n, _body: Reply(400, "contact rejected")
    assert sync(setup.config(extra=ACCOUNTS), engine).status == "partial"
    backend = engine.dialect.name
    ran = 0
    for recipe in recipes():
        if not runs_on(recipe, backend):
            continue
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(recipe).all()
        assert rows, f"no rows from:\n{recipe}"
        ran += 1
    assert ran == len(recipes()) - 1
