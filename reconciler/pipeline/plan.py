"""Turning the diff into updates: one per changed user or account (SPEC §1.3, §7, §9).

Streams `diff` ordered by id, joined with the acknowledged version and the contact
(or account) fields, and writes one row per user (account) into the temp table `plan`
with its deterministic message id and its Send Contact (Send Customer) body. Accounts
are planned first, so their updates get the smaller ids. Only changed users and
accounts pass through Python; everything else stays in SQL.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import groupby
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection

from reconciler.pipeline.contact import build_contact
from reconciler.pipeline.customer import build_customer
from reconciler.pipeline.source import TRUE
from reconciler.state.backend import Backend

FIRST_PAGE_USERS = 50  # the first page: small, so the first request leaves soon
PAGE_USERS = 500  # pages double up to this: planned in well under the time the
# sender takes to drain its queue (128 jobs) at a paced 200/s, even on a busy machine
PLAN_COLUMNS = (
    "seq",
    "user_id",
    "message_id",
    "version",
    "resync_run_id",
    "body",
    "status",
    "note",
    "entity",
)


def message_id(
    user_id: str,
    version: int,
    resync_run_id: int | None,
    changed: Sequence[tuple[str, str]],
    entity: str = "contact",
) -> str:
    """The id of one logical update: same user, keys, values, version, resync ⇒ same id.

    `changed` holds (key, canonical JSON value) pairs in key order. Keys are
    `[a-z0-9_]` (fields `@[a-z_]`) and JSON text escapes control characters, so the
    separators below cannot occur inside a part; the user id is length-prefixed.
    An account's (`entity` customer) parts start with the entity kind, which no
    contact's first part (`<length>:<id>`) can equal; a contact's ids are what they
    were before accounts existed.
    """
    parts = (
        f"{len(user_id)}:{user_id}",
        str(version),
        str(resync_run_id),
        *(f"{key}={value}" for key, value in changed),
    )
    if entity != "contact":
        parts = (entity, *parts)
    canonical = "\x1f".join(parts)
    digest = bytearray(hashlib.sha256(canonical.encode()).digest()[:16])
    # What str(uuid.UUID(bytes=digest, version=5)) gives, without building the object
    # (a tenth of a plan's time at 100,000 users): version 5, RFC 4122 variant.
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass
class PlanCounts:
    users: int = 0  # contacts with an update
    accounts: int = 0  # accounts with an update
    entered: int = 0
    exited: int = 0
    traits_changed: int = 0
    skipped: int = 0
    # Bodies planned without a profile field that failed validation (SPEC §5).
    emails_left_out: int = 0
    linked_in_left_out: int = 0


def count_diff(state: Connection) -> PlanCounts:
    """What `fill_plan` would count, from `diff` in SQL. Contacts' skips aside: none
    can occur with custom attributes and without contact field changes (every body
    carries its changed keys); an account's (no user_id) are counted. Fields left out
    are not counted: only building the bodies finds them."""
    entered, exited, traits = state.exec_driver_sql(f"""
        SELECT SUM(CASE WHEN kind = 'audience' AND new_value = '{TRUE}' THEN 1 ELSE 0 END),
               SUM(CASE WHEN kind = 'audience' AND new_value <> '{TRUE}' THEN 1 ELSE 0 END),
               SUM(CASE WHEN kind = 'trait' THEN 1 ELSE 0 END)
        FROM diff""").one()
    # Ids apart, each a DISTINCT in the order of the diff's index: cheaper than one
    # COUNT(DISTINCT CASE ...) sorting every row (measured at 1M users on PostgreSQL:
    # 1.3-1.8 s for the sums and 2.3-2.7 s for the users, against 5.0-6.4 s together).
    # Without account keys this run there are no account rows: spare a scan of them.
    with_accounts = state.exec_driver_sql(
        "SELECT COUNT(*) FROM run_keys WHERE entity = 'customer' AND failed = 0"
    ).scalar_one()
    users, accounts = (
        state.exec_driver_sql(
            "SELECT COUNT(*) FROM (SELECT DISTINCT user_id FROM diff "
            f"WHERE entity = '{entity}') AS u"
        ).scalar_one()
        if entity == "contact" or with_accounts
        else 0
        for entity in ("contact", "customer")
    )
    skipped = (
        state.exec_driver_sql("""
        SELECT COUNT(*) FROM (SELECT DISTINCT d.user_id FROM diff AS d
                              LEFT JOIN accounts AS a ON a.group_id = d.user_id
                              WHERE d.entity = 'customer' AND a.user_id IS NULL) AS s
    """).scalar_one()
        if accounts
        else 0
    )
    return PlanCounts(
        users=users,
        accounts=accounts,
        entered=entered or 0,
        exited=exited or 0,
        traits_changed=traits or 0,
        skipped=skipped,
    )


def fill_plan(
    state: Connection,
    observed_at: datetime,
    resync_run_id: int | None,
    custom_attributes: bool,
    max_users: int | None = None,
) -> PlanCounts:
    """Write the whole `plan` from `diff` (of each entity, its first `max_users` by id,
    if given) in one go; return what it holds. The dry run's way; a real run pages."""
    writer = PlanWriter(state, observed_at, resync_run_id, custom_attributes)
    for entity in writer.entities():
        for _ in writer.pages(entity, max_users):
            pass
    return writer.counts


