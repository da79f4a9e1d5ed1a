"""docs/operations.md stays true: its SQL recipes run, and it names every command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from reconciler.cli import main
from reconciler.run import RunOptions, sync

from .conftest import Setup
from .receiver import Reply

DOC = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
USER = "user-42"  # the user the recipes name


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
    """A run where USER's update is rejected: each recipe returns rows about it."""
    engine = engine_of(setup)
    setup.warehouse.user(USER, email="someone@example.com")
    setup.warehouse.members("High Value Users", USER)
    sync(setup.config(), engine, RunOptions())
    setup.warehouse.trait("Lifetime Value", {USER: 5})
    setup.receiver.respond = lambda _n, _body: Reply(400, "contact rejected")
    assert sync(setup.config(), engine, RunOptions()).status == "partial"
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
