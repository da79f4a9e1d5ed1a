"""Building blocks of the harness: configs, state databases, the CLI, the floor, raw senders.

Each measured thing is one child process measured by ``run_measured``. Sections in
``run.py`` interleave them round by round (floor, then CLI, then the next round) so that
anything else competing for the machine slows the figure and its baseline alike.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    BENCH,
    PG_BENCH_DB,
    PG_FLOOR_DB,
    PYTHON,
    RECONCILER,
    Measured,
    median,
    pg_database,
    run_measured,
)
from _report import Figure
from gen_source import (
    ACCOUNT_AUDIENCE,
    ACCOUNT_AUDIENCE_QUERY,
    ACCOUNT_TRAIT,
    ACCOUNT_TRAIT_QUERY,
    ACCOUNTS_QUERY,
    PROFILE_QUERY,
    TRAIT,
    TRAIT_QUERY,
    audience_queries,
)
from receiver import Receiver

FLOOR_METHODS = ("merge", "sql")


class BenchError(Exception):
    """A measured step failed: the message names the step and quotes the child's output."""


@dataclass
class Bench:
    """What every section needs: settings, the receiver, and where figures and errors go."""

    args: argparse.Namespace
    receiver: Receiver
    cli_ok: bool
    figures: list[Figure] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cache: dict[tuple[str, int], Any] = field(default_factory=dict)

    @property
    def workdir(self) -> Path:
        """Where sources, configs and SQLite state files go."""
        path: Path = self.args.workdir
        return path

    @property
    def runs(self) -> int:
        """Rounds per figure."""
        runs: int = self.args.runs
        return runs

    def add(self, figure: Figure) -> None:
        """Keep a figure and show it at once on stderr."""
        self.figures.append(figure)
        ratio = f", ratio {figure.ratio:.2f}" if figure.ratio is not None else ""
        value = "-" if figure.value is None else f"{figure.value:.3f}"
        log(
            f"  => {figure.name} [{figure.backend}, {figure.users:,}]: {value} {figure.unit}{ratio}"
        )


def log(message: str) -> None:
    """Progress on stderr, so that stdout holds only the table and the JSON line."""
    print(message, file=sys.stderr, flush=True)


def timeout_for(users: int) -> float:
    """A bound for one child process handling ``users`` users, sends included."""
    return 300.0 + users / 100.0


def checked(measured: Measured, what: str) -> Measured:
    """``measured``, or ``BenchError`` when it exited non-zero."""
    if measured.returncode != 0:
        raise BenchError(f"{what} exited {measured.returncode}:\n{measured.tail()}")
    return measured


def median_seconds(runs: Sequence[Measured]) -> float:
    """The median wall time of several runs."""
    return median([m.seconds for m in runs])


def peak_rss(runs: Sequence[Measured]) -> float:
    """The largest peak RSS among several runs, in MB."""
    return max((m.peak_rss_mb for m in runs), default=float("nan"))


def write_config(
    path: Path,
    state_url: str,
    source: Path,
    webhook: str,
    *,
    rps: float = 0,
    concurrency: int = 20,
    accounts: bool = False,
    max_attempts: int | None = None,
) -> Path:
    """Write a config file (SPEC §3; with ``accounts``, §9 too) for the generated source
    and return its path."""
    q = json.dumps  # these JSON strings are valid TOML basic strings
    lines = [
        "[database]",
        f"url = {q(state_url)}",
        "",
        "[source]",
        f"url = {q(f'sqlite:///{source}')}",
        "",
        "[destination]",
        f"webhook_url = {q(webhook)}",
        f"requests_per_second = {rps}",
        f"max_concurrency = {concurrency}",
        *([f"max_attempts = {max_attempts}"] if max_attempts else []),
        "",
        "[profile]",
        f"query = {q(PROFILE_QUERY)}",
    ]
    for name, query in audience_queries():
        lines += ["", "[[audiences]]", f"name = {q(name)}", f"query = {q(query)}"]
    lines += ["", "[[traits]]", f"name = {q(TRAIT)}", f"query = {q(TRAIT_QUERY)}", ""]
    if accounts:
        lines += [
            "[accounts]",
            f"query = {q(ACCOUNTS_QUERY)}",
            "",
            "[[account_audiences]]",
            f"name = {q(ACCOUNT_AUDIENCE)}",
            f"query = {q(ACCOUNT_AUDIENCE_QUERY)}",
            "",
            "[[account_traits]]",
            f"name = {q(ACCOUNT_TRAIT)}",
            f"query = {q(ACCOUNT_TRAIT_QUERY)}",
            "",
        ]
    path.write_text("\n".join(lines))
    return path


