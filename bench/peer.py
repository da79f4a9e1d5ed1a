"""The peer: drt-core 1.2.1, a reverse-ETL CLI that posts one row at a time.

``Peer`` installs drt-core into its own virtual environment under the harness's
workdir (``peer-venv``, created once and reused; never the project's venv), writes a
drt project that reads the bench's SQLite source and posts one JSON body per user to
the bench receiver, and runs ``drt run`` measured as a whole process, as the harness
measures ``reconciler sync``.

The project (``<workdir>/peer/``, rewritten before every run so that no drt state
carries over):

- ``home/.drt/profiles.yml``: the ``bench`` profile, ``type: sqlite`` on the source
  file (drt reads profiles from ``~/.drt``, so the run gets ``HOME=<workdir>/peer/home``);
- ``project/drt_project.yml``: the project, on that profile;
- ``project/syncs/models/peer_users.sql``: one row per user, the profile, the trait and
  one 0/1 column per audience (``PIVOT_QUERY``), so drt sends exactly N requests;
- ``project/syncs/initial_sync.yml``: ``rest_api`` destination, ``body_mode: record``,
  a Jinja ``body_template`` that writes the body reconciler's initial sync sends for the
  same user (``BODY_TEMPLATE``), ``mode: full``, pacing off (drt's default is 10/s).

drt's telemetry is opt-in and off by default (``drt/telemetry.py``); the run also gets
``DO_NOT_TRACK=1`` and ``DRT_TELEMETRY=0``, each of which turns it off, and a ``HOME``
with no ``~/.drt/telemetry.json``. ``DRT_*`` variables of the harness's environment are
dropped so that none overrides the project.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

from _common import PYTHON, Measured, child_env, run_measured
from gen_source import AUDIENCES, TRAIT, audience_queries

PACKAGE = "drt-core"
VERSION = "1.2.1"
LABEL = f"{PACKAGE} {VERSION}"
# drt's defaults, written out: rows per destination load() call (each call opens one
# httpx.Client, so one TCP connection per batch), and its retry policy.
BATCH_SIZE = 100
SYNC_NAME = "initial_sync"


class PeerError(Exception):
    """Installing or running the peer failed; the message says which step."""


def key_of(name: str) -> str:
    """The snake_cased key reconciler derives from an ASCII name (SPEC §2).

    >>> key_of("High-Value Users"), key_of("Active Last 30 Days")
    ('high_value_users', 'active_last_30_days')
    """
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _pivot_query() -> str:
    """One row per user: profile, trait, and a 0/1 column per audience."""
    flags = [
        f"  EXISTS (SELECT 1 FROM ({query}) AS a WHERE a.user_id = u.user_id) AS {key_of(name)}"
        for name, query in audience_queries()
    ]
    return (
        "SELECT u.user_id, u.email, u.first_name, u.last_name, u.company_id, u.company_name,\n"
        f"  u.lifetime_value AS {key_of(TRAIT)},\n" + ",\n".join(flags) + "\nFROM users AS u\n"
    )


def _body_template() -> str:
    """A body like reconciler's initial-sync body: the same keys, values and key order.

    ``custom`` lists every audience the user is in (``true``) and the trait, in key
    order, as reconciler does on a first sync. ``timestamp`` is drt's run start
    (``metadata_columns.synced_at``, ISO 8601 with ``+00:00``), ``message_id`` the run's
    id and the user id; drt has no per-attempt time, so there is no ``sent_at``.
    """
    entries = sorted(
        [(key_of(name), f"true if row.{key_of(name)} else none") for name in AUDIENCES]
        + [(key_of(TRAIT), f"row.{key_of(TRAIT)}")]
    )
    pairs = ", ".join(f'("{key}", {value})' for key, value in entries)
    return (
        '{"type":"Send Contact",'
        '"message_id":{{ (row._run_id ~ ":" ~ row.user_id) | tojson_safe }},'
        '"timestamp":{{ row._synced_at | tojson_safe }},'
        '"user_id":{{ row.user_id | tojson_safe }},'
        '"email":{{ row.email | tojson_safe }},'
        '"first_name":{{ row.first_name | tojson_safe }},'
        '"last_name":{{ row.last_name | tojson_safe }},'
        '"company":{"id":{{ row.company_id | string | tojson_safe }},'
        '"name":{{ row.company_name | tojson_safe }}},'
        '"custom":['
        f"{{% for key, value in [{pairs}] if value is not none %}}"
        '{{ "," if not loop.first }}{"key":"{{ key }}","value":{{ value | tojson_safe }}}'
        "{% endfor %}]}"
    )


PIVOT_QUERY = _pivot_query()
BODY_TEMPLATE = _body_template()


def sync_config(url: str) -> dict[str, object]:
    """The sync's YAML document (as data): source model, destination, options."""
    return {
        "name": SYNC_NAME,
        "description": "reconciler's initial sync, one POST per user",
        "model": "ref('peer_users')",
        "destination": {
            "type": "rest_api",
            "url": url,
            "method": "POST",
            "headers": {"Content-Type": "application/json"},
            "body_mode": "record",
            "body_template": BODY_TEMPLATE,
        },
        "sync": {
            "mode": "full",
            "batch_size": BATCH_SIZE,
            "rate_limit": {"requests_per_second": 0},  # unpaced, as reconciler's run
            "on_error": "fail",
            "metadata_columns": {"synced_at": "_synced_at", "run_id": "_run_id"},
        },
    }


