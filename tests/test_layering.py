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


def _loaded_after(statement: str, *args: str) -> list[str]:
    """Names of the ``edgeagent.*`` modules a fresh interpreter holds after running
    ``statement`` (``sys.argv[1:]`` = ``args``; a subprocess: this test process has long
    imported everything)."""
    code = (
        "import importlib, json, sys\n"
        f"{statement}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('edgeagent'))))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    loaded: list[str] = json.loads(proc.stdout.splitlines()[-1])
    return loaded


@pytest.mark.parametrize("module", DEVICE_MODULES)
def test_device_code_does_not_import_modeltools(module: str) -> None:
    loaded = _loaded_after(f"importlib.import_module({module!r})")
    assert module in loaded
    assert [m for m in loaded if m.startswith("edgeagent.modeltools")] == []


def test_the_daemon_command_does_not_import_modeltools(tmp_path: Path) -> None:
    """``edgeagent run`` and the other core commands parse their arguments without the
    model tools' module (the CLI registers optional commands only for a command it does
    not know itself)."""
    config = tmp_path / "c.toml"
    config.write_text(
        '[tasks.a]\nkind = "classify"\n[tasks.a.backend]\ntype = "rules"\n'
        '[[tasks.a.backend.rules]]\nlabel = "x"\nkeywords = ["x"]\n'
    )
    loaded = _loaded_after(
        "from edgeagent import cli\n"
        "assert cli.main(['check-config', '--config', sys.argv[1], '--no-load']) == 0",
        str(config),
    )
    assert "edgeagent.config" in loaded
    assert [m for m in loaded if m.startswith("edgeagent.modeltools")] == []


def test_tool_commands_are_still_registered() -> None:
    from edgeagent import cli

    parser = cli.build_parser()
    assert {"run", "models", "train", "calibrate", "cloud"} <= cli._commands(parser)


def test_every_module_imports_first() -> None:
    """Any module can be the first one a process imports: no import cycle hides behind
    the order in which the daemon happens to load them (the backends' registry imports
    every backend, so a backend importing a module that imports the registry is a cycle)."""
    code = (
        "import importlib, json, pkgutil, sys\n"
        "import edgeagent\n"
        "names = sorted(m.name for m in pkgutil.walk_packages(edgeagent.__path__, 'edgeagent.')\n"
        "               if not m.name.endswith('__main__'))\n"
        "failed = {}\n"
        "for name in names:\n"
        "    for m in [m for m in sys.modules if m == 'edgeagent' or m.startswith('edgeagent.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError as exc:\n"
        "        if (exc.name or '').startswith('edgeagent'):\n"
        "            failed[name] = repr(exc)\n"
        "    except Exception as exc:\n"
        "        failed[name] = repr(exc)\n"
        "print(json.dumps(failed))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {}
