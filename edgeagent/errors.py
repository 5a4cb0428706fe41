"""The configuration error every edgeagent command reports the same way (exit 78).

Its own module so that :mod:`edgeagent.config` and :mod:`edgeagent.credentials` can
both raise it without importing each other; import it from either.
"""

from __future__ import annotations


class ConfigError(Exception):
    """The configuration is invalid; ``errors`` lists ``(key, message)`` pairs."""

    def __init__(self, source: str, errors: list[tuple[str, str]]) -> None:
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {key}: {msg}" for key, msg in errors)
        super().__init__(f"invalid configuration ({source}):\n{lines}")
