"""One run at a time per state database (SPEC §6).

The lock is the single row of `run_lock`, naming its holder by host, process id and
process start time (a reused pid is not mistaken for the holder). It is taken over at
once when its holder's process is gone from this host, or when its 60-second lease,
renewed by a thread while the run lives, has expired (holders on other hosts).
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from .errors import LockHeld
from .schema import run_lock

LEASE = timedelta(seconds=60)
RENEW_EVERY = 15.0


def process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after it.
    return stat.rsplit(")", 1)[1].split()[19]


def holder_is_alive(host: str, pid: int, pid_started: str, now: datetime,
                    lease_until: datetime) -> bool:
    """Whether a recorded holder still holds the lock."""
    if lease_until <= now:
        return False
    if host == socket.gethostname() and Path("/proc/self/stat").exists():
        return process_start(pid) == pid_started
    return True


@dataclass
class Holder:
    host: str
    pid: int
    since: datetime


class RunLock:
    """The lock held by this process; a context manager that renews and releases it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.token = uuid.uuid4().hex
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock or raise `LockHeld` naming the holder."""
        me_pid = os.getpid()
        row_values = {"token": self.token, "host": socket.gethostname(), "pid": me_pid,
                      "pid_started": process_start(me_pid) or "", "run_id": None}
        for _ in range(3):
            now = datetime.now(UTC)
            values = {**row_values, "acquired_at": now, "lease_until": now + LEASE}
            with self.engine.begin() as conn:
                row = conn.execute(select(run_lock).where(run_lock.c.id == 1)).first()
                if row is None:
                    try:
                        with conn.begin_nested():
                            conn.execute(insert(run_lock).values(id=1, **values))
                    except IntegrityError:
                        continue
                    break
                if holder_is_alive(row.host, row.pid, row.pid_started, now, row.lease_until):
                    raise LockHeld(
                        f"another run holds the lock: host {row.host}, pid {row.pid}, "
                        f"since {row.acquired_at.isoformat(timespec='seconds')}; "
                        "wait for it to finish")
                taken = conn.execute(update(run_lock).where(
                    run_lock.c.id == 1, run_lock.c.token == row.token).values(**values))
                if taken.rowcount == 1:
                    break
        else:
            raise LockHeld("another run is taking the lock at this moment; try again")
        self._thread = threading.Thread(target=self._renew, name="lock-lease", daemon=True)
        self._thread.start()

    def set_run(self, run_id: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(run_lock).where(run_lock.c.token == self.token)
                         .values(run_id=run_id))

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_EVERY):
            try:
                with self.engine.begin() as conn:
                    renewed = conn.execute(update(run_lock).where(
                        run_lock.c.token == self.token).values(
                        lease_until=datetime.now(UTC) + LEASE))
                if renewed.rowcount != 1:
                    self.lost.set()
                    return
            except SQLAlchemyError:  # retried next period; the lease is 4 periods
                continue

    def release(self) -> None:
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
