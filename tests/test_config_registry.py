"""The backend registry: a backend type is one module plus one registration line.

A fake ``echo`` backend (config model + runtime + ``BACKEND``, one file) is registered
in a fresh interpreter before the settings model is built, as a line in
``edgeagent.backends.BUILT_IN`` would: config parsing accepts and validates it, the
config reference documents it, and :func:`edgeagent.backends.create` builds it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgeagent import backends
from edgeagent.backends import BackendType

REPO = Path(__file__).resolve().parents[1]

ECHO_BACKEND = '''
"""A fake backend type: answers every input with itself."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from edgeagent.backends.base import BackendConfig, BackendType, Prediction


class EchoBackendConfig(BackendConfig):
    """Answers each input with itself (a test backend)."""

    type: Literal["echo"] = "echo"
    prefix: str = Field("", description="Put before every answer.")

    def check_task(self, task: Any) -> None:
        if task.kind != "generate":
            raise ValueError("the echo backend only generates")


class EchoBackend:
    def __init__(self, task_name: str, task: Any) -> None:
        self.config: EchoBackendConfig = task.backend

    model_id = "echo"
    fingerprint = "0" * 16

    def load(self) -> None: ...
    def warmup(self) -> None: ...
    def close(self) -> None: ...

    def infer_batch(self, inputs: list[Any]) -> list[Prediction]:
        return [Prediction({"text": self.config.prefix + str(x)}, 1.0) for x in inputs]


BACKEND = BackendType(EchoBackendConfig, EchoBackend)
'''

DRIVER = """
import importlib, json, sys
from pathlib import Path

from edgeagent import backends
backends.register(importlib.import_module("echo_backend").BACKEND)  # the one line

from edgeagent.config import ConfigError, load_settings
from edgeagent.config_reference import reference_markdown

settings, _ = load_settings(Path(sys.argv[1]))
backend = backends.create("shout", settings.tasks["shout"])
backend.load()
out = {
    "types": sorted(backends.backend_types()),
    "answers": [p.output for p in backend.infer_batch(["hi"])],
    "reference": reference_markdown(),
}
try:
    load_settings(Path(sys.argv[2]))
except ConfigError as exc:
    out["errors"] = exc.errors
print(json.dumps(out))
"""


def test_a_registered_backend_is_parsed_documented_and_built(tmp_path: Path) -> None:
    (tmp_path / "echo_backend.py").write_text(ECHO_BACKEND)
    good = tmp_path / "good.toml"
    good.write_text(
        '[tasks.shout]\nkind = "generate"\n[tasks.shout.backend]\ntype = "echo"\nprefix = "> "\n'
    )
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[tasks.a]\nkind = "classify"\nlabels = ["x"]\n[tasks.a.backend]\ntype = "echo"\n'
        '[tasks.b]\nkind = "generate"\n[tasks.b.backend]\ntype = "echo"\nloud = true\n'
    )
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(DRIVER), str(good), str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["types"] == ["echo", "llamacpp", "onnx", "rules"]
    assert out["answers"] == [{"text": "> hi"}]
    assert "| **tasks.NAME.backend. (type = echo)** | | | |" in out["reference"]
    assert (
        '| `tasks.NAME.backend.prefix` | str | `""` | Put before every answer. |'
        in (out["reference"])
    )
    errors = dict(map(tuple, out["errors"]))
    assert "the echo backend only generates" in errors["tasks.a"]
    assert errors["tasks.b.backend.loud"] == "unknown key"


def test_registering_after_the_settings_model_is_built_fails_loudly() -> None:
    import edgeagent.config  # noqa: F401  (builds the config union, sealing the registry)

    rules = backends.backend_types()["rules"]
    late = BackendType(rules.config, rules.build)
    with pytest.raises(RuntimeError, match=r"before importing edgeagent\.config"):
        backends.register(late)


def test_every_built_in_type_is_registered_once() -> None:
    types = backends.backend_types()
    assert list(types) == ["rules", "onnx", "llamacpp"]
    for name, backend_type in types.items():
        assert backend_type.name == name
        assert backend_type.config.model_fields["type"].default == name
