"""Running `reconciler` as a real process, the way systemd or an operator does."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from reconciler.state.schema import sync_runs

from .helpers import clean_env

RECONCILER = str(Path(sys.executable).parent / "reconciler")
# Generous: these bound a wait for something that normally takes well under a second.
PATIENCE = 60.0


def wait_for(what: str, predicate: Callable[[], Any], process: Daemon | None = None) -> Any:
    """Poll until `predicate()` is truthy; fail naming `what` (and the daemon's log)."""
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and process.proc.poll() is not None:
            raise AssertionError(
                f"daemon exited ({process.proc.returncode}) before {what}:\n{process.log()}"
            )
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}" + (f":\n{process.log()}" if process else ""))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Daemon:
    """`reconciler daemon --config FILE` in a subprocess, stderr kept in a file."""

    def __init__(self, config: Path, *args: str) -> None:
        self.stderr_path = config.with_suffix(".stderr")
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [RECONCILER, "daemon", "--config", str(config), *args],
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            env=clean_env(),
        )

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Send `signum` and wait for the exit status."""
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(PATIENCE)
        finally:
            self._stderr.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


def finished_runs(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return conn.execute(
            select(sync_runs).where(sync_runs.c.status != "running").order_by(sync_runs.c.id)
        ).all()


def all_runs(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return conn.execute(select(sync_runs).order_by(sync_runs.c.id)).all()


def poll_until(condition: Callable[[], Any], timeout: float) -> bool:
    """Poll `condition` every 5 ms for at most `timeout` seconds; whether it came true."""
    for _ in range(int(timeout / 0.005)):
        if condition():
            return True
        time.sleep(0.005)
    return False