class PlanWriter:
    """Writes `plan` from `diff` a page of users (accounts) at a time, in id order.

    Each page is one query over `diff` (keyset by id), its bodies built in Python and
    written to `plan` with the next `seq` numbers; `pages()` yields the page's rows
    (as `PLAN_COLUMNS`) so the caller can make it durable and send it while the next
    page is still to be built. Pages start small, so the first updates are ready
    soon, and grow to `PAGE_USERS`. `counts` holds what the pages so far hold.

    `after_read`, if given, is called after each page's query, before anything is
    written: a real run commits there, so no read transaction of the main database
    stays open into the page's writes (SQLite could not upgrade it to a write once
    another connection, the lock's lease renewal, had committed).
    """

    def __init__(
        self,
        state: Connection,
        observed_at: datetime,
        resync_run_id: int | None,
        custom_attributes: bool,
        after_read: Callable[[], None] | None = None,
    ) -> None:
        self.state = state
        self.observed_at = observed_at
        self.resync_run_id = resync_run_id
        self.custom_attributes = custom_attributes
        self.after_read = after_read
        self.counts = PlanCounts()
        self.seq = 0
        db = Backend(state)
        self._load = db.load
        state.exec_driver_sql("CREATE INDEX plan_seq ON plan (seq)")

    def entities(self) -> tuple[str, ...]:
        """The kinds to plan, accounts first (their updates get the smaller ids). No
        account keys this run, no account rows in the diff: spare a scan of it."""
        accounts = self.state.exec_driver_sql(
            "SELECT COUNT(*) FROM run_keys WHERE entity = 'customer' AND failed = 0"
        ).scalar_one()
        return ("customer", "contact") if accounts else ("contact",)

    def pages(self, entity: str, max_users: int | None = None) -> Iterator[list[tuple[Any, ...]]]:
        """Plan every changed user (account) of `entity`, or its first `max_users`."""
        after: str | None = None
        size = FIRST_PAGE_USERS
        left = max_users
        while left is None or left > 0:
            take = size if left is None else min(size, left)
            changed = _changed_users(self.state, entity, after, take)
            if self.after_read is not None:
                self.after_read()
            if not changed:
                return
            rows = self._build(entity, changed)
            self._load("plan", PLAN_COLUMNS, [rows])
            yield rows
            after = changed[-1][0]
            if left is not None:
                left -= len(changed)
            if len(changed) < take:
                return
            size = min(2 * size, PAGE_USERS)

    def _build(
        self, entity: str, changed: list[tuple[str, list[tuple[Any, ...]]]]
    ) -> list[tuple[Any, ...]]:
        counts = self.counts
        rows_out: list[tuple[Any, ...]] = []
        for user_id, rows in changed:
            self.seq += 1
            version = rows[0][4] or 0
            forced = any(row[3] for row in rows)
            resync = self.resync_run_id if forced else None
            changed_keys = [(row[0], row[2]) for row in rows]
            mid = message_id(user_id, version, resync, changed_keys, entity)
            data = json.loads(rows[0][5]) if rows[0][5] else {}
            # Fields ride in the body's own keys, never in `custom`.
            custom = [(row[0], json.loads(row[2])) for row in rows if row[1] != "field"]
            body = (
                build_contact(mid, self.observed_at, user_id, data, custom, self.custom_attributes)
                if entity == "contact"
                else build_customer(
                    mid, self.observed_at, user_id, rows[0][6], data, custom, self.custom_attributes
                )
            )
            note = "; ".join(n for n in (body.skip, body.note) if n) or None
            rows_out.append(
                (
                    self.seq,
                    user_id,
                    mid,
                    version,
                    resync,
                    body.text,
                    "skipped" if body.skip else "pending",
                    note,
                    entity,
                )
            )
            if entity == "contact":
                counts.users += 1
            else:
                counts.accounts += 1
            counts.skipped += body.skip is not None
            counts.emails_left_out += "email" in body.left_out
            counts.linked_in_left_out += "linked_in" in body.left_out
            for _key, kind, value, *_ in rows:
                if kind == "trait":
                    counts.traits_changed += 1
                elif kind == "audience":
                    if value == TRUE:
                        counts.entered += 1
                    else:
                        counts.exited += 1
        return rows_out


