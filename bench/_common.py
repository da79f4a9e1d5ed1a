"""Helpers shared by the benchmark scripts.

Paths of the project, measuring one child process (wall time and its own peak RSS),
medians, rates and the one-second-window maximum used to judge pacing, and the
PostgreSQL database the benchmark creates and drops. Nothing here imports the
``reconciler`` package: the benchmark drives it only through its command line.
"""

from __future__ import annotations

import bisect
import json
import os
import statistics
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
VENV_BIN = REPO / ".venv" / "bin"
PYTHON = VENV_BIN / "python"
RECONCILER = VENV_BIN / "reconciler"
DEFAULT_WORKDIR = BENCH / ".work"

PG_SERVER = "postgres@127.0.0.1:5432"
PG_ADMIN_DSN = f"postgresql://{PG_SERVER}/test"
PG_BENCH_DB = "reconciler_bench"  # the CLI's state
PG_FLOOR_DB = "reconciler_bench_floor"  # the floor's state, beside it

# Variables that would silently override the config files the benchmark writes (SPEC §3).
_OVERRIDING_ENV = (
    "RECONCILER_CONFIG",
    "RECONCILER_DATABASE_URL",
    "RECONCILER_SOURCE_URL",
    "CHARTMOGUL_WEBHOOK_URL",
)


@dataclass(frozen=True)
class Measured:
    """One finished child process: wall seconds, its peak RSS and what it printed, and
    its CPU seconds (user + system; on a shared machine steadier than wall time)."""

    argv: tuple[str, ...]
    seconds: float
    peak_rss_mb: float
    returncode: int
    stdout: str
    stderr: str
    cpu_seconds: float = float("nan")  # user + system time of the command itself
    started_at: float = float("nan")  # time.time() at the spawn, the receiver's clock
    ended_at: float = float("nan")  # time.time() at the reap

    def tail(self, lines: int = 8) -> str:
        """The last lines of stderr (or stdout when stderr is empty), for error reports."""
        text = self.stderr.strip() or self.stdout.strip()
        return "\n".join(text.splitlines()[-lines:])


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a measured child: ours, minus the variables that override configs."""
    env = {k: v for k, v in os.environ.items() if k not in _OVERRIDING_ENV}
    env.update(extra or {})
    return env


def run_measured(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Measured:
    """Run ``argv`` to completion and measure it as a whole process.

    The command runs under ``_measure.py``, which times it with ``time.perf_counter``
    from spawn to exit and reads its own ``ru_maxrss`` from ``os.wait4``: measured here,
    the harness's size would leak into the child's peak RSS (see ``_measure.py``), and
    ``RUSAGE_CHILDREN`` would give the maximum over every child ever run. A command still
    running after ``timeout`` seconds is killed with its process group (return code -9).
    ``env`` replaces the whole environment (default: ``child_env()``).
    """
    args = tuple(str(a) for a in argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        wrapper = [str(PYTHON), "-I", "-S", str(BENCH / "_measure.py"), str(result)]
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        with out.open("wb") as out_file, err.open("wb") as err_file:
            proc = subprocess.Popen(
                [*wrapper, *args],
                stdout=out_file,
                stderr=err_file,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env=child_env() if env is None else dict(env),
                start_new_session=True,
            )
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                proc.wait()
        stdout, stderr = (p.read_bytes().decode(errors="replace") for p in (out, err))
        if not result.exists():
            return Measured(args, timeout, float("nan"), -9, stdout, stderr)
        cost = json.loads(result.read_text())
        return Measured(
            args,
            cost["seconds"],
            cost["maxrss_kb"] / 1024.0,
            cost["returncode"],
            stdout,
            stderr,
            cost.get("cpu_seconds", float("nan")),
            cost.get("started_at", float("nan")),
            cost.get("ended_at", float("nan")),
        )


def _kill_group(pid: int) -> None:
    """Kill the process group of a timed-out child (it was started in its own session)."""
    with suppress(ProcessLookupError):
        os.killpg(pid, 9)


def median(values: Sequence[float]) -> float:
    """The median, or NaN for no values.

    >>> median([3.0, 1.0, 2.0])
    2.0
    """
    return statistics.median(values) if values else float("nan")


def max_in_window(timestamps: Sequence[float], window: float = 1.0) -> int:
    """The largest number of events in any half-open interval ``[t, t + window)``.

    This is the strict, sliding reading of "in any one-second window": every start
    point is tried, not only whole clock seconds. ``timestamps`` need not be sorted.

    >>> max_in_window([0.0, 0.5, 0.99, 1.0, 1.2])  # [0.5, 1.5) holds four
    4
    >>> max_in_window([0.0, 0.25, 0.5, 0.75, 1.0], window=1.0)
    4
    >>> max_in_window([])
    0
    """
    ts = sorted(timestamps)
    best = 0
    for i, t in enumerate(ts):
        best = max(best, bisect.bisect_left(ts, t + window, lo=i) - i)
    return best


def achieved_rate(timestamps: Sequence[float]) -> float:
    """Events per second between the first and the last event: ``(n - 1) / span``.

    >>> achieved_rate([0.0, 0.5, 1.0])
    2.0
    >>> achieved_rate([1.0])
    0.0
    """
    if len(timestamps) < 2:
        return 0.0
    span = max(timestamps) - min(timestamps)
    return (len(timestamps) - 1) / span if span > 0 else float("inf")


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares line through the points: ``(slope, intercept, r_squared)``.

    >>> linear_fit([1, 2, 3], [2, 4, 6])
    (2.0, 0.0, 1.0)
    """
    slope, intercept = statistics.linear_regression(xs, ys)
    mean_y = statistics.fmean(ys)
    total = sum((y - mean_y) ** 2 for y in ys)
    residual = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys, strict=True))
    return slope, intercept, (1.0 - residual / total) if total else 1.0


@contextmanager
def pg_database(name: str) -> Iterator[str]:
    """Create the PostgreSQL database ``name`` afresh, yield its libpq DSN, drop it.

    The database is dropped with ``FORCE`` so that a connection a crashed child left
    behind cannot keep it alive.
    """
    import psycopg  # only the PostgreSQL runs need it

    def drop() -> None:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    drop()
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://{PG_SERVER}/{name}"
    finally:
        drop()


def cli_available() -> tuple[bool, str]:
    """Whether ``.venv/bin/reconciler --help`` runs; with a one-line reason when not."""
    if not RECONCILER.exists():
        return False, f"{RECONCILER.relative_to(REPO)} is not installed (pip install -e . first)"
    done = subprocess.run(
        [str(RECONCILER), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
        check=False,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return False, f"`reconciler --help` exited {done.returncode}: {last}"
    return True, "ok"
