"""Exit codes of every edgeagent process and command, defined once.

sysexits(3) codes where one fits.  systemd must not restart into a failure a restart
cannot fix: ``systemd/edgeagent.service`` lists :data:`EXIT_CONFIG`,
:data:`EXIT_STATE_CORRUPT` and :data:`EXIT_STATE_NEWER` in ``RestartPreventExitStatus=``,
``edgeagent-cloud.service`` :data:`EXIT_CONFIG` (``tests/test_systemd_unit.py`` checks
both against these constants).  The README's "Troubleshooting" table explains each.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
"""An internal error (a crashed task), or a command that failed: systemd restarts the
daemon.  ``edgeagent results``: the job is unknown."""
EXIT_USAGE = 2
"""Bad command-line use (argparse exits with it too)."""
EXIT_NO_ANSWER = 3
"""``submit``: some job got no result in time; ``status``: no device has a retained
status; ``replay``: not every job was answered."""
EXIT_OFFLINE = 4
"""``submit``: the device's retained status says its daemon is stopped or offline."""
EXIT_CONFIG = 78
"""EX_CONFIG: invalid configuration, or the broker refused our credentials or
subscriptions; not restarted."""

# The state file at start (README "Troubleshooting").
EXIT_STATE_CORRUPT = 65
"""EX_DATAERR: damaged state file; not restarted."""
EXIT_STATE_MISSING = 73
"""EX_CANTCREAT: the state directory is missing (disk not mounted?)."""
EXIT_STATE_IO = 74
"""EX_IOERR: I/O error on the state file at start."""
EXIT_STATE_FULL = 75
"""EX_TEMPFAIL: no space to open/migrate the state file at start."""
EXIT_STATE_READ_ONLY = 77
"""EX_NOPERM: state file/directory/file system not writable."""
EXIT_STATE_NEWER = 79
"""A newer edgeagent wrote the state file (downgrade); not restarted."""

NOT_RESTARTED = frozenset({EXIT_CONFIG, EXIT_STATE_CORRUPT, EXIT_STATE_NEWER})
"""The daemon's ``RestartPreventExitStatus=``."""
