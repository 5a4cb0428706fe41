"""Layering: device code (the daemon, its backends, on-device learning) never imports
build-time code (:mod:`edgeagent.modeltools`), so a device install needs none of it;
and each thing issue 10 found repeated (the result message, the ``job.done`` line, cache
and escalation writes, exit codes, the backoff formula, the run loop) stays in one place."""

from __future__ import annotations

import ast
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
    "edgeagent.learning.refit",
    "edgeagent.heads.fit",
    "edgeagent.heads.curves",
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


def test_no_runtime_module_imports_modeltools_even_lazily() -> None:
    """A function-level import counts too: the refit child (edgeagent.learning.refit) fits
    heads with edgeagent.heads, never with the build-time train module.  Only the CLI's
    optional-command table names the model tools (as a string, imported on demand)."""
    found = []
    for path, tree in _sources().items():
        if path.startswith("edgeagent/modeltools/"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(n.startswith("edgeagent.modeltools") for n in names):
                found.append(f"{path}:{node.lineno}")
    assert found == []


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


# -- one place for each thing (issue 10: "none of the repeats remains") ----------------------
#
# Read from the source (AST), so that a second copy fails here rather than in review.

PACKAGE = REPO / "edgeagent"


def _sources() -> dict[str, ast.Module]:
    return {
        p.relative_to(REPO).as_posix(): ast.parse(p.read_text(encoding="utf-8"))
        for p in sorted(PACKAGE.rglob("*.py"))
    }


def _calls(name: str) -> set[str]:
    """Modules that call a function or method named ``name``."""
    found = set()
    for path, tree in _sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                fn = node.func
                called = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
                if called == name:
                    found.add(path)
    return found


def _strings(value: str) -> set[str]:
    """Modules holding the string constant ``value`` (docstrings that mention it do not)."""
    return {
        path
        for path, tree in _sources().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value == value
    }


def test_every_result_is_built_in_results_py() -> None:
    assert _calls("ResultMessage") == {"edgeagent/results.py"}


def test_a_finished_job_is_logged_and_counted_in_one_place() -> None:
    assert _strings("job.done") == {"edgeagent/results.py"}
    assert _strings("job.rejected") == {"edgeagent/results.py"}
    assert _calls("finish") == {"edgeagent/pipeline.py"}  # Pipeline._committed -> Tally.finish


def test_only_the_pipelines_commit_writes_answers_cache_and_escalations() -> None:
    """The escalator returns what to write (results.Actions); Pipeline._apply writes it."""
    writes = ("cache_put", "answer", "supersede", "add_escalation", "close_escalation")
    for write in (*writes, "escalation_sent"):
        # cloud/ is the cloud agent, another process without a store (its `answer` asks an LLM).
        callers = {p for p in _calls(write) if not p.startswith("edgeagent/cloud/")}
        assert callers == {"edgeagent/pipeline.py"}, write
    # Examples: the pipeline (cloud answers) and the offline import command (learning/fleet.py).
    assert _calls("add_example") == {"edgeagent/pipeline.py", "edgeagent/learning/fleet.py"}
    escalation = _sources()["edgeagent/escalation.py"]
    imported = {
        alias.name
        for node in ast.walk(escalation)
        if isinstance(node, ast.ImportFrom) and node.module == "edgeagent.store"
        for alias in node.names
    }
    assert imported == {"EscalationRow"}  # reads through a Journal; no Store, no Transaction


def test_exit_codes_are_defined_once() -> None:
    defined = {
        (path, target.id)
        for path, tree in _sources().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign | ast.AnnAssign)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name) and target.id.startswith("EXIT_")
    }
    assert {path for path, _ in defined} == {"edgeagent/exitcodes.py"}


def test_one_backoff_formula() -> None:
    """Exponential growth and jitter live in backoff.py; every retry loop calls it (the
    model build tools' numerics excepted)."""
    runtime = {p: t for p, t in _sources().items() if not p.startswith("edgeagent/modeltools/")}
    doubling = {
        path
        for path, tree in runtime.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.BinOp)
        and isinstance(node.op, ast.Pow)
        and isinstance(node.left, ast.Constant)
        and node.left.value == 2
        and not isinstance(node.right, ast.Constant)
    }
    assert doubling == {"edgeagent/backoff.py"}
    assert _calls("uniform") == {"edgeagent/backoff.py"}
    assert {"edgeagent/escalation.py", "edgeagent/daemon.py"} <= _calls("backoff_delay")
    assert {"edgeagent/mqtt.py", "edgeagent/cloud/llm.py"} <= _calls("backoff_delays")


def test_the_daemon_and_the_cloud_agent_share_one_run_loop() -> None:
    for module in ("edgeagent/daemon.py", "edgeagent/cloud/agent.py"):
        assert module in _calls("run_service") and module in _calls("wait_for_stop"), module
    # Stop signals are lifecycle.run_service's (the daemon adds SIGHUP: reload).  The
    # stand-in LLM (cloud/cli.py) is a plain threaded HTTP server with a signal.signal of
    # its own.
    stoppers = {
        path
        for path, tree in _sources().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in {"SIGTERM", "SIGINT"}
    }
    assert stoppers == {"edgeagent/lifecycle.py", "edgeagent/cloud/cli.py"}


def test_modules_keep_to_their_one_job() -> None:
    sources = _sources()

    def top_level(path: str) -> set[str]:
        return {
            n.name
            for n in sources[path].body
            if isinstance(n, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)
        }

    # config.py: the settings tree; secrets and the README generator live elsewhere.
    config = top_level("edgeagent/config.py")
    assert not config & top_level("edgeagent/credentials.py")
    assert not config & top_level("edgeagent/config_reference.py")
    # cloud/agent.py: the agent; its messages are pydantic models in cloud/messages.py.
    agent_models = [
        n.name
        for n in sources["edgeagent/cloud/agent.py"].body
        if isinstance(n, ast.ClassDef)
        and any(ast.unparse(b).endswith("BaseModel") for b in n.bases)
    ]
    assert agent_models == []
    # A backend type is one module plus one line: config.py names no concrete backend.
    from edgeagent import backends

    config_text = (PACKAGE / "config.py").read_text(encoding="utf-8")
    for backend in backends.backend_types().values():
        assert backend.config.__name__ not in config_text, backend.name
