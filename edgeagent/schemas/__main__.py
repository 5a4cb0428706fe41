"""``python -m edgeagent.schemas``: regenerate the message schemas."""

from edgeagent.schemas import write

for path in write():
    print(path)
