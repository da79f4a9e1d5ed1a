"""The test's model of a changing warehouse (used by the crash and flaky-receiver tests):
`Source` changes the source and remembers what it says, `replay` rebuilds what the
receiver saw."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, select

from reconciler.state.schema import updates

from .conftest import Setup
from .helpers import custom

HV, OC, LTV = "high_value_users", "order_completed_last_30_days", "lifetime_value"
AUDIENCES = {HV: "High Value Users", OC: "Order Completed Last 30 Days"}
USERS = [f"u{n:03d}" for n in range(240)]


@dataclass
class Source:
    """The test's copy of what the warehouse says, written through to it."""

    setup: Setup
    rng: random.Random
    members: dict[str, set[str]] = field(default_factory=dict)
    ltv: dict[str, int] = field(default_factory=dict)
    next_value: int = 1

    def fill(self) -> None:
        for user in USERS:
            self.setup.warehouse.user(user, email=f"{user}@example.com")
        self.members = {
            key: {u for u in USERS if self.rng.random() < share}
            for key, share in ((HV, 0.4), (OC, 0.3))
        }
        self.ltv = {u: self.new_value() for u in USERS if self.rng.random() < 0.5}
        self.write()

    def new_value(self) -> int:
        self.next_value += 1
        return self.next_value

    def change(self, engine: Engine, count: int) -> None:
        """Change `count` random users; users with a live update only get new trait values."""
        with engine.connect() as conn:
            live = set(
                conn.execute(
                    select(updates.c.user_id).where(updates.c.status.in_(("pending", "rejected")))
                ).scalars()
            )
        for user in self.rng.sample(USERS, count):
            if user not in live:
                for key in self.members:
                    if self.rng.random() < 0.4:
                        self.members[key] ^= {user}
            if self.rng.random() < 0.5:
                self.ltv[user] = self.new_value()
        self.write()

    def write(self) -> None:
        for key, users in self.members.items():
            self.setup.warehouse.members(AUDIENCES[key], *sorted(users))
        self.setup.warehouse.trait("Lifetime Value", self.ltv)

    def lost(self, view: dict[str, dict[str, Any]]) -> list[str]:
        """(user, key) pairs where the receiver's view differs from the source."""
        wrong = []
        for user in USERS:
            seen = view.get(user, {})
            for key, users in self.members.items():
                if seen.get(key, False) is not (user in users):
                    wrong.append(f"{user} {key}: source {user in users}, seen {seen.get(key)}")
            if seen.get(LTV) != self.ltv.get(user):
                wrong.append(f"{user} {LTV}: source {self.ltv.get(user)}, seen {seen.get(LTV)}")
        return wrong


def replay(bodies: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], int, int, int]:
    """The receiver's view by arrival, and (repeated ids, no-op bodies, no-op with a new id)."""
    view: dict[str, dict[str, Any]] = {}
    ids: set[str] = set()
    repeated = noop = noop_new_id = 0
    for body in bodies:
        seen = view.setdefault(body["user_id"], {})
        changes = custom(body)
        repeated += body["message_id"] in ids
        if all(seen.get(k, object()) == v for k, v in changes.items()):
            noop += 1
            noop_new_id += body["message_id"] not in ids
        ids.add(body["message_id"])
        seen.update(changes)
    return view, repeated, noop, noop_new_id
