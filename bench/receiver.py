"""A fast loopback webhook receiver, run in its own process.

It speaks just enough HTTP/1.1 (keep-alive, ``Content-Length`` bodies) on an asyncio
loop to answer every ``POST`` with ``200 {}`` (at once, or after a set delay, as a
distant server would), and records each request's arrival time as the kernel stamped
it (``SO_TIMESTAMPNS`` on Linux, else the time it was read): on a busy machine this
process may wait milliseconds for a CPU, and a request stamped only when read would
seem to arrive late. Control requests under ``/_ctl/`` reset the record, return
statistics (count, achieved rate, the most requests in any one-second window, by arrival
and by the bodies' ``sent_at``) and hand back the recorded bodies.

``Receiver`` starts one on a free port of 127.0.0.1 and stops it. Run
``python bench/receiver.py --selftest`` to measure its throughput with a raw asyncio
client (20 keep-alive connections).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import subprocess
import sys
import time
from contextlib import suppress
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit
from urllib.request import Request, urlopen

from _common import PYTHON, achieved_rate, max_in_window

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
MAX_HEAD = 64 * 1024


def answer_with(status: int) -> bytes:
    """A webhook answer with this status and an empty JSON object."""
    return f"HTTP/1.1 {status} Status\r\nContent-Type: application/json\r\n".encode() + (
        b"Content-Length: 2\r\n\r\n{}"
    )


class Record:
    """What arrived since the last reset."""

    def __init__(self) -> None:
        self.reset({})

    def reset(self, options: dict[str, list[str]]) -> None:
        """Forget everything; ``keep_bodies=1`` keeps bodies, ``sent_at=1`` parses them,
        ``delay=S`` answers every webhook request S seconds after it arrived, ``status=N``
        answers it with that status (200 unless told)."""
        self.arrivals: list[float] = []
        self.bodies: list[bytes] = []
        self.sent_at: list[float] = []
        self.keep_bodies = options.get("keep_bodies") == ["1"]
        self.parse_sent_at = options.get("sent_at") == ["1"]
        self.delay = float(options.get("delay", ["0"])[0])
        status = int(options.get("status", ["200"])[0])
        self.answer = OK if status == 200 else answer_with(status)
        self.errors = 0

    def add(self, body: bytes, at: float) -> None:
        """Record one webhook request that arrived at ``at`` (seconds since the epoch)."""
        self.arrivals.append(at)
        if self.keep_bodies:
            self.bodies.append(body)
        if self.parse_sent_at:
            try:
                stamp = json.loads(body)["sent_at"]
                self.sent_at.append(
                    datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
                )
            except (ValueError, KeyError, TypeError):
                self.errors += 1

    def stats(self) -> dict[str, Any]:
        """Count, span, achieved rate and one-second-window maxima of what arrived."""
        arrivals = self.arrivals
        return {
            "count": len(arrivals),
            "span_seconds": (arrivals[-1] - arrivals[0]) if arrivals else 0.0,
            "first_arrival": min(arrivals, default=None),
            "last_arrival": max(arrivals, default=None),
            "rate": achieved_rate(arrivals),
            "max_per_second": max_in_window(arrivals),
            "sent_at_count": len(self.sent_at),
            "sent_at_rate": achieved_rate(self.sent_at),
            "sent_at_max_per_second": max_in_window(self.sent_at),
            "transit_ms": self.transit_ms(),
            "unparsed_bodies": self.errors,
        }

    def transit_ms(self) -> dict[str, float]:
        """Milliseconds from each body's ``sent_at`` to its arrival: median, p99, max.

        One machine, one clock: this is what happened between the client stamping the
        body and the kernel receiving it (mostly the client's own delay before writing).
        ``sent_at`` is cut to the millisecond, so up to 1 ms of it is rounding.
        """
        if not self.sent_at or len(self.sent_at) != len(self.arrivals):
            return {}
        transit = sorted(a - s for a, s in zip(self.arrivals, self.sent_at, strict=True))
        return {
            "p50": round(transit[len(transit) // 2] * 1000, 2),
            "p99": round(transit[int(len(transit) * 0.99)] * 1000, 2),
            "max": round(transit[-1] * 1000, 2),
        }


# Linux: the kernel's receive time of each segment, as a struct timespec.
SO_TIMESTAMPNS = 35 if sys.platform.startswith("linux") else None
_TIMESPEC = struct.Struct("@qq")


class HttpConnection:
    """One keep-alive connection: parse requests as they complete, answer each one."""

    def __init__(
        self, sock: socket.socket, record: Record, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.sock, self.record, self.loop = sock, record, loop
        self.buffer = bytearray()
        self.out = bytearray()
        self.open = True
        self.closing = False  # close once everything queued is sent
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.stamped = False
        if SO_TIMESTAMPNS is not None:
            with suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                self.stamped = True
        loop.add_reader(sock, self.readable)

    def readable(self) -> None:
        """Read what arrived, with the kernel's time stamp when there is one."""
        try:
            data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(16))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, ancillary = b"", []
        if not data:
            self.close()
            return
        at = time.time()
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
                seconds, nanoseconds = _TIMESPEC.unpack(value[:16])
                at = seconds + nanoseconds / 1e9
        self.data_received(data, at)

    def write(self, data: bytes) -> None:
        """Queue ``data`` and send what the socket takes now."""
        if not self.open:
            return
        self.out += data
        self.flush()

    def flush(self) -> None:
        try:
            sent = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        del self.out[:sent]
        if self.out:
            self.loop.add_writer(self.sock, self.flush)
        else:
            self.loop.remove_writer(self.sock)
            if self.closing:
                self.close()

    def close(self) -> None:
        if self.open:
            self.open = False
            self.loop.remove_reader(self.sock)
            self.loop.remove_writer(self.sock)
            self.sock.close()

    def data_received(self, data: bytes, at: float) -> None:
        """Answer every complete request in the buffer (pipelined ones in order)."""
        self.buffer += data
        while self.open:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    self.close()
                return
            head = bytes(self.buffer[:end]).decode("latin-1")
            lines = head.split("\r\n")
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:])
            }
            length = int(headers.get("content-length", "0"))
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            method, target, _ = [*lines[0].split(" "), "", ""][:3]
            delay = 0.0 if target.startswith("/_ctl/") else self.record.delay
            close = headers.get("connection", "").lower() == "close"
            answer = self.answer(method, target, body, at)
            if delay > 0:  # answers keep their order: every one waits the same time
                self.loop.call_later(delay, self.reply, answer, close)
            else:
                self.reply(answer, close)
            if close:
                return

    def reply(self, answer: bytes, close: bool) -> None:
        """Send one answer (the client may have gone meanwhile); close when asked."""
        self.closing = self.closing or close
        self.write(answer)

    def answer(self, method: str, target: str, body: bytes, at: float) -> bytes:
        """The response bytes for one request: webhook posts get ``200 {}``."""
        url = urlsplit(target)
        if not url.path.startswith("/_ctl/"):
            if method == "POST":
                self.record.add(body, at)
            return self.record.answer
        payload: Any
        if url.path == "/_ctl/reset":
            self.record.reset(parse_qs(url.query))
            payload = {"reset": True}
        elif url.path == "/_ctl/stats":
            payload = self.record.stats()
        elif url.path == "/_ctl/bodies":
            payload = [b.decode("utf-8", "replace") for b in self.record.bodies]
        else:
            payload = {"error": "unknown control path"}
        data = json.dumps(payload).encode()
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(data)).encode()
            + b"\r\n\r\n"
            + data
        )


