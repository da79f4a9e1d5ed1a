"""The one place secrets are masked (SPEC §8).

The webhook URL is a credential: only its scheme and host may be shown. Database URLs
may carry passwords: those are masked too. Every log line, error message, CLI output
and database column that could mention a URL goes through here.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError


def mask_webhook(url: str) -> str:
    """`https://hooks.example.com/abc/def` → `https://hooks.example.com/***`."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        if ":" in host:
            host = f"[{host}]"
        if parts.port:
            host = f"{host}:{parts.port}"
        scheme = parts.scheme or "?"
    except ValueError:
        return "***"
    return f"{scheme}://{host}/***"


def mask_database_url(url: str) -> str:
    """A database URL with its password replaced by `***`."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable database URL>"


class Redactor:
    """Replaces every occurrence of known secrets in free text (errors from libraries)."""

    def __init__(self, webhook_url: str | None = None, database_urls: tuple[str, ...] = ()):
        self._replacements: list[tuple[str, str]] = []
        if webhook_url:
            self._replacements.append((webhook_url, mask_webhook(webhook_url)))
            path = urlsplit(webhook_url).path
            if len(path) > 1:
                self._replacements.append((path, "/***"))
        for url in database_urls:
            try:
                password = make_url(url).password
            except ArgumentError:
                password = None
            if password:
                self._replacements.append((str(password), "***"))

    def __call__(self, text: str) -> str:
        for secret, mask in self._replacements:
            text = text.replace(secret, mask)
        return _URL_PASSWORD.sub(r"\1***@", text)


_URL_PASSWORD = re.compile(r"([a-z][a-z0-9+.\-]*://[^/\s:@]+:)[^@\s/]+@", re.IGNORECASE)
