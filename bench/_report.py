"""The benchmark's figures and how they are printed: a table for people, a JSON line for tools."""

from __future__ import annotations

import json
import math
import platform
import sqlite3
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Figure:
    """One reported figure: a median, what it is compared with, and whether it met its target."""

    name: str
    backend: str
    users: int
    value: float | None
    unit: str
    baseline: float | None = None
    ratio: float | None = None
    target: str = ""
    ok: bool | None = None
    rss_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def _fmt(value: float | None, digits: int = 2) -> str:
    """A number for the table, or a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def table(figures: list[Figure]) -> str:
    """The figures as an aligned text table (notes below it)."""
    header = (
        "figure",
        "backend",
        "users",
        "median",
        "unit",
        "baseline",
        "ratio",
        "target",
        "met",
        "peak RSS MB",
    )
    rows = [header]
    notes: list[str] = []
    for f in figures:
        met = {True: "yes", False: "NO", None: "-"}[f.ok]
        rows.append(
            (
                f.name,
                f.backend,
                f"{f.users:,}",
                _fmt(f.value),
                f.unit,
                _fmt(f.baseline),
                _fmt(f.ratio),
                f.target,
                met,
                _fmt(f.rss_mb, 0),
            )
        )
        if f.note:
            notes.append(f"  [{len(rows) - 1}] {f.name} ({f.backend}): {f.note}")
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        label = "   " if n == 0 else f"{n:>2} "
        cells = (str(c).ljust(w) for c, w in zip(row, widths, strict=True))
        lines.append((label + "  ".join(cells)).rstrip())
        if n == 0:
            lines.append("   " + "  ".join("-" * w for w in widths))
    return "\n".join(lines + (["", "notes:", *notes] if notes else []))


def json_line(figures: list[Figure], settings: dict[str, Any], errors: list[str]) -> str:
    """Everything as one JSON line: settings, environment, figures and errors."""
    environment = {
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "machine": platform.machine(),
        "cpus": _cpus(),
    }
    return json.dumps(
        {
            "bench": "reconciler",
            "settings": settings,
            "environment": environment,
            "figures": [asdict(f) for f in figures],
            "errors": errors,
        },
        default=str,
        separators=(",", ":"),
    )


def _cpus() -> int:
    """Logical CPUs this process may run on."""
    import os

    return len(os.sched_getaffinity(0))
