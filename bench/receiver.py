"""A fast loopback webhook receiver, run in its own process.

It speaks just enough HTTP/1.1 (keep-alive, ``Content-Length`` bodies) on asyncio
protocols to answer every ``POST`` with ``200 {}`` (at once, or after a set delay, as
a distant server would), and records each request's arrival time
(``time.monotonic``). Control requests under ``/_ctl/`` reset the record, return
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
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit
from urllib.request import Request, urlopen

from _common import PYTHON, achieved_rate, max_in_window

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
MAX_HEAD = 64 * 1024


class Record:
    """What arrived since the last reset."""

    def __init__(self) -> None:
        self.reset({})

    def reset(self, options: dict[str, list[str]]) -> None:
        """Forget everything; ``keep_bodies=1`` keeps bodies, ``sent_at=1`` parses them,
        ``delay=S`` answers every webhook request S seconds after it arrived."""
        self.arrivals: list[float] = []
        self.bodies: list[bytes] = []
        self.sent_at: list[float] = []
        self.keep_bodies = options.get("keep_bodies") == ["1"]
        self.parse_sent_at = options.get("sent_at") == ["1"]
        self.delay = float(options.get("delay", ["0"])[0])
        self.errors = 0

    def add(self, body: bytes) -> None:
        """Record one webhook request."""
        self.arrivals.append(time.monotonic())
        if self.keep_bodies:
            self.bodies.append(body)
        if self.parse_sent_at:
            try:
                stamp = json.loads(body)["sent_at"]
                self.sent_at.append(datetime.fromisoformat(stamp.replace("Z", "+00:00"))
                                    .timestamp())
            except (ValueError, KeyError, TypeError):
                self.errors += 1

    def stats(self) -> dict[str, Any]:
        """Count, span, achieved rate and one-second-window maxima of what arrived."""
        arrivals = self.arrivals
        return {
            "count": len(arrivals),
            "span_seconds": (arrivals[-1] - arrivals[0]) if arrivals else 0.0,
            "rate": achieved_rate(arrivals),
            "max_per_second": max_in_window(arrivals),
            "sent_at_count": len(self.sent_at),
            "sent_at_rate": achieved_rate(self.sent_at),
            "sent_at_max_per_second": max_in_window(self.sent_at),
            "transit_ms": self.transit_ms(),
            "unparsed_bodies": self.errors,
        }


    def transit_ms(self) -> dict[str, float]:
        """How much later than the fastest one each request arrived after its ``sent_at``.

        The client's clock and ours differ by a constant, so the spread of (arrival -
        sent_at) is what happened between stamping the body and reading it here: the
        client's own delay before writing, and any stall of this process. ``sent_at``
        has millisecond resolution, so a millisecond of it is rounding.
        """
        if not self.sent_at or len(self.sent_at) != len(self.arrivals):
            return {}
        offsets = sorted(a - s for a, s in zip(self.arrivals, self.sent_at, strict=True))
        base = offsets[0]
        return {"p50": round((offsets[len(offsets) // 2] - base) * 1000, 2),
                "p99": round((offsets[int(len(offsets) * 0.99)] - base) * 1000, 2),
                "max": round((offsets[-1] - base) * 1000, 2)}


class HttpProtocol(asyncio.Protocol):
    """One keep-alive connection: parse requests as they complete, answer each at once."""

    def __init__(self, record: Record) -> None:
        self.record = record
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport to write answers to."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        """Answer every complete request in the buffer (pipelined ones in order)."""
        self.buffer += data
        while self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    self.transport.close()
                return
            head = bytes(self.buffer[:end]).decode("latin-1")
            lines = head.split("\r\n")
            headers = {k.strip().lower(): v.strip()
                       for k, _, v in (line.partition(":") for line in lines[1:])}
            length = int(headers.get("content-length", "0"))
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4:end + 4 + length])
            del self.buffer[:end + 4 + length]
            method, target, _ = [*lines[0].split(" "), "", ""][:3]
            delay = 0.0 if target.startswith("/_ctl/") else self.record.delay
            close = headers.get("connection", "").lower() == "close"
            answer = self.answer(method, target, body)
            if delay > 0:  # answers keep their order: every one waits the same time
                asyncio.get_running_loop().call_later(delay, self.write, self.transport,
                                                      answer, close)
            else:
                self.write(self.transport, answer, close)
            if close:
                self.transport = None

    @staticmethod
    def write(transport: asyncio.Transport, answer: bytes, close: bool) -> None:
        """Send one answer (the client may have gone meanwhile); close when asked."""
        if transport.is_closing():
            return
        transport.write(answer)
        if close:
            transport.close()

    def answer(self, method: str, target: str, body: bytes) -> bytes:
        """The response bytes for one request: webhook posts get ``200 {}``."""
        url = urlsplit(target)
        if not url.path.startswith("/_ctl/"):
            if method == "POST":
                self.record.add(body)
            return OK
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
        return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(data)).encode() + b"\r\n\r\n" + data)


async def serve(port: int) -> None:
    """Serve on 127.0.0.1:``port`` (0 = any free port), print the port, run until stdin closes."""
    record = Record()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: HttpProtocol(record), "127.0.0.1", port,
                                      backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    # The parent holds our stdin open; when it goes (even killed), we go too.
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()
    server.close()


class Receiver:
    """A receiver subprocess on 127.0.0.1: ``with Receiver() as r: ... r.url ...``."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([str(PYTHON), str(Path(__file__))], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/hook"

    def _control(self, path: str) -> Any:
        """GET one control path and decode its JSON answer."""
        with urlopen(Request(self.base + path), timeout=120) as response:
            return json.loads(response.read())

    def reset(self, *, keep_bodies: bool = False, sent_at: bool = False,
              delay: float = 0.0) -> None:
        """Forget what arrived; optionally keep bodies, parse their ``sent_at``, or answer
        each webhook request ``delay`` seconds after it arrived."""
        self._control(f"/_ctl/reset?keep_bodies={int(keep_bodies)}&sent_at={int(sent_at)}"
                      f"&delay={delay!r}")

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

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


async def _raw_client(port: int, requests: int, connections: int) -> float:
    """Post ``requests`` small bodies over ``connections`` keep-alive sockets; seconds taken."""
    body = json.dumps({"type": "Send Contact", "user_id": "user-0000001",
                       "custom": [{"key": "trait", "value": 1.5}]}).encode()
    request = (b"POST /hook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
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
    return {"requests": stats["count"], "seconds": round(seconds, 3),
            "client_rate": round(stats["count"] / seconds),
            "receiver_rate": round(stats["rate"])}


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
