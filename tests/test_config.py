"""Config: TOML < env, unknown keys, secrets, check-config exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgeagent.config import ConfigError, load_settings
from edgeagent.config_reference import reference_markdown

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "edgeagent.toml"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    settings, _ = load_settings(EXAMPLE)
    assert set(settings.tasks) >= {"alarm", "reading"}


def test_env_overrides_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = write(tmp_path, 'device_id = "a"\n[mqtt]\nport = 1883\n')
    monkeypatch.setenv("EDGEAGENT_MQTT__PORT", "1884")
    monkeypatch.setenv("EDGEAGENT_DEVICE_ID", "pi-7")
    s, _ = load_settings(p)
    assert s.mqtt.port == 1884 and s.device_id == "pi-7"


def test_env_overrides_a_task_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEAGENT_TASKS__ALARM__THRESHOLD", "0.9")
    s, _ = load_settings(EXAMPLE)
    assert s.tasks["alarm"].threshold == 0.9
    assert s.tasks["alarm"].backend.type == "rules"


def test_config_path_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = write(tmp_path, 'device_id = "from-env"\n')
    monkeypatch.setenv("EDGEAGENT_CONFIG", str(p))
    s, path = load_settings(None)
    assert path == p and s.device_id == "from-env"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[mqtt]\nprot = 1\n", "mqtt.prot"),
        ("bogus = 1\n", "bogus"),
        ("[mqtt]\nport = 70000\n", "mqtt.port"),
        ('[tasks.x]\nkind = "classify"\n[tasks.x.backend]\ntype = "nope"\n', "tasks.x.backend"),
        (
            '[tasks.x]\nkind = "classify"\n[tasks.x.backend]\ntype = "rules"\nrulez = []\n',
            "tasks.x.backend.rulez",
        ),
        ('[tasks.x]\nkind = "classify"\n[tasks.x.backend]\ntype = "rules"\n', "tasks.x"),
        ('[[tasks.x.backend.rules]]\nlabel = "a"\npatterns = ["("]\n', "tasks.x"),
        ('[topics]\nprefix = "a/b"\n', "topics.prefix"),
        (
            '[tasks.x]\nkind = "generate"\n[tasks.x.backend]\ntype = "llamacpp"\n'
            'model = "m.gguf"\ncalibration = "c.json"\n',
            "tasks.x",
        ),
        ("[mqtt\n", "(syntax)"),
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    keys = [k for k, _ in info.value.errors]
    assert any(k.startswith(key) for k in keys), keys


def test_unknown_env_key_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEAGENT_MQTT__PROT", "1")
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, ""))
    assert [k for k, _ in info.value.errors] == ["$EDGEAGENT_MQTT__PROT (mqtt.prot)"]


def test_secrets_from_file_and_systemd_credentials(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    s, _ = load_settings(write(tmp_path, f'[mqtt]\nusername = "u"\npassword_file = "{pw}"\n'))
    assert s.mqtt_password() == "s3cret"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("from-cred")
    (creds / "mqtt-client.key").write_text("KEY")
    s2, _ = load_settings(write(tmp_path, '[mqtt]\nusername = "u"\n'))
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    assert s2.mqtt_password(env) == "from-cred"
    assert s2.tls_key_file(env) == creds / "mqtt-client.key"
    assert "s3cret" not in repr(s)  # SecretStr / never printed


def test_state_dir_defaults_to_systemd_state_directory(tmp_path: Path) -> None:
    s, _ = load_settings(write(tmp_path, ""))
    assert s.state_dir({"STATE_DIRECTORY": "/var/lib/edgeagent"}) == Path("/var/lib/edgeagent")
    assert s.state_dir({}) == Path("state")


def test_check_config_exit_codes(tmp_path: Path) -> None:
    def run(path: Path) -> subprocess.CompletedProcess[str]:
        # --no-load: the example's models are build outputs (test_config_paths.py covers them)
        return subprocess.run(
            [sys.executable, "-m", "edgeagent", "check-config", "--no-load", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    ok = run(EXAMPLE)
    assert ok.returncode == 0, ok.stderr
    bad = run(write(tmp_path, "[mqtt]\nprot = 1\n"))
    assert bad.returncode == 78
    assert "mqtt.prot: unknown key" in bad.stderr
    missing = run(tmp_path / "nope.toml")
    assert missing.returncode == 78 and "cannot read" in missing.stderr


def test_reference_lists_every_section() -> None:
    ref = reference_markdown()
    for key in ("`mqtt.port`", "`mqtt.tls.ca_file`", "`store.synchronous`", "`threshold`"):
        assert key in ref


def test_blank_systemd_credential_counts_as_absent(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("\n")
    (creds / "mqtt-client.key").write_text("")
    s, _ = load_settings(write(tmp_path, '[mqtt]\nusername = "u"\n'))
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    assert s.mqtt_password(env) is None
    assert s.tls_key_file(env) is None


def test_readme_reference_and_message_schemas_are_up_to_date() -> None:
    from edgeagent.config_reference import REF_END, REF_START
    from edgeagent.schemas import HERE, generate, render

    readme = (REPO / "README.md").read_text()
    section = readme.split(REF_START)[1].split(REF_END)[0].strip()
    assert section == reference_markdown().strip(), (
        "run: edgeagent config-reference --update README.md"
    )
    for name, schema in generate().items():
        assert (HERE / name).read_text() == render(schema), "run: python -m edgeagent.schemas"


@pytest.mark.parametrize("name", ["edgeagent.toml", "intent.toml", "extract.toml"])
def test_every_example_config_is_valid(name: str) -> None:
    settings, _ = load_settings(REPO / "examples" / name)
    assert settings.tasks


def test_example_cloud_config_is_valid() -> None:
    from edgeagent.cloud.config import load_cloud_settings

    settings, _ = load_cloud_settings(REPO / "examples" / "cloud.toml")
    assert settings.llm.base_url


@pytest.mark.parametrize(
    ("task", "message"),
    [
        (
            'kind = "extract"\nschema = { type = "object", properties.unit = { enum = ["C"] } }\n'
            "[[tasks.x.backend.examples]]\n"
            'input = "t1 21 F"\noutput = { unit = "F" }\n',
            "examples[0].output: not valid against `schema`",
        ),
        (
            'kind = "extract"\n[[tasks.x.backend.examples]]\ninput = "a"\noutput = "a"\n',
            "examples[0].output: an extract example's output must be an object",
        ),
        (
            'kind = "classify"\nlabels = ["on", "off"]\n'
            '[[tasks.x.backend.examples]]\ninput = "lights please"\noutput = "dim"\n',
            "examples[0].output: 'dim' is not one of `labels`",
        ),
    ],
)
def test_few_shot_examples_must_be_answers_the_task_accepts(
    tmp_path: Path, task: str, message: str
) -> None:
    # The examples table follows the backend table, so put the backend keys first.
    head, _, examples = task.partition("[[")
    text = f'[tasks.x]\n{head}[tasks.x.backend]\ntype = "llamacpp"\nmodel = "m.gguf"\n' + (
        f"[[{examples}" if examples else ""
    )
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    assert any(message in m for _, m in info.value.errors), info.value.errors


RULES_CLASSIFY = '[tasks.x]\nkind = "classify"\n[tasks.x.backend]\ntype = "rules"\n'


@pytest.mark.parametrize(
    ("text", "key", "pattern"),
    [
        (
            RULES_CLASSIFY
            + '[[tasks.x.backend.rules]]\nlabel = "a"\npatterns = ["ok", "(a)\\\\1"]\n',
            "tasks.x.backend.rules.0.patterns",
            "(a)\\\\1",
        ),
        (
            '[tasks.x]\nkind = "extract"\n[tasks.x.backend]\ntype = "rules"\n'
            'fields.v = "(?<=v=)[0-9]+"\n',
            "tasks.x.backend.fields",
            "(?<=v=)[0-9]+",
        ),
        (
            RULES_CLASSIFY + '[[tasks.x.backend.rules]]\nlabel = "a"\nkeywords = ["a"]\n'
            "[tasks.x.redact_patterns]\nticket = 'T-(?!0)[0-9]+'\n",
            "tasks.x",
            "T-(?!0)[0-9]+",
        ),
    ],
)
def test_pattern_the_linear_engine_cannot_run_is_rejected_at_load(
    tmp_path: Path, text: str, key: str, pattern: str
) -> None:
    """Backreferences and lookaround need backtracking (issue 9: a regex froze the
    daemon); they are refused when the config is loaded, with the key and pattern."""
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    errors = info.value.errors
    assert any(k.startswith(key) and pattern in msg and "RE2" in msg for k, msg in errors), errors


def test_redact_region_is_checked(tmp_path: Path) -> None:
    base = RULES_CLASSIFY + '[[tasks.x.backend.rules]]\nlabel = "a"\nkeywords = ["a"]\n'
    s, _ = load_settings(write(tmp_path, base))
    assert s.tasks["x"].redact_region == "US"
    text = base.replace('kind = "classify"\n', 'kind = "classify"\nredact_region = "de"\n')
    s, _ = load_settings(write(tmp_path, text))
    assert s.tasks["x"].redact_region == "DE"
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text.replace('"de"', '"XX"')))
    assert [k for k, _ in info.value.errors] == ["tasks.x.redact_region"]