def _remove_sqlite(path: Path) -> None:
    """Delete a SQLite file with its WAL, shared-memory and journal files."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


@contextmanager
def fresh_state(backend: str, workdir: Path, name: str) -> Iterator[str]:
    """An empty state database: yields a SQLite path or a PostgreSQL DSN; removes it after."""
    if backend == "postgresql":
        with pg_database(PG_FLOOR_DB if name == "floor" else PG_BENCH_DB) as dsn:
            yield dsn
        return
    path = workdir / f"state-{name}.db"
    _remove_sqlite(path)
    try:
        yield str(path)
    finally:
        _remove_sqlite(path)


class Cli:
    """The ``reconciler`` command against one config; after a failure it stops, recorded."""

    def __init__(self, b: Bench, config: Path | None, users: int, label: str) -> None:
        self.b, self.config, self.users, self.label = b, config, users, label
        self.failed = config is None

    def __call__(self, *args: str, expect: int = 0) -> Measured | None:
        """Run ``reconciler ARGS --config CONFIG`` once, measured; None once anything failed
        (an exit status other than ``expect``)."""
        if self.failed or self.config is None:
            return None
        argv = [str(RECONCILER), *args, "--config", str(self.config)]
        measured = run_measured(argv, timeout=timeout_for(self.users))
        log(
            f"    reconciler {' '.join(args)}: exit {measured.returncode}, "
            f"{measured.seconds:.2f} s, {measured.peak_rss_mb:.0f} MB"
        )
        if measured.returncode != expect:
            self.failed = True
            self.b.errors.append(
                f"{self.label}: reconciler {' '.join(args)} exited "
                f"{measured.returncode}: {measured.tail(3)}"
            )
            log(f"    FAILED: {measured.tail()}")
            return None
        return measured


@contextmanager
def cli_session(
    b: Bench,
    backend: str,
    source: Path,
    tag: str,
    users: int,
    *,
    rps: float = 0,
    concurrency: int = 20,
    accounts: bool = False,
    max_attempts: int | None = None,
) -> Iterator[Cli]:
    """A ``Cli`` on a fresh, migrated state database (an inert one without the CLI)."""
    if not b.cli_ok:
        yield Cli(b, None, users, tag)
        return
    with fresh_state(backend, b.workdir, tag) as state:
        url = (
            state.replace("postgresql://", "postgresql+psycopg://", 1)
            if backend == "postgresql"
            else f"sqlite:///{state}"
        )
        config = write_config(
            b.workdir / f"{tag}-{backend}.toml",
            url,
            source,
            b.receiver.url,
            rps=rps,
            concurrency=concurrency,
            accounts=accounts,
            max_attempts=max_attempts,
        )
        cli = Cli(b, config, users, f"{tag}/{backend}/{users:,}")
        cli("migrate")
        yield cli


class Floor:
    """``floor.py`` against one state database: measured runs of both methods, and ``ack``."""

    def __init__(self, backend: str, source: Path, state: str) -> None:
        self.where = [
            "--source",
            str(source),
            "--pg" if backend == "postgresql" else "--sqlite",
            state,
        ]
        self.runs: dict[str, list[Measured]] = {m: [] for m in FLOOR_METHODS}
        self.last: dict[str, Any] = {}

    def _argv(self, action: str, *extra: str) -> list[str]:
        """The command line of one ``floor.py`` action against this state."""
        return [str(PYTHON), str(BENCH / "floor.py"), action, *self.where, *extra]

    def measure(self) -> None:
        """One measured run of each method, kept for ``medians``."""
        for method in FLOOR_METHODS:
            measured = checked(
                run_measured(self._argv("run", "--method", method), timeout=timeout_for(0)),
                f"floor {method}",
            )
            self.runs[method].append(measured)
            self.last = json.loads(measured.stdout)
        log(
            "    floor: "
            + ", ".join(f"{m} {self.runs[m][-1].seconds:.2f} s" for m in FLOOR_METHODS)
        )

    def setup_run(self) -> None:
        """An unmeasured run, so that the snapshot table holds the current source."""
        checked(
            run_measured(self._argv("run", "--method", "sql"), timeout=timeout_for(0)),
            "floor setup run",
        )

    def ack(self) -> None:
        """Make the floor's acknowledged state equal to its snapshot (unmeasured)."""
        checked(run_measured(self._argv("ack"), timeout=timeout_for(0)), "floor ack")

    def take(self) -> dict[str, Any]:
        """The medians so far (``best`` is the faster method), then start afresh."""
        result: dict[str, Any] = {m: median_seconds(r) for m, r in self.runs.items()}
        result["best"] = min(result[m] for m in FLOOR_METHODS)
        result["rss_mb"] = max(peak_rss(r) for r in self.runs.values())
        result["counts"] = self.last.get("counts", {})
        result["phases"] = self.last.get("phases", {})
        self.runs = {m: [] for m in FLOOR_METHODS}
        return result


def floor_figure(name: str, backend: str, users: int, floor: dict[str, Any]) -> Figure:
    """A row showing a floor measurement itself."""
    return Figure(
        f"floor {name}",
        backend,
        users,
        floor["best"],
        "s",
        rss_mb=floor["rss_mb"],
        extra={m: floor[m] for m in (*FLOOR_METHODS, "counts", "phases")},
    )


def raw_send(b: Bench, mode: str, bodies: list[str], *, delay: float = 0.0) -> dict[str, Any]:
    """One raw httpx baseline run posting ``bodies``, with the receiver's view of it.

    ``cpu_seconds`` is the whole process's CPU time (start-up and reading the bodies
    included, as the CLI's includes its own). ``delay``: the receiver's answer delay.
    """
    b.receiver.reset(delay=delay)
    argv = [str(PYTHON), str(BENCH / "raw_send.py"), mode, "--url", b.receiver.url, *bodies]
    measured = checked(run_measured(argv, timeout=timeout_for(100_000)), f"raw_send {mode}")
    result: dict[str, Any] = json.loads(measured.stdout)
    result["cpu_seconds"] = measured.cpu_seconds
    result["receiver"] = b.receiver.stats()
    log(
        f"    raw {mode}: {result['requests']} in {result['seconds']:.2f} s "
        f"({result['receiver']['rate']:.0f}/s at the receiver)"
    )
    return result


def count_note(received: int, expected: int) -> str:
    """A note when the receiver saw another number of requests than the data implies."""
    return "" if received == expected else f"receiver got {received} requests, expected {expected}"
