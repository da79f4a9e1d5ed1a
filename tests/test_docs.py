"""The docs' examples run (issue 13): every TOML block of README.md and docs/*.md loads
and syncs (dry run) with its URLs pointed at test files and the receiver, and every
`reconciler ...` command line they show is a real command with real options."""

from __future__ import annotations

import re
import sqlite3
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from reconciler.cli import main
from reconciler.config import load_config

from .helpers import cli
from .receiver import Receiver

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(language: str) -> list[tuple[str, int, str]]:
    """(file, number, text) of every fenced block in `language`."""
    found = []
    for doc in DOCS:
        texts = re.findall(
            rf"^```{language}\n(.*?)^```", doc.read_text(encoding="utf-8"), re.DOTALL | re.MULTILINE
        )
        found += [(doc.name, n, text) for n, text in enumerate(texts, 1)]
    return found


TOML = blocks("toml")


def command_lines() -> list[tuple[str, str]]:
    """(file, line) of every `reconciler ...` the docs show: in the first column of a
    table, and on the lines of shell blocks."""
    found = []
    for doc in DOCS:
        for row in re.findall(
            r"^\| `(reconciler(?: [^`]*)?)`", doc.read_text(encoding="utf-8"), re.MULTILINE
        ):
            found.append((doc.name, row.replace("\\|", "|")))
    for name, _, text in blocks("sh"):
        for line in text.splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("reconciler "):
                found.append((name, line))
    return found


COMMANDS = command_lines()


def test_the_docs_have_examples_to_check():
    assert {name for name, _, _ in TOML} >= {"README.md", "reference.md", "operations.md"}
    # the reference's table names every command
    assert {words_of(line)[1] for doc, line in COMMANDS if doc == "reference.md"} >= set(
        main.commands
    )


@pytest.fixture
def warehouse(tmp_path: Path) -> str:
    """A source with the tables the examples query."""
    path = tmp_path / "warehouse.db"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE users (user_id TEXT, email TEXT, first_name TEXT, last_name TEXT)"
        )
        conn.execute("CREATE TABLE orders (user_id TEXT, amount NUMERIC, completed_at TEXT)")
        conn.execute("INSERT INTO users VALUES ('u1', 'jane@acme.com', 'Jane', 'Doe')")
        conn.execute("INSERT INTO orders VALUES ('u1', 120, date('now'))")
        conn.execute(
            "CREATE TABLE companies (group_id TEXT, user_id TEXT, name TEXT, "
            "website TEXT, city TEXT, country TEXT, seats INTEGER)"
        )
        conn.execute(
            "INSERT INTO companies VALUES ('g1', 'u1', 'Acme', 'https://acme.com', "
            "'Paris', 'FR', 120)"
        )
    return f"sqlite:///{path}"


def entries_in(raw: dict[str, Any]) -> int:
    return sum(
        len(raw.get(section, []))
        for section in ("audiences", "traits", "account_audiences", "account_traits")
    )


@pytest.mark.parametrize("doc, number, text", TOML, ids=[f"{d}#{n}" for d, n, _ in TOML])
def test_toml_example_parses_loads_and_syncs(
    doc, number, text, tmp_path, warehouse, receiver: Receiver
):
    raw = tomllib.loads(text)
    path = tmp_path / "example.toml"
    path.write_text(text, encoding="utf-8")
    env = {
        "RECONCILER_DATABASE_URL": f"sqlite:///{tmp_path / 'state.db'}",
        "RECONCILER_SOURCE_URL": warehouse,
        "CHARTMOGUL_WEBHOOK_URL": receiver.url,
    }
    config = load_config(path, env=env)
    assert len(config.entries) == entries_in(raw)
    for section in ("destination", "schedule", "daemon", "history"):
        for key, value in raw.get(section, {}).items():
            if key != "webhook_url":
                assert getattr(getattr(config, section), key) == value, (section, key)
    if config.entries:
        result = cli("sync", "--dry-run", "--config", str(path), env=env)
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith("dry run: 1 users seen")
        assert receiver.bodies() == []


def words_of(line: str) -> list[str]:
    """A documented command line's words, brackets and alternatives removed."""
    return [w for w in re.sub(r"[\[\]]", " ", line).split() if w != "|"]


def options_of(command: click.Command) -> set[str]:
    return {
        opt
        for p in command.params
        if isinstance(p, click.Option)
        for opt in (*p.opts, *p.secondary_opts)
    } | {"--help", "-h"}


@pytest.mark.parametrize("doc, line", COMMANDS, ids=[f"{d}: {line}" for d, line in COMMANDS])
def test_documented_command_line_is_real(doc, line):
    words = words_of(line)
    assert words[0] == "reconciler"
    words = words[1:]
    while words and words[0].startswith("-"):  # options before the command's name
        option = words.pop(0)
        assert option in options_of(main), f"{doc}: no option {option} before the command"
        if option == "--config":
            assert words.pop(0) == "PATH"
    if not words or words[0] == "COMMAND":
        return
    name = words.pop(0)
    assert name in main.commands, f"{doc}: no command {name}"
    command = main.commands[name]
    documented = [w for w in words if w.startswith("-")]
    assert set(documented) <= options_of(command), f"{doc}: {line}"
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0, result.output
    for option in documented:
        assert option in result.stdout