async def serve(port: int) -> None:
    """Serve on 127.0.0.1:``port`` (0 = any free port), print the port, run until stdin closes."""
    record = Record()
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", port), backlog=1024)
    listener.setblocking(False)

    def accept() -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            HttpConnection(sock, record, loop)

    loop.add_reader(listener, accept)
    print(listener.getsockname()[1], flush=True)
    # The parent holds our stdin open; when it goes (even killed), we go too.
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()
    loop.remove_reader(listener)
    listener.close()


class Receiver:
    """A receiver subprocess on 127.0.0.1: ``with Receiver() as r: ... r.url ...``."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [str(PYTHON), str(Path(__file__))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/hook"

    def _control(self, path: str) -> Any:
        """GET one control path and decode its JSON answer."""
        with urlopen(Request(self.base + path), timeout=120) as response:
            return json.loads(response.read())

    def reset(
        self,
        *,
        keep_bodies: bool = False,
        sent_at: bool = False,
        delay: float = 0.0,
        status: int = 200,
    ) -> None:
        """Forget what arrived; optionally keep bodies, parse their ``sent_at``, answer
        each webhook request ``delay`` seconds after it arrived, or with ``status``."""
        self._control(
            f"/_ctl/reset?keep_bodies={int(keep_bodies)}&sent_at={int(sent_at)}&delay={delay!r}"
            f"&status={int(status)}"
        )

    def stats(self) -> dict[str, Any]:
        """Statistics of what arrived since the last reset (see ``Record.stats``)."""
        result: dict[str, Any] = self._control("/_ctl/stats")
        return result

    def bodies(self) -> list[str]:
        """The bodies kept since the last ``reset(keep_bodies=True)``."""
        result: list[str] = self._control("/_ctl/bodies")
        return result

    def close(self) -> None:
        """Stop the subprocess: close its stdin, then kill it if it lingers."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def _raw_client(port: int, requests: int, connections: int) -> float:
    """Post ``requests`` small bodies over ``connections`` keep-alive sockets; seconds taken."""
    body = json.dumps(
        {
            "type": "Send Contact",
            "user_id": "user-0000001",
            "custom": [{"key": "trait", "value": 1.5}],
        }
    ).encode()
    request = (
        b"POST /hook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    per_connection = requests // connections

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(per_connection):
            writer.write(request)
            await reader.readuntil(b"{}")
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(connections)))
    return time.perf_counter() - start


def selftest(requests: int, connections: int) -> dict[str, Any]:
    """Measure the receiver's throughput with a raw asyncio client in this process."""
    with Receiver() as receiver:
        receiver.reset()
        seconds = asyncio.run(_raw_client(receiver.port, requests, connections))
        stats = receiver.stats()
    return {
        "requests": stats["count"],
        "seconds": round(seconds, 3),
        "client_rate": round(stats["count"] / seconds),
        "receiver_rate": round(stats["rate"]),
    }


def main() -> None:
    """Command line: serve (the default), or ``--selftest`` to measure throughput."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--selftest", action="store_true")
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--connections", type=int, default=20)
    args = parser.parse_args()
    if args.selftest:
        print(json.dumps(selftest(args.requests, args.connections)))
    else:
        asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
