"""Secrets (SPEC §8): the webhook URL never leaves the config it came from; database
URLs print without passwords; TLS verification cannot be switched off."""

from __future__ import annotations

import io
import json
import logging
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select, text

from reconciler.cli import _handle_errors
from reconciler.config import load_config
from reconciler.redact import (
    RedactingFilter,
    Redactor,
    install_log_redaction,
    mask_database_url,
    mask_webhook,
)
from reconciler.state.schema import deliveries, metadata

from .conftest import Setup
from .helpers import assert_one_clean_line, cli
from .receiver import Receiver, Reply

TOKEN = "s3cr3t-token"
WINDOW = 6


def leaks(text: str, url: str) -> list[str]:
    """Every piece of the webhook URL's path (6 characters or more) found in `text`."""
    path = url.split("/", 3)[3]
    pieces = {path[i : i + WINDOW] for i in range(len(path) - WINDOW + 1)} | {url}
    return sorted(p for p in pieces if p in text)


def echo(url: str) -> Any:
    """A webhook that answers like a chatty proxy: the request, echoed every way."""

    def respond(number: int, body: dict[str, Any]) -> Reply:
        said = (
            f"rejected POST {url} path=/{url.split('/', 3)[3]} json="
            f"{json.dumps({'url': url})} escaped={url.replace('/', chr(92) + '/')} "
            f"encoded={quote(url, safe='')} token={TOKEN} body={json.dumps(body)}"
        )
        if body["user_id"] == "u3":
            return Reply(503, said, {"Retry-After": "0"})
        return Reply(400 if body["user_id"] == "u2" else 200, said)

    return respond


def state_text(setup: Setup, engine: Any) -> str:
    """Everything the state database holds: its files on SQLite, every row on PostgreSQL."""
    if setup.state_url.startswith("sqlite"):
        files = [setup.tmp_path / "state.db", setup.tmp_path / "state.db-wal"]
        assert files[1].exists(), "the WAL must be searched too"
        return "".join(f.read_bytes().decode("utf-8", "replace") for f in files)
    with engine.connect() as conn:
        return "\n".join(
            str(row[0])
            for table in metadata.sorted_tables
            for row in conn.execute(text(f"SELECT t::text FROM {table.name} t"))
        )


