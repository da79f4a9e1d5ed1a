"""Run one command; write its wall time, CPU time, peak RSS and exit status to a JSON file.

Usage: ``python -I -S bench/_measure.py RESULT_FILE COMMAND [ARGS...]``

Why a wrapper: Linux carries a process's peak RSS across ``exec`` (``signal->maxrss``
takes the pre-exec high-water mark), so a command spawned straight from the harness,
which grows to hold bodies and results, reports at least the harness's RSS. Spawned
from this small interpreter (stdlib only, no ``site``), the command's ``ru_maxrss`` is
its own, or this wrapper's ~10 MB if that were larger. Exits with the command's status.

The file also holds the wall-clock (``time.time``) instants of the spawn and the reap,
on the clock of the receiver's kernel arrival stamps, so that a section can tell the
time before a command's first request and after its last one.
"""

import os
import sys
import time


def main() -> int:
    """Spawn the command, reap it with ``wait4``, record what it cost."""
    result, argv = sys.argv[1], sys.argv[2:]
    started_at = time.time()
    start = time.perf_counter()
    pid = os.posix_spawnp(argv[0], argv, os.environ)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - start
    ended_at = time.time()
    code = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    with open(result, "w") as out:
        out.write(
            f'{{"seconds": {seconds!r}, "cpu_seconds": {cpu!r}, '
            f'"maxrss_kb": {usage.ru_maxrss}, "returncode": {code}, '
            f'"started_at": {started_at!r}, "ended_at": {ended_at!r}}}'
        )
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
