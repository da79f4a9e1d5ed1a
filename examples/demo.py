"""End-to-end demo on the embedded defaults: SQLite state, an example warehouse,
and a loopback stand-in for the ChartMogul webhook that prints what it receives.

Runs `reconciler sync` twice with changes in between (a user enters an audience, an
account enters an account audience), then `reconciler history` and `reconciler account`.
Everything lives in ./demo/ and is rebuilt on each run.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path.cwd() / "demo"
RECONCILER = [str(Path(sys.executable).with_name("reconciler"))]

CONFIG = """\
[database]
url = "sqlite:///{here}/reconciler.state.db"

[source]
url = "sqlite:///{here}/warehouse.db"

[destination]
webhook_url = "http://127.0.0.1:{port}/chartmogul/demo-secret-token"
requests_per_second = 20
max_concurrency = 4

[profile]
query = "SELECT id AS user_id, email, first_name, last_name, company_id, company_name FROM users"

[[audiences]]
name = "Order Completed Last 30 Days"
query = "SELECT user_id FROM orders WHERE completed_at >= date('now', '-30 day')"

[[audiences]]
name = "High Value Users"
query = "SELECT user_id FROM orders GROUP BY user_id HAVING SUM(amount) >= 500"

[[traits]]
name = "Lifetime Value"
query = "SELECT user_id, SUM(amount) AS value FROM orders GROUP BY user_id"

# Accounts: ChartMogul customers, sent with Send Customer before the contacts that name
# them (a contact's company.id is the account's group_id).
[accounts]
query = '''SELECT c.id AS group_id, u.id AS user_id, c.name, c.website, c.city, c.country
           FROM companies AS c JOIN users AS u ON u.company_id = c.id'''

[[account_audiences]]
name = "Enterprise Accounts"
query = "SELECT id AS group_id FROM companies WHERE seats >= 100"

[[account_traits]]
name = "Seats"
query = "SELECT id AS group_id, seats AS value FROM companies"
"""


def build_warehouse(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.executescript("""
            CREATE TABLE users (id TEXT PRIMARY KEY, email TEXT, first_name TEXT,
                                last_name TEXT, company_id INTEGER, company_name TEXT);
            CREATE TABLE orders (user_id TEXT, amount REAL, completed_at TEXT);
            CREATE TABLE companies (id INTEGER PRIMARY KEY, name TEXT, website TEXT,
                                    city TEXT, country TEXT, seats INTEGER);
            INSERT INTO companies VALUES
              (1, 'Analytical Engines', 'https://engines.example', 'London', 'GB', 250),
              (2, 'COBOL Ltd', 'https://cobol.example', 'Arlington', 'US', 40);
            INSERT INTO users VALUES
              ('u-1', 'ada@example.com', 'Ada', 'Lovelace', 1, 'Analytical Engines'),
              ('u-2', 'alan@example.com', 'Alan', 'Turing', NULL, NULL),
              ('u-3', 'grace@example.com', 'Grace', 'Hopper', 2, 'COBOL Ltd'),
              ('u-4', 'not-an-email', 'Linus', NULL, NULL, NULL);
            INSERT INTO orders VALUES
              ('u-1', 400, date('now', '-2 day')), ('u-1', 250, date('now', '-90 day')),
              ('u-2', 80, date('now', '-5 day')),
              ('u-3', 900, date('now', '-200 day'));
        """)


class Webhook(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        custom = {c["key"]: c["value"] for c in body.get("custom", [])}
        if body["type"] == "Send Customer":
            fields = {k: body[k] for k in ("name", "website", "address") if k in body}
            print(
                f"  webhook <- Send Customer {body['group_id']} (for {body['user_id']}): "
                f"{json.dumps(custom)} {json.dumps(fields)}",
                flush=True,
            )
        else:
            company = f" company {body['company']['id']}" if "company" in body else ""
            print(
                f"  webhook <- Send Contact  {body['user_id']}{company}: {json.dumps(custom)}",
                flush=True,
            )
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass


def reconciler(*args: str) -> None:
    print(f"$ reconciler {' '.join(args)}", flush=True)
    subprocess.run([*RECONCILER, *args, "--config", str(HERE / "reconciler.toml")], check=False)


def main() -> None:
    shutil.rmtree(HERE, ignore_errors=True)
    HERE.mkdir()
    build_warehouse(HERE / "warehouse.db")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (HERE / "reconciler.toml").write_text(CONFIG.format(here=HERE, port=server.server_port))
    print("First sync: every account, then every member and trait value, is sent.")
    reconciler("sync")
    print("\nAlan orders again (enters High Value Users); Ada's recent order is refunded;")
    print("COBOL Ltd buys 60 more seats (enters Enterprise Accounts).")
    with sqlite3.connect(HERE / "warehouse.db") as db:
        db.execute("INSERT INTO orders VALUES ('u-2', 600, date('now'))")
        db.execute("DELETE FROM orders WHERE user_id = 'u-1' AND amount = 400")
        db.execute("UPDATE companies SET seats = 100 WHERE id = 2")
    print("Second sync: only the accounts and users whose state changed.")
    reconciler("sync")
    print("\nSync history:")
    reconciler("history")
    print("\nWhat ChartMogul acknowledged for COBOL Ltd:")
    reconciler("account", "2")
    server.shutdown()


if __name__ == "__main__":
    main()
