"""The unit files parse cleanly with the local systemd and keep their contract.

``systemd-analyze verify`` refuses a unit whose ExecStart binary does not exist, and
``/opt/edgeagent/venv/bin/edgeagent`` only exists after ``install.sh --system``.  So
each unit is verified as a copy in a temporary directory whose ExecStart names an
executable that does exist; every other line is verified as written.  Unknown keys
and bad values are only warnings (exit code 0), so any output fails the test.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from edgeagent import exitcodes

UNITS = Path(__file__).resolve().parent.parent / "systemd"
INSTALLED_EXE = "/opt/edgeagent/venv/bin/edgeagent"
ANALYZE = shutil.which("systemd-analyze")

pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")


def _directives(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines (all sections), values in order of appearance."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def _verifiable_copy(unit: str, tmp_path: Path) -> Path:
    text = (UNITS / unit).read_text()
    assert INSTALLED_EXE in text
    copy = tmp_path / unit
    copy.write_text(text.replace(INSTALLED_EXE, "/bin/true"))
    return copy


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("unit", ["edgeagent.service", "edgeagent-cloud.service"])
def test_unit_verifies_without_warnings(unit: str, tmp_path: Path) -> None:
    copy = _verifiable_copy(unit, tmp_path)
    result = _analyze("verify", str(copy))
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


@pytest.mark.parametrize("unit", ["edgeagent.service", "edgeagent-cloud.service"])
def test_unit_sandbox_exposure_is_low(unit: str, tmp_path: Path) -> None:
    copy = _verifiable_copy(unit, tmp_path)
    result = _analyze("security", "--offline=true", "--no-pager", str(copy))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    # 1.7 with systemd 252; anything above 3 means a hardening line was lost.
    assert float(match.group(1)) < 3.0, result.stdout


def test_daemon_unit_contract() -> None:
    """What the daemon and install.sh rely on (see edgeagent/systemd.py, config.py)."""
    d = _directives((UNITS / "edgeagent.service").read_text())
    assert d["Type"] == ["notify"]
    assert d["ExecStart"] == [f"{INSTALLED_EXE} run --config /etc/edgeagent/edgeagent.toml"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["WatchdogSec"] == ["30"]
    assert d["Restart"] == ["on-failure"]
    # Exit codes a restart cannot fix (edgeagent/exitcodes.py): config, damaged or newer state.
    assert set(" ".join(d["RestartPreventExitStatus"]).split()) == {
        str(code) for code in exitcodes.NOT_RESTARTED
    }
    assert {
        exitcodes.EXIT_CONFIG,
        exitcodes.EXIT_STATE_CORRUPT,
        exitcodes.EXIT_STATE_NEWER,
    } == exitcodes.NOT_RESTARTED
    assert (d["User"], d["Group"]) == (["edgeagent"], ["edgeagent"])
    assert "DynamicUser" not in d
    assert d["StateDirectory"] == ["edgeagent"]
    assert d["LoadCredential"] == [
        "mqtt-password:/etc/edgeagent/credentials/mqtt-password",
        "mqtt-client.key:/etc/edgeagent/credentials/mqtt-client.key",
    ]
    # Each credential has a default, so a missing file does not fail the unit.
    defaults = {value.partition(":")[0] for value in d["SetCredential"]}
    assert defaults == {"mqtt-password", "mqtt-client.key"}
    assert d["CapabilityBoundingSet"] == [""]
    assert d["MemoryDenyWriteExecute"] == ["no"]
    assert d["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    assert d["PrivateMounts"] == ["yes"]
    # onnxruntime reads /proc/cpuinfo (CPU features on ARM): no ProcSubset=pid here.
    assert "ProcSubset" not in d


def test_cloud_unit_contract() -> None:
    d = _directives((UNITS / "edgeagent-cloud.service").read_text())
    assert d["Type"] == ["simple"]
    assert d["ExecStart"] == [f"{INSTALLED_EXE} cloud --config /etc/edgeagent/cloud.toml"]
    assert d["RestartPreventExitStatus"] == [str(exitcodes.EXIT_CONFIG)]
    # `systemctl reload` would send SIGHUP, which the agent does not reload on.
    assert "ExecReload" not in d
    assert d["ProcSubset"] == ["pid"]
    assert d["LoadCredential"] == [
        "mqtt-password:/etc/edgeagent/credentials/mqtt-password",
        "mqtt-client.key:/etc/edgeagent/credentials/mqtt-client.key",
        "llm-api-key:/etc/edgeagent/credentials/llm-api-key",
    ]
    defaults = {value.partition(":")[0] for value in d["SetCredential"]}
    assert defaults == {"mqtt-password", "mqtt-client.key", "llm-api-key"}
    daemon = _directives((UNITS / "edgeagent.service").read_text())
    hardening = [
        "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "NoNewPrivileges",
        "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
        "ProtectControlGroups", "ProtectClock", "ProtectHostname", "RestrictAddressFamilies",
        "RestrictNamespaces", "LockPersonality", "RestrictRealtime", "RestrictSUIDSGID",
        "SystemCallArchitectures", "SystemCallFilter", "CapabilityBoundingSet", "UMask",
        "PrivateMounts",
    ]  # fmt: skip
    for key in hardening:
        assert d.get(key) == daemon.get(key), key