def test_webhook_token_appears_in_no_output_log_or_database(setup: Setup, engine_of):
    setup.warehouse.members("High Value Users", "u1", "u2", "u3")
    setup.warehouse.trait("Lifetime Value", {"u1": 5})
    setup.receiver.respond = echo(setup.receiver.url)
    path = setup.write(destination="max_attempts = 2\nretry_budget_seconds = 1")
    engine = engine_of(setup)
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    root = logging.getLogger()
    root.addHandler(handler)
    loggers = [root, logging.getLogger("httpx"), logging.getLogger("httpcore")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    install_log_redaction(load_config(path, env={}).redact)
    keep_wal_open = engine.connect()  # SQLite deletes the WAL when the last connection ends
    try:
        outputs = []
        for args in (
            ["migrate"],
            ["sync"],
            ["sync", "--json"],
            ["sync", "--dry-run"],
            ["sync", "--dry-run", "--json"],
            ["history"],
            ["history", "--json"],
            ["show", "1"],
            ["show", "1", "--json"],
            ["user", "u2"],
            ["user", "u2", "--json"],
            ["resync"],
            ["resync", "--audience", "lifetime_value"],
            ["show", "4", "--json"],
        ):
            result = cli(*args, "--config", str(path))
            assert "Traceback" not in result.output
            outputs.append(result.output)
        stored = state_text(setup, engine)
    finally:
        keep_wal_open.close()
        root.removeHandler(handler)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    everything = "\n".join(outputs) + log.getvalue()
    assert "send_request_headers" in log.getvalue(), "httpcore's request lines were logged"
    assert leaks(everything, setup.receiver.url) == []
    assert leaks(stored, setup.receiver.url) == []
    with engine.connect() as conn:
        errors = [e for (e,) in conn.execute(select(deliveries.c.error)) if e]
    assert any("rejected POST http://127.0.0.1:" in e and "***" in e for e in errors)
    assert len(setup.receiver.bodies()) >= 6  # the echo really happened, on every path


@pytest.mark.parametrize(
    "edit, env, expected",
    [
        (
            ('webhook_url = "{url}"', 'webhook_url = ["https://hooks.example.com/t0ken-999999"]'),
            {},
            "must be a string, got an array",
        ),
        (
            ('webhook_url = "{url}"', 'webhook_url = "http://hooks.example.com/t0ken-999999"'),
            {},
            "http://hooks.example.com/*** uses http",
        ),
        (
            ('webhook_url = "{url}"', 'webhook_url = "https://h.example.com:x/t0ken-999999"'),
            {},
            "is not a valid URL",
        ),
        (
            None,
            {"CHARTMOGUL_WEBHOOK_URL": "ftp://hooks.example.com/t0ken-999999"},
            "ftp://hooks.example.com/*** is not an https URL",
        ),
        (
            None,
            {"RECONCILER_DATABASE_URL": "postgresql://u:t0ken-999999@h:port/db"},
            "is not a database URL",
        ),
        (
            None,
            {"RECONCILER_SOURCE_URL": "nosuch://u:t0ken-999999@h/db"},
            'unknown database kind "nosuch"',
        ),
    ],
    ids=["wrong-type", "http", "bad-port", "env-scheme", "db-password", "db-kind"],
)
def test_config_errors_never_show_the_secret(setup: Setup, edit, env, expected):
    text = setup.config_text()
    if edit:
        text = text.replace(edit[0].replace("{url}", setup.receiver.url), edit[1])
    path = setup.tmp_path / "reconciler.toml"
    path.write_text(text)
    line = assert_one_clean_line(cli("sync", "--config", str(path), env=env), 2)
    assert expected in line and "t0ken" not in line


@pytest.mark.parametrize("debug", [False, True])
def test_unexpected_error_is_redacted_even_before_a_config_is_loaded(debug):

    @click.command()
    @_handle_errors
    def boom() -> None:
        raise RuntimeError(
            "POST https://hooks.example.com/hook/t0ken-999999 failed; "
            "db postgresql://app:pa55word-1@db.internal/x"
        )

    result = CliRunner().invoke(boom, env={"RECONCILER_DEBUG": "1" if debug else None})
    assert result.exit_code == 1
    assert "t0ken" not in result.output and "pa55word" not in result.output
    assert ("Traceback" in result.output) == debug
    assert result.stderr.strip().splitlines()[-1] == (
        "reconciler: unexpected error: RuntimeError: POST https://hooks.example.com/*** "
        "failed; db postgresql://app:***@db.internal/x"
    )


def test_interrupt_is_one_line(monkeypatch):
    @click.command()
    @_handle_errors
    def stopped() -> None:
        raise KeyboardInterrupt

    result = CliRunner().invoke(stopped)
    assert result.exit_code == 130 and result.stderr == "reconciler: interrupted\n"


@pytest.mark.parametrize(
    "url, shown",
    [
        ("https://hooks.example.com/abc/def?x=1#y", "https://hooks.example.com/***"),
        ("https://user:pw@hooks.example.com:8443/abc", "https://hooks.example.com:8443/***"),
        ("http://[::1]:9000/abc", "http://[::1]:9000/***"),
        ("https://hooks.example.com", "https://hooks.example.com/***"),
        ("not a url at all", "?://?/***"),
    ],
)
def test_mask_webhook(url, shown):
    assert mask_webhook(url) == shown


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql://app:s3cret@db:5432/x", "postgresql://app:***@db:5432/x"),
        ("postgresql+psycopg://app:p%40ss@db/x", "postgresql+psycopg://app:***@db/x"),
        ("sqlite:///state.db", "sqlite:///state.db"),
        ("postgresql://u:p@h:port/db", "<unparsable database URL>"),
    ],
)
def test_mask_database_url(url, shown):
    assert mask_database_url(url) == shown


