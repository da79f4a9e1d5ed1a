"""A real HTTP server on 127.0.0.1 standing in for the ChartMogul webhook.

It records every request (path, headers, parsed JSON body, arrival time) and answers
from a script: a callable `respond(request_number, body) -> Reply`, default 200.

`held` models what ChartMogul holds: each applied body's custom attributes, last
write wins per (user, key). A reply says whether its body is applied (by default,
when its status is 2xx, a dropped 200 included) and can run a hook after applying and
before answering: kill the client (applied, never acknowledged), or block on an event
the test sets once the client gave up (applied, answered after the client's timeout).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HOLD_LIMIT = 60.0


@dataclass
class Reply:
    status: int = 200
    body: str = "ok"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering
    drop: bool = False  # close the connection without answering
    apply: bool | None = None  # the body takes effect in `held`; None: if 2xx
    then: Callable[[], object] | None = None  # after applying, before answering

    @property
    def applies(self) -> bool:
        return self.apply if self.apply is not None else 200 <= self.status < 300

    # Answer only once this event is set (at most HOLD_LIMIT seconds): orders requests
    # across threads without guessing how long anything takes.
    hold: threading.Event | None = None


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float
    status: int
    applied: bool = False


class Receiver:
    def __init__(self, respond: Callable[[int, dict[str, Any]], Reply] | None = None) -> None:
        self.respond = respond or (lambda _n, _b: Reply())
        self.requests: list[Received] = []
        self.held: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Without it every response waits ~40 ms for a delayed ACK.
            disable_nagle_algorithm = True

            def handle(self) -> None:
                # The client may go away (killed, or gave up) between requests.
                with contextlib.suppress(ConnectionError):
                    super().handle()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                if len(raw) < length:
                    # The client died mid-request: nothing arrived that could be processed.
                    self.close_connection = True
                    return
                body = json.loads(raw)
                with receiver._lock:
                    number = len(receiver.requests) + 1
                    reply = receiver.respond(number, body)
                    receiver.requests.append(
                        Received(
                            self.path,
                            dict(self.headers),
                            body,
                            time.monotonic(),
                            reply.status,
                            reply.applies,
                        )
                    )
                    if reply.applies:
                        receiver.held.setdefault(str(body.get("user_id", "")), {}).update(
                            {item["key"]: item["value"] for item in body.get("custom", [])}
                        )
                if reply.then is not None:
                    reply.then()
                if reply.hold is not None:
                    reply.hold.wait(HOLD_LIMIT)
                if reply.delay:
                    time.sleep(reply.delay)
                try:
                    if reply.drop:
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    data = reply.body.encode()
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    # The client is gone (it gave up, or was killed): nobody to answer.
                    self.close_connection = True

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        # A short poll: shutdown() waits for it at every test's teardown.
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/hook/s3cr3t-token"

    def start(self) -> Receiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def bodies(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.body for r in self.requests]

    def by_user(self) -> dict[str, list[dict[str, Any]]]:
        result: dict[str, list[dict[str, Any]]] = {}
        for body in self.bodies():
            result.setdefault(body.get("user_id", ""), []).append(body)
        return result

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def holds(self) -> dict[str, dict[str, Any]]:
        """A copy of `held`: per user, the last applied value of each key."""
        with self._lock:
            return {user: dict(values) for user, values in self.held.items()}
