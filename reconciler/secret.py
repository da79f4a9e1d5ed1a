"""Secrets as a type (SPEC §8): a value that never prints itself.

The webhook URL is a credential. It is held in a `Secret`, whose `str` and `repr` show
only scheme and host (`https://hooks.example.com/***`); the full text comes out only
through `reveal()`, called where the request is made and where the redactor learns
what to mask. A config, a dataclass repr, a log line or a traceback that formats a
`Secret` therefore cannot leak it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

MASK = "***"


def mask_url(url: str) -> str:
    """`https://hooks.example.com/abc/def` → `https://hooks.example.com/***`."""
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname or "?"
        if ":" in host:
            host = f"[{host}]"
        if parts.port:
            host = f"{host}:{parts.port}"
        scheme = parts.scheme or "?"
    except ValueError:
        return MASK
    return f"{scheme}://{host}/{MASK}"


class Secret:
    """A URL (or token) that shows itself masked; `reveal()` is the only way to the text."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    @property
    def masked(self) -> str:
        return mask_url(self._value)

    def __str__(self) -> str:
        return self.masked

    def __repr__(self) -> str:
        return f"Secret({self.masked!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> Any:
        raise TypeError("a Secret is not pickled")
