"""Secrets: the broker password, the TLS client key, the cloud agent's LLM API key.

Each comes from the first of: a value in the settings (or its ``EDGEAGENT_*``
variable), a file the settings name, an environment variable the settings name, a
systemd credential (``$CREDENTIALS_DIRECTORY``, ``LoadCredential=``).  Secrets are never
logged.  An unreadable file is a :class:`~edgeagent.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgeagent.errors import ConfigError

__all__ = ["credential_path", "load_secret", "read_secret"]


def load_secret(
    file: Path | None,
    file_key: str,
    credential: str,
    *,
    env_var: str | None = None,
    environ: dict[str, str] | None = None,
) -> str | None:
    """The first line of ``file`` if set, else ``$env_var`` if set and non-empty, else the
    systemd credential ``credential`` if the service has a non-blank one, else None.
    ``file_key`` names ``file``'s setting in the error for an unreadable file."""
    env = os.environ if environ is None else environ
    if file is not None:
        return read_secret(file, file_key)
    if env_var and env.get(env_var):
        return env[env_var].strip()
    cred = credential_path(credential, environ)
    return read_secret(cred, f"credential {credential}") if cred else None


def credential_path(name: str, environ: dict[str, str] | None = None) -> Path | None:
    """A systemd credential (``LoadCredential=name:...``) if the service has a non-blank one.

    The unit pairs each ``LoadCredential=`` with an empty ``SetCredential=`` default
    (systemd 252 has no optional form), so a blank credential means "not configured".
    """
    env = os.environ if environ is None else environ
    directory = env.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / name
    try:
        blank = not path.read_bytes().strip()
    except OSError:
        return None
    return None if blank else path


def read_secret(path: Path, what: str) -> str:
    """The first line of a secret file, stripped."""
    try:
        return (
            path.read_text(encoding="utf-8").splitlines()[0].strip() if path.stat().st_size else ""
        )
    except OSError as exc:
        raise ConfigError(str(path), [(what, f"cannot read secret file: {exc.strerror}")]) from exc