def _changed_users(
    state: Connection, entity: str, after: str | None, users: int
) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """The next `users` changed ids of one entity after `after`, in id order, each with
    [(key, kind, new_value, forced, version, data[, account user_id]), ...]: contacts
    with their profile, accounts with their fields and the user they are sent for."""
    if entity == "contact":
        record = "p.data FROM diff AS d LEFT JOIN profile AS p ON p.user_id = d.user_id"
    else:
        record = (
            "a.data, a.user_id FROM diff AS d LEFT JOIN accounts AS a ON a.group_id = d.user_id"
        )
    db = Backend(state)
    after_clause = "" if after is None else f"AND user_id > {db.mark}"
    params: tuple[Any, ...] = (entity,) if after is None else (entity, after)
    # The page's last id: a walk along the diff's index (entity, user_id, key) that
    # stops at the offset (a DISTINCT subquery would be built whole, every page).
    cursor = state.connection.cursor()
    try:
        cursor.execute(
            f"SELECT user_id FROM diff WHERE entity = {db.mark} {after_clause} "
            f"GROUP BY user_id ORDER BY user_id LIMIT 1 OFFSET {int(users) - 1}",
            params,
        )
        found = cursor.fetchone()
        upto = ""
        if found is not None:
            upto = f"AND d.user_id <= {db.mark}"
            params = (*params, found[0])
        # DBAPI rows: SQLAlchemy's per-row work would cost more than the query.
        cursor.execute(
            f"""
            SELECT d.user_id, d.key, d.kind, d.new_value, d.forced, v.version, {record}
            LEFT JOIN ack_versions AS v ON v.entity = d.entity AND v.user_id = d.user_id
            WHERE d.entity = {db.mark} {after_clause.replace("user_id", "d.user_id")} {upto}
            ORDER BY d.user_id, d.key
        """,
            params,
        )
        rows = cursor.fetchall()
    finally:
        cursor.close()
    return [
        (user_id, [tuple(row[1:]) for row in group])
        for user_id, group in groupby(rows, key=itemgetter(0))
    ]
