"""Every error reconciler raises on purpose, in one tree.

    ReconcilerError                 exit_status, one-line message for the CLI
    ├── ConfigError (2)             a config file or option is wrong: names file, entry, fix
    ├── UsageError (2)              a command-line argument is wrong (unknown run id, key)
    ├── LockHeld (3)                another run holds the lock: names host, pid and since
    ├── RunHalted (4)               the safety guard (SPEC §10) stopped a run before anything
    │                               of it was kept or sent: names every audience that tripped,
    │                               its numbers and the command that proceeds
    └── RunFailed (1)               a run could not finish; nothing was sent
        ├── DatabaseError           the state or source database is unreachable or failing,
        │                           or a query failed on it: names which database (URL
        │                           without password), the entry if any, and why
        └── SourceEntryError        one audience/trait/profile query ran but returned
                                    unusable data: names the entry and one offending user

`RunHalted` never reaches the CLI from `run.sync`: the run catches it and returns its
result with status `halted`, so the daemon and `--json` see the counts; it exists so
the planning phase can stop the run in one place.

A `SourceEntryError` for an audience or trait fails only that entry: the run goes on
without its key and ends `partial`. Everything else ends the run (or stops it from
starting). The CLI turns each into its message on one line and its exit status, never
a traceback. Messages are secret-free: URLs pass through `redact` before they get here.
"""

from __future__ import annotations


class ReconcilerError(Exception):
    """Base class: `str(error)` is the one line shown to the user."""

    exit_status = 1


class ConfigError(ReconcilerError):
    """The configuration is invalid; nothing has run or been written."""

    exit_status = 2

    def __init__(self, path: str, entry: str, problem: str, fix: str = "") -> None:
        self.path, self.entry, self.problem, self.fix = path, entry, problem, fix
        message = f"{path}: {entry}: {problem}"
        if fix:
            message += f"; {fix}"
        super().__init__(message)


class UsageError(ReconcilerError):
    """A command-line argument names something that does not exist."""

    exit_status = 2


class LockHeld(ReconcilerError):
    """Another run holds the state database's lock."""

    exit_status = 3


class RunHalted(ReconcilerError):
    """The safety guard found an audience losing too many members; nothing was kept.

    `verdict` is the guard's `Verdict` (typed loosely: errors import nothing of ours).
    """

    exit_status = 4

    def __init__(
        self,
        message: str,
        verdict: object,
        *,
        users_seen: int = 0,
        rows_ignored: int = 0,
        pending: int = 0,
    ) -> None:
        self.verdict = verdict
        # What the halted run saw, for its result: it planned nothing.
        self.users_seen, self.rows_ignored, self.pending = users_seen, rows_ignored, pending
        super().__init__(message)


class RunFailed(ReconcilerError):
    """A run could not complete; acknowledged state is unchanged by the failure."""

    exit_status = 1


class DatabaseError(RunFailed):
    """The state or source database could not be used."""


class SourceEntryError(RunFailed):
    """One config entry's query failed or returned unusable rows."""

    def __init__(self, entry: str, problem: str) -> None:
        self.entry, self.problem = entry, problem
        super().__init__(f"{entry}: {problem}")
