"""Where the databases are (SPEC §3): a relative SQLite path in the config file follows
the file, one in the environment follows the working directory; the first command that
creates a state database says where."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import Setup, Warehouse
from .helpers import cli
from .receiver import Receiver


def relative_setup(
    tmp_path: Path, receiver: Receiver, state: str = "sqlite:///state.db"
) -> tuple[Setup, Path]:
    """A config in `conf/` naming `conf/state.db` and `conf/warehouse.db` relatively."""
    conf = tmp_path / "conf"
    conf.mkdir()
    warehouse = Warehouse(conf / "warehouse.db")
    warehouse.url = "sqlite:///warehouse.db"  # as the config file writes it
    warehouse.members("High Value Users", "u1")
    setup = Setup(conf, state, warehouse, receiver)
    return setup, setup.write()


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working directory: not the config's."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    return other


def test_relative_paths_in_the_file_follow_the_file(tmp_path, receiver, elsewhere):
    setup, path = relative_setup(tmp_path, receiver)
    first = cli("sync", "--config", str(path))
    assert first.exit_code == 0, first.output
    state = setup.tmp_path / "state.db"
    assert state.exists() and list(elsewhere.iterdir()) == []
    assert f"reconciler: created state database {state}\n" == first.stderr
    assert receiver.bodies() and receiver.bodies()[0]["user_id"] == "u1"
    receiver.clear()
    second = cli("sync", "--config", str(path))
    assert second.exit_code == 0 and second.stderr == ""
    assert receiver.bodies() == [], "the same state was found: nothing is sent again"


def test_a_config_found_by_its_relative_path_is_read_from_there(tmp_path, receiver, elsewhere):
    relative_setup(tmp_path, receiver, "sqlite:///../data/s.db")
    (tmp_path / "data").mkdir()
    result = cli("sync", "--config", "../conf/reconciler.toml")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "data" / "s.db").exists()
    assert result.stderr == f"reconciler: created state database {tmp_path / 'data' / 's.db'}\n"


def test_relative_paths_in_the_environment_follow_the_working_directory(
    tmp_path, receiver, elsewhere
):
    _setup, path = relative_setup(tmp_path, receiver)
    (elsewhere / "wh.db").write_bytes((tmp_path / "conf" / "warehouse.db").read_bytes())
    env = {
        "RECONCILER_DATABASE_URL": "sqlite:///env-state.db",
        "RECONCILER_SOURCE_URL": "sqlite:///wh.db",
    }
    result = cli("sync", "--config", str(path), env=env)
    assert result.exit_code == 0, result.output
    assert (elsewhere / "env-state.db").exists()
    assert not (tmp_path / "conf" / "env-state.db").exists()
    assert result.stderr == f"reconciler: created state database {elsewhere / 'env-state.db'}\n"


def test_the_default_state_database_sits_next_to_the_config(tmp_path, receiver, elsewhere):
    setup, path = relative_setup(tmp_path, receiver)
    text = path.read_text()
    path.write_text(text.replace('[database]\nurl = "sqlite:///state.db"\n', ""))
    assert cli("migrate", "--config", str(path)).exit_code == 0
    assert (setup.tmp_path / "reconciler.state.db").exists() and list(elsewhere.iterdir()) == []


def test_a_relative_source_path_that_does_not_exist_names_the_absolute_path(
    tmp_path, receiver, elsewhere
):
    _setup, path = relative_setup(tmp_path, receiver)
    path.write_text(path.read_text().replace("sqlite:///warehouse.db", "sqlite:///typo.db"))
    result = cli("sync", "--config", str(path))
    assert result.exit_code == 1
    assert f"(source database sqlite:///{tmp_path / 'conf' / 'typo.db'})" in result.stderr
    assert not (tmp_path / "conf" / "typo.db").exists()


def test_the_first_command_says_where_it_created_the_state_database(setup: Setup):
    setup.warehouse.members("High Value Users", "u1")
    path = setup.write()
    first = cli("history", "--config", str(path))
    assert first.exit_code == 0, first.output
    if setup.state_url.startswith("sqlite"):
        assert first.stderr == (
            f"reconciler: created state database {setup.tmp_path / 'state.db'}\n"
        )
    else:
        assert first.stderr == (
            f"reconciler: created the state database's tables in {setup.state_url}\n"
        )
    for command in ("history", "sync", "migrate"):
        later = cli(command, "--config", str(path))
        assert later.exit_code == 0 and later.stderr == "", later.output
