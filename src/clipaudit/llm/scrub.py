"""Removal of secrets from text that may reach results, logs or exceptions."""

from __future__ import annotations

import re

MAX_MESSAGE_CHARS = 500
REDACTED = "[REDACTED]"
_BEARER = re.compile(r"(Bearer\s+)\S+", re.IGNORECASE)
_KEY_LIKE = re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}")


class Scrubber:
    """Replaces a known secret, any Bearer token and any ``sk-...`` key with ``[REDACTED]``."""

    def __init__(self, secret: str | None) -> None:
        self._secret = secret or None

    def __call__(self, text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
        """Scrubbed ``text``, cut to ``limit`` characters."""
        if self._secret:
            text = text.replace(self._secret, REDACTED)
        text = _BEARER.sub(rf"\g<1>{REDACTED}", text)
        text = _KEY_LIKE.sub(REDACTED, text)
        return text if len(text) <= limit else text[: limit - 3] + "..."

    def secret_only(self, text: str) -> str:
        """``text`` with the known secret replaced, nothing else changed (for model answers)."""
        return text.replace(self._secret, REDACTED) if self._secret else text

    def __repr__(self) -> str:
        return "Scrubber(<secret>)"