def to_yaml(data: Mapping[str, object], indent: int = 0) -> str:
    """Nested mappings as block YAML: each scalar a JSON literal (a valid YAML scalar), or
    a literal block when it is one line holding double quotes (a template, kept readable).

    >>> print(to_yaml({"a": {"b": 1, "c": "x: y", "d": '{"k": 1}'}}), end="")
    a:
      b: 1
      c: "x: y"
      d: |-
        {"k": 1}
    """
    pad = " " * indent
    lines: list[str] = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            lines += [f"{pad}{key}:", to_yaml(value, indent + 2).rstrip("\n")]
        elif isinstance(value, str) and '"' in value and "\n" not in value:
            lines += [f"{pad}{key}: |-", f"{pad}  {value}"]
        else:
            lines.append(f"{pad}{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


class Peer:
    """drt-core in ``<workdir>/peer-venv``, with its project in ``<workdir>/peer``."""

    def __init__(self, workdir: Path) -> None:
        self.venv = workdir / "peer-venv"
        self.drt = self.venv / "bin" / "drt"
        self.root = workdir / "peer"
        self.home = self.root / "home"
        self.project = self.root / "project"

    def installed_version(self) -> str | None:
        """drt-core's version in the peer venv, or None when it is not there."""
        python = self.venv / "bin" / "python"
        if not python.exists() or not self.drt.exists():
            return None
        done = subprocess.run(
            [str(python), "-c", f"import importlib.metadata as m; print(m.version({PACKAGE!r}))"],
            capture_output=True,
            text=True,
            check=False,
        )
        return done.stdout.strip() if done.returncode == 0 else None

    def ensure(self, log: Callable[[str], None] = print) -> None:
        """Create the venv and install drt-core==VERSION into it, unless already there."""
        if self.installed_version() == VERSION:
            return
        log(f"    installing {PACKAGE}=={VERSION} into {self.venv} (once)")
        shutil.rmtree(self.venv, ignore_errors=True)
        for argv in (
            [str(PYTHON), "-m", "venv", str(self.venv)],
            [str(self.venv / "bin" / "pip"), "install", "-q", f"{PACKAGE}=={VERSION}"],
        ):
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
                raise PeerError(f"{' '.join(argv[-3:])} exited {done.returncode}:\n{tail}")
        if (found := self.installed_version()) != VERSION:
            raise PeerError(f"{PACKAGE} {VERSION} expected in {self.venv}, found {found}")

    def packages(self) -> list[str]:
        """``pip freeze`` of the peer venv: what the figure was measured with."""
        done = subprocess.run(
            [str(self.venv / "bin" / "python"), "-m", "pip", "freeze"],
            capture_output=True,
            text=True,
            check=False,
        )
        return done.stdout.split()

    def write_project(self, source: Path, url: str) -> None:
        """Write the profile and the project afresh (no state of an earlier run is left)."""
        shutil.rmtree(self.root, ignore_errors=True)
        (self.home / ".drt").mkdir(parents=True)
        (self.project / "syncs" / "models").mkdir(parents=True)
        profiles = {"bench": {"type": "sqlite", "database": str(source)}}
        (self.home / ".drt" / "profiles.yml").write_text(to_yaml(profiles))
        project = {"name": "reconciler_peer", "version": "0.1", "profile": "bench"}
        (self.project / "drt_project.yml").write_text(to_yaml(project))
        (self.project / "syncs" / "models" / "peer_users.sql").write_text(PIVOT_QUERY)
        (self.project / "syncs" / f"{SYNC_NAME}.yml").write_text(to_yaml(sync_config(url)))

    def env(self) -> Mapping[str, str]:
        """The run's environment: the harness's without ``DRT_*``, telemetry off, our HOME."""
        env = {k: v for k, v in child_env().items() if not k.startswith("DRT_")}
        return env | {"HOME": str(self.home), "DO_NOT_TRACK": "1", "DRT_TELEMETRY": "0"}

    def run(self, source: Path, url: str, *, timeout: float) -> Measured:
        """``drt run`` of a fresh project, measured as a whole process."""
        self.write_project(source, url)
        return run_measured([self.drt, "run"], timeout=timeout, cwd=self.project, env=self.env())


def main() -> None:
    """Print the model query and the sync file the harness writes (to read them)."""
    print(PIVOT_QUERY)
    print(to_yaml(sync_config("http://127.0.0.1:PORT/hook")))


if __name__ == "__main__":
    main()
