"""Relative paths in a config file, check-config's model checks, env-var error naming."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeagent.config import ConfigError, load_settings

REPO = Path(__file__).resolve().parents[1]

ONNX_TASK = """
[mqtt]
password_file = "secrets/pw"

[tasks.intent]
kind = "classify"
[tasks.intent.backend]
type = "onnx"
bundle = "models/intent"
"""


def _check(config: Path, *extra: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeagent", "check-config", "--config", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_relative_paths_resolve_against_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    (conf_dir / "secrets").mkdir(parents=True)
    (conf_dir / "secrets" / "pw").write_text("s3cret\n")
    config = conf_dir / "edgeagent.toml"
    config.write_text(ONNX_TASK)
    monkeypatch.chdir(tmp_path)  # elsewhere: under systemd the working directory is /
    s, _ = load_settings(config)
    assert s.mqtt.password_file == conf_dir / "secrets" / "pw"
    assert s.mqtt_password() == "s3cret"
    assert s.tasks["intent"].backend.bundle == conf_dir / "models" / "intent"  # type: ignore[union-attr]


def test_parent_references_are_normalised_and_absolute_paths_kept(tmp_path: Path) -> None:
    config = tmp_path / "examples" / "c.toml"
    config.parent.mkdir()
    config.write_text(
        '[tasks.a]\nkind = "extract"\nschema = {type = "object"}\n'
        '[tasks.a.backend]\ntype = "llamacpp"\nmodel = "../models/m.gguf"\n'
        '[store]\nstate_dir = "/var/lib/x"\n'
    )
    s, _ = load_settings(config)
    assert s.tasks["a"].backend.model == tmp_path / "models" / "m.gguf"  # type: ignore[union-attr]
    assert s.store.state_dir == Path("/var/lib/x")


def test_a_path_from_the_environment_keeps_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[store]\nstate_dir = "state-from-file"\n')
    assert load_settings(config)[0].store.state_dir == tmp_path / "state-from-file"
    monkeypatch.setenv("EDGEAGENT_STORE__STATE_DIR", "rel/state")
    assert load_settings(config)[0].store.state_dir == Path("rel/state")


def test_an_env_override_error_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[mqtt]\nport = 1883\n")
    monkeypatch.setenv("EDGEAGENT_MQTT__PORT", "70000")
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert info.value.source == "environment"
    [(key, _)] = info.value.errors
    assert key.startswith("$EDGEAGENT_MQTT__PORT")
    assert str(config) not in str(info.value)


def test_a_file_error_still_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[mqtt]\nport = 70000\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert info.value.source == str(config)
    assert info.value.errors[0][0] == "mqtt.port"


def test_check_config_names_the_missing_model_and_the_command(tmp_path: Path) -> None:
    config = tmp_path / "examples" / "edgeagent.toml"  # as in a checkout with no models/ yet
    config.parent.mkdir()
    config.write_text((REPO / "examples" / "edgeagent.toml").read_text())
    out = _check(config)
    assert out.returncode == 78
    assert "Traceback" not in out.stderr
    assert f"{tmp_path}/models/bundles/intent/latest does not exist" in out.stderr
    assert "models/build_default.sh" in out.stderr
    assert "edgeagent models pull smollm2" in out.stderr
    # The file itself is fine.
    ok = _check(config, "--no-load")
    assert ok.returncode == 0, ok.stderr


def test_check_config_catches_a_bundle_that_does_not_match_its_manifest(tmp_path: Path) -> None:
    bundle = tmp_path / "models" / "intent"
    bundle.mkdir(parents=True)
    (bundle / "head.json").write_text("{}")
    manifest = {"files": {"head.json": {"sha256": "0" * 64, "bytes": 2}}}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    config = tmp_path / "c.toml"
    config.write_text(ONNX_TASK.replace('password_file = "secrets/pw"', ""))
    out = _check(config, cwd=tmp_path.parent)
    assert out.returncode == 78, out.stdout
    assert "tasks.intent:" in out.stderr and "Traceback" not in out.stderr
