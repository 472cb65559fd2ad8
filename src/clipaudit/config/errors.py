"""The one error of configuration loading."""

from __future__ import annotations

from clipaudit.errors import ClipauditError


class ConfigError(ClipauditError, ValueError):
    """A configuration problem, reported before any work starts; the message names the key or file."""
