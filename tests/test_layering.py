"""Layering: device code (the daemon, its backends, on-device learning) never imports
build-time code (:mod:`edgeagent.modeltools`), so a device install needs none of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

DEVICE_MODULES = (
    "edgeagent.daemon",
    "edgeagent.backends",
    "edgeagent.backends.onnx",
    "edgeagent.backends.tagger",
    "edgeagent.backends.llamacpp",
    "edgeagent.backends.rules",
    "edgeagent.learning.learner",
    "edgeagent.learning.cli",
)


def _loaded_after_import(module: str) -> list[str]:
    """Names of the ``edgeagent.*`` modules a fresh interpreter holds after importing
    ``module`` (a subprocess: this test process has long imported everything)."""
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('edgeagent'))))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    loaded: list[str] = json.loads(proc.stdout)
    return loaded


@pytest.mark.parametrize("module", DEVICE_MODULES)
def test_device_code_does_not_import_modeltools(module: str) -> None:
    loaded = _loaded_after_import(module)
    assert module in loaded
    assert [m for m in loaded if m.startswith("edgeagent.modeltools")] == []
