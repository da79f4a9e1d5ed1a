"""The safety guard (SPEC §10): halt a run that would empty an audience.

`check` runs on the run's connection after the diff and before anything of the run is
made durable. For every guarded audience key it counts

    members   acknowledged members: `acked` rows of the key whose value is `true`;
    exits     acknowledged members this run would newly tell ChartMogul left: rows of
              the temp `diff` table for the key going from `true` (acknowledged) to
              `false`, other than exits an earlier run already planned and that are
              still pending (they passed the guard, or were accepted, when planned).

and the audience trips when it has at least `min_members` members and its exits exceed
`max_exit_share` of them. Updates kept as they are (`kept`) have left the diff and are
not counted; an exit re-planned because its user's update changed is not counted
again either. Corrections of uncertain keys count only where ChartMogul acknowledged
the member (`true`). A resync is counted the same way: it re-sends `false` for
acknowledged members absent now, and those are its exits.

The guard is blind to what kind of entity an audience holds (contacts or accounts):
it counts by key, and keys are one namespace across both. Nothing here writes.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from sqlalchemy import Connection, bindparam, text

from reconciler.config import Config, Safety
from reconciler.errors import UsageError
from reconciler.pipeline.source import FALSE, TRUE

ALL = "all"  # `--accept-exits all`: every audience


def audience_keys(config: Config) -> list[str]:
    """The keys the guard watches: every configured audience, user or account level."""
    return [e.key for e in config.entries if e.kind.endswith("audience")]


def resolve_accepted(config: Config, requested: Sequence[str]) -> frozenset[str]:
    """The keys of `--accept-exits` (`all` for every audience); UsageError if unknown."""
    keys = audience_keys(config)
    if ALL in requested:
        return frozenset(keys)
    unknown = [key for key in requested if key not in keys]
    if unknown:
        raise UsageError(
            f'--accept-exits: unknown audience key "{unknown[0]}"; audience '
            f"keys: {', '.join(keys) or 'none'} (or all)"
        )
    return frozenset(requested)


@dataclass(frozen=True)
class Trip:
    """One audience that would lose more than the share of its acknowledged members."""

    key: str
    exits: int
    members: int

    @property
    def percent(self) -> int:
        """Rounded down, so 100 means every member; never 0 when someone leaves."""
        return max(self.exits * 100 // self.members, 1 if self.exits else 0)

    def describe(self) -> str:
        return (
            f"{self.key} would lose {self.exits} of {self.members} acknowledged members "
            f"({self.percent} %)"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "exits": self.exits,
            "members": self.members,
            "percent": self.percent,
        }


@dataclass(frozen=True)
class Verdict:
    """What the guard found: audiences that halt the run, and those accepted anyway."""

    max_exit_share: float = 1.0
    min_members: int = 1
    tripped: tuple[Trip, ...] = ()
    accepted: tuple[Trip, ...] = ()  # would have tripped; `--accept-exits` let them through

    @property
    def halted(self) -> bool:
        return bool(self.tripped)

    def explanation(self, command: str = "reconciler sync") -> str:
        """`<key> would lose N of M acknowledged members (P %)[, ...]; check ..., or run
        <command> --accept-exits <key> [--accept-exits <key> ...]`."""
        which = "its query" if len(self.tripped) == 1 else "their queries"
        accept = " ".join(f"--accept-exits {t.key}" for t in self.tripped)
        return (
            ", ".join(t.describe() for t in self.tripped)
            + f"; check {which}, or run {command} {accept}"
        )

    def message(self, command: str = "reconciler sync") -> str:
        """The `error` of a halted run (SPEC §10)."""
        return f"halted: {self.explanation(command)}"

    def as_dict(self, command: str = "reconciler sync") -> dict[str, Any]:
        return {
            "halted": self.halted,
            "max_exit_share": self.max_exit_share,
            "min_members": self.min_members,
            "tripped": [t.as_dict() for t in self.tripped],
            "accepted": [t.as_dict() for t in self.accepted],
            "message": self.message(command) if self.halted else None,
        }


def proceed_command(trigger: str, resync_label: str | None) -> str:
    """The command a halted run's message tells the user to run with --accept-exits."""
    if trigger != "full_resync":
        return "reconciler sync"
    if resync_label and resync_label != "*":
        return f"reconciler resync --audience {resync_label}"
    return "reconciler resync"


def check(
    state: Connection, safety: Safety, keys: Collection[str], accepted: Collection[str] = ()
) -> Verdict:
    """Judge the diff on `state` (its temp `diff` table) against `acked`; reads only."""
    empty = Verdict(safety.max_exit_share, safety.min_members)
    share = Fraction(str(safety.max_exit_share))  # exact: 0.57 * 100 is 57, not 56.99...
    if share >= 1 or not keys:
        return empty  # exits never exceed members: the guard is off
    exits = _exits(state, sorted(keys))
    # An audience below min_members is not guarded, so only exits above the share of
    # min_members can trip: the common run (few exits) never counts members at all.
    candidates = sorted(key for key, count in exits.items() if count > share * safety.min_members)
    if not candidates:
        return empty
    members = _members(state, candidates)
    over = [
        Trip(key, exits[key], members.get(key, 0))
        for key in candidates
        if members.get(key, 0) >= safety.min_members and exits[key] > share * members[key]
    ]
    return Verdict(
        safety.max_exit_share,
        safety.min_members,
        tripped=tuple(t for t in over if t.key not in accepted),
        accepted=tuple(t for t in over if t.key in accepted),
    )


def _exits(state: Connection, keys: list[str]) -> dict[str, int]:
    rows = state.execute(
        text(f"""
        SELECT d.key, COUNT(*) FROM diff AS d
        WHERE d.key IN :keys AND d.new_value = '{FALSE}' AND d.old_value = '{TRUE}'
          AND NOT EXISTS (
            SELECT 1 FROM changes AS c JOIN updates AS u ON u.id = c.update_id
            WHERE c.user_id = d.user_id AND c.key = d.key AND c.new_value = '{FALSE}'
              AND u.status = 'pending')
        GROUP BY d.key
    """).bindparams(bindparam("keys", expanding=True)),
        {"keys": keys},
    )
    return {str(key): int(count) for key, count in rows}


def _members(state: Connection, keys: list[str]) -> dict[str, int]:
    rows = state.execute(
        text(f"""
        SELECT key, COUNT(*) FROM acked WHERE key IN :keys AND value = '{TRUE}'
        GROUP BY key
    """).bindparams(bindparam("keys", expanding=True)),
        {"keys": keys},
    )
    return {str(key): int(count) for key, count in rows}
