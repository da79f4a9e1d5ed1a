"""The raw httpx senders that the reconciler's sending is compared with.

Two baselines post the same JSON bodies to the same URL, nothing else: no retries, no
pacing, no database:

``sequential``: one ``httpx.Client``, one request after another on a keep-alive connection;
``async``:      one ``httpx.AsyncClient``, ``--concurrency`` workers (default 20) sharing it;
``threads``:    ``--concurrency`` threads, each posting through its own ``httpx.Client``
                (the baseline for a slow receiver, where one connection cannot keep up).

Bodies come from a file (a JSON array of body strings, as the receiver hands back what
the reconciler sent) or are synthesised in the Send Contact shape (SPEC §5). Prints one
JSON object: requests, seconds, rate, non-2xx answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

HEADERS = {"Content-Type": "application/json"}
TIMEOUT = httpx.Timeout(10.0)


@dataclass(frozen=True)
class SendResult:
    """One baseline run: how many bodies, how long, how many were not answered 2xx."""

    mode: str
    requests: int
    seconds: float
    failed: int

    @property
    def rate(self) -> float:
        """Requests per second over the whole send."""
        return self.requests / self.seconds if self.seconds else 0.0


def synthetic_bodies(count: int) -> list[bytes]:
    """``count`` bodies shaped like the reconciler's (SPEC §5), one user each."""
    stamp = "2024-01-01T00:00:00.000Z"
    return [
        json.dumps(
            {
                "type": "Send Contact",
                "message_id": f"{i:032x}",
                "timestamp": stamp,
                "sent_at": stamp,
                "user_id": f"user-{i:07d}",
                "email": f"ada.lovelace.{i}@example.com",
                "first_name": "Ada",
                "last_name": "Lovelace",
                "company": {"id": str(i % 5000), "name": f"Company {i % 5000}"},
                "custom": [
                    {"key": "high_value_users", "value": True},
                    {"key": "lifetime_value", "value": 1234.5},
                ],
            },
            separators=(",", ":"),
        ).encode()
        for i in range(count)
    ]


def load_bodies(path: Path) -> list[bytes]:
    """Bodies from a JSON array of strings."""
    return [body.encode() for body in json.loads(path.read_text())]


def send_sequential(url: str, bodies: list[bytes]) -> SendResult:
    """Post every body in turn through one ``httpx.Client``."""
    failed = 0
    with httpx.Client(timeout=TIMEOUT, headers=HEADERS) as client:
        start = time.perf_counter()
        for body in bodies:
            if not client.post(url, content=body).is_success:
                failed += 1
        seconds = time.perf_counter() - start
    return SendResult("sequential", len(bodies), seconds, failed)


async def send_concurrent(url: str, bodies: list[bytes], concurrency: int) -> SendResult:
    """Post every body through one ``httpx.AsyncClient`` with ``concurrency`` workers."""
    failed = 0
    queue = iter(bodies)  # workers take the next body; the event loop makes this safe
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal failed
        for body in queue:
            if not (await client.post(url, content=body)).is_success:
                failed += 1

    async with httpx.AsyncClient(timeout=TIMEOUT, headers=HEADERS, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return SendResult(f"async{concurrency}", len(bodies), seconds, failed)


def send_threads(url: str, bodies: list[bytes], concurrency: int) -> SendResult:
    """Post every body from ``concurrency`` threads, each with its own ``httpx.Client``."""
    failed = 0
    lock = threading.Lock()
    queue = iter(bodies)

    def worker() -> None:
        nonlocal failed
        with httpx.Client(timeout=TIMEOUT, headers=HEADERS) as client:
            while True:
                with lock:
                    body = next(queue, None)
                if body is None:
                    return
                if not client.post(url, content=body).is_success:
                    with lock:
                        failed += 1

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    return SendResult(f"threads{concurrency}", len(bodies), seconds, failed)


def main() -> None:
    """Command line: one baseline run, printed as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("sequential", "async", "threads"))
    parser.add_argument("--url", required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bodies", type=Path, help="JSON array of body strings")
    source.add_argument("--synthetic", type=int, help="this many synthetic bodies")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--limit", type=int, help="post only the first LIMIT bodies")
    args = parser.parse_args()
    bodies = load_bodies(args.bodies) if args.bodies else synthetic_bodies(args.synthetic)
    bodies = bodies[: args.limit] if args.limit else bodies
    if args.mode == "sequential":
        result = send_sequential(args.url, bodies)
    elif args.mode == "threads":
        result = send_threads(args.url, bodies, args.concurrency)
    else:
        result = asyncio.run(send_concurrent(args.url, bodies, args.concurrency))
    print(json.dumps({**asdict(result), "rate": result.rate}))


if __name__ == "__main__":
    main()
