"""``python -m edgeagent``."""

import sys

from edgeagent.cli import main

sys.exit(main())
