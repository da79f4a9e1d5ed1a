"""One run at a time per state database (SPEC §6), on SQLite and PostgreSQL alike.

The lock is the single row of `run_lock`, naming its holder by host, process id and
process start time. A holder is gone, and the lock taken over at once, when

    its 60-second lease has expired (renewed every 15 s by a thread while the run
    lives; this covers holders on other hosts), or
    it is on this host and no process with its pid and start time exists (a killed
    run never blocks the next one; a reused pid is not mistaken for the holder).

Taking the lock is a compare-and-swap on the row's token, each statement in its own
short transaction: two processes racing for a dead holder's lock cannot both win,
and a live holder is reported without writing anything (so never waits on a
SQLite writer). A holder whose renewal finds another token, or that cannot renew
before its lease runs out, has lost the lock: `lost` is set and the run stops sending.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from reconciler.errors import LockHeld
from reconciler.state.backend import Backend
from reconciler.state.schema import run_lock

LEASE = timedelta(seconds=60)
RENEW_EVERY = 15.0
ATTEMPTS = 5  # compare-and-swap rounds lost to other starters before giving up


def process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after it.
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def holder_is_alive(
    host: str, pid: int, pid_started: str, now: datetime, lease_until: datetime
) -> bool:
    """Whether a recorded holder still holds the lock."""
    if lease_until <= now:
        return False
    if host == socket.gethostname() and Path("/proc/self/stat").exists():
        return process_start(pid) == pid_started
    return True  # another host (or no /proc): only the lease can tell


def database_now(conn: Connection) -> datetime:
    """The time leases are judged by: the server's clock on PostgreSQL (shared by every
    host), this machine's on SQLite (a file database lives on one host)."""
    return Backend(conn).server_now()


class RunLock:
    """The lock as held by this process; a context manager that renews and releases it."""

    def __init__(
        self, engine: Engine, *, renew_every: float = RENEW_EVERY, lease: timedelta = LEASE
    ) -> None:
        self.engine = engine
        self.token = uuid.uuid4().hex
        self.renew_every, self.lease = renew_every, lease
        self.lost = threading.Event()
        self._lease_until: datetime | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock and start renewing it, or raise `LockHeld` naming the holder."""
        pid = os.getpid()
        me = {
            "token": self.token,
            "host": socket.gethostname(),
            "pid": pid,
            "pid_started": process_start(pid) or "",
            "run_id": None,
        }
        for _ in range(ATTEMPTS):
            with self.engine.begin() as conn:
                now = database_now(conn)
                row = conn.execute(select(run_lock).where(run_lock.c.id == 1)).first()
            if row is not None and holder_is_alive(
                row.host, row.pid, row.pid_started, now, row.lease_until
            ):
                raise LockHeld(_held_message(row))
            if self._take(me, row.token if row is not None else None):
                break
        else:
            raise LockHeld("another run is taking the lock at this moment; try again")
        self._thread = threading.Thread(
            target=self._renew_until_released, name="lock-lease", daemon=True
        )
        self._thread.start()

    def _take(self, me: dict[str, Any], old_token: str | None) -> bool:
        """Insert the row, or swap out `old_token`'s; False if another process won."""
        try:
            with self.engine.begin() as conn:
                now = database_now(conn)
                values = {**me, "acquired_at": now, "lease_until": now + self.lease}
                if old_token is None:
                    conn.execute(insert(run_lock).values(id=1, **values))
                else:
                    swapped = conn.execute(
                        update(run_lock)
                        .where(run_lock.c.id == 1, run_lock.c.token == old_token)
                        .values(**values)
                    )
                    if swapped.rowcount != 1:
                        return False
        except IntegrityError:
            return False  # another process inserted first
        self._lease_until = values["lease_until"]
        return True

    def set_run(self, run_id: int) -> None:
        """Name the run this lock protects (shown to whoever finds it held)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(run_lock).where(run_lock.c.token == self.token).values(run_id=run_id)
            )

    def renew(self) -> bool:
        """Extend the lease; False (and `lost` set) once the lock is no longer ours.

        A database error is not a loss by itself, unless the lease ran out meanwhile:
        another run may have taken over by then.
        """
        try:
            with self.engine.begin() as conn:
                now = database_now(conn)
                renewed = conn.execute(
                    update(run_lock)
                    .where(run_lock.c.token == self.token)
                    .values(lease_until=now + self.lease)
                )
                if renewed.rowcount == 1:
                    self._lease_until = now + self.lease
                    return True
        except SQLAlchemyError:
            if self._lease_until is not None and datetime.now(UTC) < self._lease_until:
                return True
        self.lost.set()
        return False

    def _renew_until_released(self) -> None:
        while not self._stop.wait(self.renew_every):
            if not self.renew():
                return

    def release(self) -> None:
        """Stop renewing and delete the row if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self.engine.begin() as conn:
            conn.execute(delete(run_lock).where(run_lock.c.token == self.token))

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


def _held_message(row: Any) -> str:
    run = f", run {row.run_id}" if row.run_id is not None else ""
    since = row.acquired_at.astimezone(UTC).isoformat(timespec="seconds")
    return (
        f"another run holds the lock: host {row.host}, pid {row.pid}{run}, since "
        f"{since}; wait for it to finish"
    )
