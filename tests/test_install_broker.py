"""`install.sh --system`'s broker step: the mosquitto drop-in and the ACL template are
installed once, an operator's own files are never overwritten, and a mosquitto.conf
that does not read conf.d is reported (the shell function run on a scratch /etc)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.broker import mosquitto_available
from tests.harness import REPO

pytestmark = pytest.mark.skipif(not mosquitto_available(), reason="mosquitto not installed")

SHIPPED = REPO / "examples" / "mosquitto" / "edgeagent.conf"


def _functions() -> str:
    text = (REPO / "install.sh").read_text()
    start = text.index("# -- broker drop-in (system install)")
    end = text.index("# -- development install")
    return text[start:end]


def run_step(etc: Path) -> str:
    """Run install_broker_config with /etc/mosquitto at ``etc``; its output."""
    script = (
        "set -euo pipefail\n"
        'say() { printf "==> %s\\n" "$*"; }\n'
        'note() { printf "    %s\\n" "$*"; }\n'
        'warn() { printf "warning: %s\\n" "$*"; }\n'
        f"SRC={REPO}\n" + _functions() + f"MOSQ_DIR={etc}\n"
        "PATH=$PATH:/usr/sbin\n"
        "install_broker_config\n"
    )
    out = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout + out.stderr


def test_installs_once_and_never_overwrites(tmp_path: Path) -> None:
    etc = tmp_path / "mosquitto"
    etc.mkdir()
    (etc / "mosquitto.conf").write_text(f"persistence true\ninclude_dir {etc}/conf.d\n")
    out = run_step(etc)
    dropin = etc / "conf.d" / "edgeagent.conf"
    assert f"installed {dropin}" in out
    assert f"installed {etc}/edgeagent.acl" in out
    assert dropin.read_text() == SHIPPED.read_text()
    assert f"restart mosquitto to apply {dropin}" in out  # no systemd here
    out = run_step(etc)
    assert f"{dropin} is up to date" in out
    dropin.write_text("max_queued_messages 5000\n")  # the operator's own choice
    out = run_step(etc)
    assert f"kept existing {dropin}" in out
    assert dropin.read_text() == "max_queued_messages 5000\n"


def test_reports_a_config_that_does_not_read_conf_d(tmp_path: Path) -> None:
    etc = tmp_path / "mosquitto"
    etc.mkdir()
    (etc / "mosquitto.conf").write_text("listener 1883 127.0.0.1\n")
    out = run_step(etc)
    assert f"has no 'include_dir {etc}/conf.d'" in out
    assert (etc / "mosquitto.conf").read_text() == "listener 1883 127.0.0.1\n"  # not edited
