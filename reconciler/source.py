"""Reading the user's queries on the source database, streamed in chunks.

Values become canonical JSON text here, so that equal values compare equal in SQL
across runs and backends: integers stay integers, decimals become numbers, text stays
text, booleans stay booleans, dates become ISO 8601 strings.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.exc import SQLAlchemyError

from .errors import SourceEntryError

CHUNK_ROWS = 10_000
TRUE = "true"
FALSE = "false"


class Unrepresentable(ValueError):
    """A source value that has no JSON form (binary, NaN, infinity)."""


def to_json(value: Any) -> str:
    """Canonical JSON text of one source value (never called with None)."""
    if isinstance(value, bool):
        return TRUE if value else FALSE
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise Unrepresentable(f"{value} is not a finite number")
        return json.dumps(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise Unrepresentable(f"{value} is not a finite number")
        return str(int(value)) if value == value.to_integral_value() else json.dumps(float(value))
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return json.dumps(value.isoformat())
    if isinstance(value, uuid.UUID):
        return json.dumps(str(value))
    if isinstance(value, bytes | bytearray | memoryview):
        raise Unrepresentable("binary values cannot be sent")
    raise Unrepresentable(f"values of type {type(value).__name__} cannot be sent")


def user_id_text(value: Any) -> str | None:
    """The user id as text; None for NULL, empty or blank ids (ignored and counted)."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        raise Unrepresentable("user_id is binary")
    result = str(value)
    return result if result.strip() else None


@dataclass
class ReadStats:
    rows: int = 0
    ignored: int = 0
    columns: tuple[str, ...] = ()  # the columns yielded, set before the first chunk


def read_rows(connection: Connection, entry_label: str, query: str,
              columns: tuple[str, ...], optional: tuple[str, ...] = (),
              stats: ReadStats | None = None) -> Iterator[list[tuple[Any, ...]]]:
    """Run `query`, yield chunks of tuples of `columns` (+ those of `optional` present).

    Column names match case-insensitively (warehouses upper-case them). Rows whose
    user_id is NULL or blank are dropped and counted in `stats.ignored`.
    """
    stats = stats if stats is not None else ReadStats()
    try:
        result = connection.execute(text(query),
                                    execution_options={"yield_per": CHUNK_ROWS})
    except SQLAlchemyError as exc:
        raise SourceEntryError(entry_label, f"query failed: {_first_line(exc)}") from None
    with result:
        names = [str(name).lower() for name in result.keys()]  # noqa: SIM118 - a Result, not a dict
        missing = [c for c in columns if c not in names]
        if missing:
            raise SourceEntryError(
                entry_label,
                f"query returned columns ({', '.join(names) or 'none'}) but needs "
                f"{', '.join(missing)}; alias them, e.g. SELECT id AS user_id")
        wanted = list(columns) + [c for c in optional if c in names]
        positions = [names.index(c) for c in wanted]
        stats.columns = tuple(wanted)
        try:
            for partition in result.partitions():
                chunk = []
                for row in partition:
                    values = tuple(row[i] for i in positions)
                    user_id = user_id_text(values[0])
                    if user_id is None:
                        stats.ignored += 1
                        continue
                    chunk.append((user_id, *values[1:]))
                stats.rows += len(chunk)
                yield chunk
        except Unrepresentable as exc:
            raise SourceEntryError(entry_label, str(exc)) from None
        except SQLAlchemyError as exc:
            raise SourceEntryError(entry_label, f"query failed: {_first_line(exc)}") from None


def _first_line(exc: SQLAlchemyError) -> str:
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
