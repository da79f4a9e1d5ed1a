"""Helpers shared by test modules: the command line in-process, scrubbed environments.

Test modules import helpers from here (or from conftest, processes, receiver, model),
never from one another.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine

import reconciler.cli
from reconciler.cli import main
from reconciler.state.db import state_engine

if TYPE_CHECKING:
    from .conftest import Setup

# The variables that would override a test's config file.
ENV_VARS = (
    "RECONCILER_CONFIG",
    "RECONCILER_DATABASE_URL",
    "RECONCILER_SOURCE_URL",
    "CHARTMOGUL_WEBHOOK_URL",
)
# For CliRunner's `env`: None unsets a variable for the command.
CLI_ENV: dict[str, str | None] = dict.fromkeys(ENV_VARS)


def clean_env() -> dict[str, str]:
    """For a subprocess: this environment without variables that would override the
    test's config."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RECONCILER_") and k != "CHARTMOGUL_WEBHOOK_URL"
    }


def cli(*args: str, env: dict[str, str] | None = None) -> Result:
    """Run the real command line in-process, with none of our variables inherited.

    A process would drop its database connections on exit; in-process, the engines the
    command made are disposed here instead.
    """
    environment: dict[str, str | None] = dict(CLI_ENV)
    environment.update(env or {})
    engines: list[Engine] = []

    def tracked(url: str) -> Engine:
        engines.append(state_engine(url))
        return engines[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reconciler.cli, "state_engine", tracked)
        try:
            return CliRunner().invoke(main, list(args), env=environment)
        finally:
            for engine in engines:
                engine.dispose()


def setup_cli(setup: Setup, *args: str) -> Result:
    """`cli` with the config file `setup.write()` wrote."""
    return cli(*args, "--config", str(setup.tmp_path / "reconciler.toml"))


def assert_one_clean_line(result: Result, status: int) -> str:
    """The command failed with `status` and said why in one stderr line, no traceback."""
    assert result.exit_code == status, result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("reconciler: ")
    return lines[0]


def custom(body: dict[str, Any]) -> dict[str, Any]:
    """The `custom` entries of a Send Contact body as a dict."""
    return {item["key"]: item["value"] for item in body.get("custom", [])}