URL = "https://hooks.example.com/v1/hook/3f9a1c2b8d7e6f5a4b3c"


@given(
    st.text(max_size=40),
    st.text(max_size=40),
    st.integers(0, 200),
    st.sampled_from(
        [
            URL,
            URL.split("/", 3)[3],
            URL.replace("/", "\\/"),
            quote(URL, safe=""),
            "3f9a1c2b8d7e6f5a4b3c",
        ]
    ),
)
def test_redactor_masks_the_webhook_however_it_is_echoed_and_cut(before, after, cut, form):
    """Even a response excerpt cut in the middle of the token leaks no piece of it."""
    redact = Redactor(webhook_url=URL)
    excerpt = (before + form + after)[: len(before) + cut]
    assert [p for p in leaks(redact(excerpt), URL) if p not in before + after] == []


def test_redactor_masks_database_passwords_in_free_text():
    redact = Redactor(database_urls=("postgresql://app:Tr1cky%2Fpass@db/x",))
    said = "FATAL: password Tr1cky/pass rejected for postgresql://app:Tr1cky%2Fpass@db/x"
    assert "Tr1cky" not in redact(said)


def test_logging_filter_masks_messages_arguments_and_tracebacks():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter(Redactor(webhook_url=URL)))
    logger = logging.getLogger("tests.secrets")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("posting to %s", URL)
        try:
            raise ValueError(f"bad response from {URL}")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    assert leaks(stream.getvalue(), URL) == []
    assert "posting to https://hooks.example.com/***" in stream.getvalue()


# TLS verification cannot be switched off: there is no setting for it (test_config), and a
# webhook whose certificate does not verify is never acknowledged.


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    done = subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"openssl cannot make a test certificate: {done.stderr.decode()[:200]}")
    return cert, key


@pytest.fixture
def https_receiver(certificate) -> Iterator[Receiver]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    server = Receiver()
    server.server.socket = context.wrap_socket(server.server.socket, server_side=True)
    server.start()
    yield server
    server.stop()


def test_self_signed_webhook_is_never_acknowledged(setup: Setup, https_receiver, engine_of):
    setup.warehouse.members("High Value Users", "u1")
    url = https_receiver.url.replace("http://", "https://")
    path = setup.write(webhook_url=url, destination="max_attempts = 1\nretry_budget_seconds = 0")
    result = cli("sync", "--config", str(path))
    assert result.exit_code == 1 and https_receiver.bodies() == []
    with engine_of(setup).connect() as conn:
        (error,) = conn.execute(select(deliveries.c.error)).scalars().all()
    assert "CERTIFICATE_VERIFY_FAILED" in error and TOKEN not in error


def test_a_private_ca_is_trusted_through_ssl_cert_file(setup: Setup, https_receiver, certificate):
    """The supported way to reach a webhook behind a private CA: trust it, not skip it."""
    setup.warehouse.members("High Value Users", "u1")
    url = https_receiver.url.replace("http://", "https://")
    path = setup.write(webhook_url=url)
    result = cli("sync", "--config", str(path), env={"SSL_CERT_FILE": str(certificate[0])})
    assert result.exit_code == 0, result.output
    assert [b["user_id"] for b in https_receiver.bodies()] == ["u1"]


@pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)
def test_the_webhook_url_is_a_secret_that_prints_masked(setup: Setup):
    """repr and str of the config never show the URL: only reveal() does (SPEC §8)."""
    config = load_config(setup.write(webhook_url=f"https://hooks.example.com/v1/{TOKEN}"), env={})
    url = config.destination.webhook_url
    for shown in (repr(config), str(config), repr(config.destination), str(url), f"{url}"):
        assert TOKEN not in shown
    assert "***" in str(url) and url.reveal().endswith(TOKEN)
