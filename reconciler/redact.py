"""The one place secrets are masked (SPEC §8).

The webhook URL is a credential: only its scheme and host may be shown. Database URLs
may carry passwords: those are masked too. Every log line, error message, CLI output
and database column that could mention a URL goes through here:

    mask_webhook(url)           how a webhook URL is shown: `https://host/***`
    mask_database_url(url)      a database URL with `***` for its password
    Redactor(webhook, dbs)      scrubs free text (library errors, response bodies)
    Config.redact               the Redactor of one configuration (config.py)
    RedactingFilter(redactor)   the same, for logging handlers
"""

from __future__ import annotations

import logging
import re
from urllib.parse import quote, quote_plus, unquote, urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from reconciler.secret import MASK, Secret, mask_url

# Path segments and query values at least this long are treated as tokens.
TOKEN_MIN = 8
# A secret cut by truncation still leaks its start: trailing prefixes this long are masked.
PARTIAL_MIN = 6
# Database passwords shorter than this are masked only inside URLs (`user:***@`):
# replacing every "ab" in a message would make it unreadable.
PASSWORD_MIN = 4


def mask_webhook(url: str | Secret) -> str:
    """`https://hooks.example.com/abc/def` → `https://hooks.example.com/***`."""
    return url.masked if isinstance(url, Secret) else mask_url(url)


def mask_database_url(url: str) -> str:
    """A database URL with its password replaced by `***`."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "<unparsable database URL>"


class Redactor:
    """Replaces every occurrence of known secrets in free text (errors from libraries).

    Besides the exact secrets it masks their URL-encoded forms, the webhook URL's
    path, each token-like path segment and query value (a response body may echo any
    of them, JSON-escaped or not), a secret cut short at the end of a truncated text,
    the path of any http(s) URL, and the password of any URL.
    """

    def __init__(
        self, webhook_url: Secret | str | None = None, database_urls: tuple[str, ...] = ()
    ):
        secrets: dict[str, str] = {}
        if isinstance(webhook_url, Secret):
            webhook_url = webhook_url.reveal()
        if webhook_url:
            webhook_url = webhook_url.strip()
            secrets[webhook_url] = mask_webhook(webhook_url)
            for part in _webhook_parts(webhook_url):
                secrets.setdefault(part, MASK)
        for url in database_urls:
            try:
                password = make_url(url).password
            except (ArgumentError, ValueError):
                password = None
            if password and len(str(password)) >= PASSWORD_MIN:
                secrets.setdefault(str(password), MASK)
        for secret in list(secrets):
            for variant in (
                quote(secret, safe=""),
                quote_plus(secret),
                unquote(secret),
                secret.replace("/", "\\/"),
            ):  # JSON may escape slashes
                secrets.setdefault(variant, secrets[secret])
        # Longest first, so a whole URL is masked before its parts.
        self._secrets = sorted(secrets.items(), key=lambda item: -len(item[0]))

    def __call__(self, text: str) -> str:
        for secret, mask in self._secrets:
            text = text.replace(secret, mask)
        text = self._mask_cut_secret(text)
        text = _HTTP_URL.sub(rf"\1/{MASK}", text)
        return _URL_PASSWORD.sub(rf"\1{MASK}@", text)

    def _mask_cut_secret(self, text: str) -> str:
        for secret, mask in self._secrets:
            if "://" in secret:
                continue  # a whole URL cut short leaks only via its path, masked below
            for length in range(len(secret) - 1, PARTIAL_MIN - 1, -1):
                if text.endswith(secret[:length]):
                    return text[:-length] + mask
        return text


def _webhook_parts(url: str) -> list[str]:
    """The pieces of a webhook URL that identify it: path, tokens, query, password."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return []
    found = []
    if len(parts.path) > 1:
        found += [parts.path, parts.path.lstrip("/")]
    found += [s for s in parts.path.split("/") if len(s) >= TOKEN_MIN]
    if parts.query:
        found.append(parts.query)
        for pair in parts.query.split("&"):
            value = pair.partition("=")[2]
            if len(value) >= TOKEN_MIN:
                found.append(value)
    if parts.fragment:
        found.append(parts.fragment)
    if password:
        found.append(password)
    return found


class RedactingFilter(logging.Filter):
    """A logging filter for handlers: every record leaves with its secrets masked.

    Attach it to each handler (a filter on a logger does not see records of its child
    loggers, such as httpx's request lines, which name the full URL).
    """

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self.redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.redact(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


def install_log_redaction(redact: Redactor, logger: logging.Logger | None = None) -> None:
    """Add a `RedactingFilter` to every handler of `logger` (the root logger)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter(redact))


# Any http(s) URL in free text: keep scheme and host, mask the rest.
_HTTP_URL = re.compile(r"(https?://[^\s/?#\"'<>\\]+)[/?#\\][^\s\"'<>]*", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"([a-z][a-z0-9+.\-]*://[^/\s:@]+:)[^@\s/]+@", re.IGNORECASE)
