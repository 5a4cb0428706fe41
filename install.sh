#!/usr/bin/env bash
# Install edgeagent from this checkout: a development venv (default) or a system service.
# Safe to run again: every step checks what is already there and says what it did.
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROG="$(basename "$0")"

SYSTEM_USER=edgeagent
OPT_DIR=/opt/edgeagent
SYSTEM_VENV="$OPT_DIR/venv"
ETC_DIR=/etc/edgeagent
CRED_DIR="$ETC_DIR/credentials"
STATE_DIR=/var/lib/edgeagent
UNIT_DIR=/etc/systemd/system
MIN_PY="3.10"

usage() {
    cat <<EOF
Usage: $PROG [--system [--cloud]] [--demo] [--extras LIST] [--python PATH] [--mqtt-host HOST] [--mqtt-port PORT]
             [--no-broker]

Install edgeagent from this checkout ($SRC).

Modes:
  (default)       Development: create or reuse $SRC/.venv, upgrade pip and
                  'pip install -e .[test,EXTRAS]'.  Needs no root.
  --system        Service (root only): system user '$SYSTEM_USER', a venv in $SYSTEM_VENV
                  with the package (not editable) and EXTRAS, $ETC_DIR/edgeagent.toml from
                  examples/edgeagent.toml if there is none yet (an existing one is never
                  touched), $CRED_DIR/ (0700), $STATE_DIR, the unit files in
                  $UNIT_DIR, and 'systemctl enable --now edgeagent' when systemd runs.
                  With a local mosquitto: the broker drop-in
                  /etc/mosquitto/conf.d/edgeagent.conf and the ACL template
                  /etc/mosquitto/edgeagent.acl (existing files are never touched).

Options:
  --extras LIST   Comma-separated optional dependencies: onnx, llamacpp, build, test.
                  Development mode always adds 'test'; --system installs only LIST.
  --python PATH   Interpreter for the venv (Python >= $MIN_PY).  Default: python3 on PATH;
                  with --system, /usr/bin/python3 (the service cannot run an interpreter
                  under /root or /home: ProtectHome=yes hides them).
  --mqtt-host H   Broker to check (default: [mqtt] host in the config, else 127.0.0.1).
  --mqtt-port P   Broker port to check (default: [mqtt] port in the config, else 1883).
  --no-broker     Do not check for a broker, install mosquitto or its drop-in.
  --cloud         With --system: also install $ETC_DIR/cloud.toml (from examples/cloud.toml,
                  never overwritten) for edgeagent-cloud.service, and check it.
  --demo          A development install with the onnx, build and cloud extras, then: build
                  the INT8 encoder (models/build_default.sh) and train the intent head
                  (examples/intent-examples.jsonl) unless they exist, start the daemon
                  (examples/demo.toml), a local cloud agent and its stand-in LLM, submit
                  jobs with 'edgeagent submit', print what a consumer sees and the stats,
                  and stop everything again.  With --extras llamacpp it also pulls SmolLM2
                  and runs examples/edgeagent.toml (GGUF extraction).
  --torch-index U Where the build extra's torch comes from when no local torch file
                  satisfies it: the PyTorch CPU wheel index (default
                  $TORCH_INDEX; also \$EDGEAGENT_TORCH_INDEX).  Used
                  only if it answers within 5 s; '' = PyPI's torch (CUDA on Linux x86_64).
  --test          After a development install (with every extra the tests use): run
                  ruff, ruff format --check, mypy --strict and the whole pytest suite.
  -h, --help      Show this help.

If no broker answers on a local address, Debian's mosquitto is installed and started
(root and apt-get needed; otherwise the command to do so is printed).

Examples:
  ./$PROG                                  # dev venv with tests
  ./$PROG --extras onnx                    # dev venv with tests and onnxruntime
  sudo ./$PROG --system --extras onnx      # service on a device
EOF
}

say() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

SYSTEM=0
EXTRAS=""
PYTHON=""
MQTT_HOST=""
MQTT_PORT=""
CHECK_BROKER=1
CLOUD=0
THEN=""
# PyTorch's CPU-only wheels: PyPI's Linux x86_64 torch depends on ~3 GB of CUDA libraries.
TORCH_INDEX="${EDGEAGENT_TORCH_INDEX-https://download.pytorch.org/whl/cpu}"

while [ $# -gt 0 ]; do
    case "$1" in
        --system) SYSTEM=1 ;;
        --extras)
            [ $# -ge 2 ] || die "--extras needs a value (e.g. --extras onnx,llamacpp)"
            EXTRAS="$2"
            shift
            ;;
        --extras=*) EXTRAS="${1#*=}" ;;
        --python)
            [ $# -ge 2 ] || die "--python needs a path"
            PYTHON="$2"
            shift
            ;;
        --python=*) PYTHON="${1#*=}" ;;
        --mqtt-host)
            [ $# -ge 2 ] || die "--mqtt-host needs a value"
            MQTT_HOST="$2"
            shift
            ;;
        --mqtt-host=*) MQTT_HOST="${1#*=}" ;;
        --mqtt-port)
            [ $# -ge 2 ] || die "--mqtt-port needs a value"
            MQTT_PORT="$2"
            shift
            ;;
        --mqtt-port=*) MQTT_PORT="${1#*=}" ;;
        --no-broker) CHECK_BROKER=0 ;;
        --cloud) CLOUD=1 ;;
        --demo) THEN="demo" ;;
        --torch-index)
            [ $# -ge 2 ] || die "--torch-index needs a URL (or '' for PyPI's default torch)"
            TORCH_INDEX="$2"
            shift
            ;;
        --torch-index=*) TORCH_INDEX="${1#*=}" ;;
        --test) THEN="test" ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) die "unknown argument: $1 (see $PROG --help)" 
            ;;
    esac
    shift
done

# Extras the whole test suite needs (--test adds them): the ONNX runtime and the build
# tools (a small model is built in the tests), llama-cpp-python (compiled; the tests pull
# SmolLM2 from PyPI), httpx for the cloud agent.
TEST_EXTRAS="test,onnx,build,llamacpp,llamacpp-server,cloud"

IS_ROOT=0
[ "$(id -u)" -eq 0 ] && IS_ROOT=1

# -- extras -----------------------------------------------------------------------

# "a, b,,c" -> "a,b,c"; only names pip accepts.
normalize_extras() {
    local out="" item
    local -a items
    IFS=',' read -r -a items <<<"$1"
    for item in "${items[@]}"; do
        item="${item// /}"
        [ -n "$item" ] || continue
        [[ "$item" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "bad extra name: '$item'"
        case ",$out," in *",$item,"*) continue ;; esac
        out="${out:+$out,}$item"
    done
    printf '%s' "$out"
}

EXTRAS="$(normalize_extras "$EXTRAS")"
[ "$THEN" != "demo" ] || EXTRAS="$(normalize_extras "$EXTRAS,onnx,build,cloud")"
[ "$THEN" != "test" ] || EXTRAS="$(normalize_extras "$EXTRAS,$TEST_EXTRAS")"
if [ "$SYSTEM" -eq 0 ]; then
    EXTRAS="$(normalize_extras "test,$EXTRAS")"
fi
for extra in ${EXTRAS//,/ }; do
    if ! grep -Eq "^[[:space:]]*\"?$extra\"?[[:space:]]*=" "$SRC/pyproject.toml"; then
        warn "pyproject.toml defines no extra '$extra'; pip will ignore it"
    fi
done
PKG_SPEC_SUFFIX="${EXTRAS:+[$EXTRAS]}"
# llama-cpp-python compiles llama.cpp: build for any CPU of this architecture, not only
# this one (override with your own CMAKE_ARGS, e.g. for BLAS or ARM tuning).
case ",$EXTRAS," in
    *,llamacpp,* | *,test,*) export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" ;;
esac

# -- python -----------------------------------------------------------------------

if [ -z "$PYTHON" ]; then
    if [ "$SYSTEM" -eq 1 ] && [ -x /usr/bin/python3 ]; then
        PYTHON=/usr/bin/python3
    else
        PYTHON="$(command -v python3 || true)"
    fi
fi
[ -n "$PYTHON" ] || die "python3 not found; install Python >= $MIN_PY (Debian: apt-get install python3 python3-venv)"
command -v "$PYTHON" >/dev/null 2>&1 || die "no such interpreter: $PYTHON"

PY_VERSION="$("$PYTHON" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null)" ||
    die "$PYTHON does not run"
if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
    die "edgeagent needs Python >= $MIN_PY; $PYTHON is $PY_VERSION (use --python PATH)"
fi

ensure_venv_module() {
    # Debian splits venv/ensurepip into python3-venv.
    if "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        return 0
    fi
    local pkg
    pkg="python$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"
    if [ "$IS_ROOT" -eq 1 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing $pkg (the venv module is missing)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y "$pkg" >/dev/null ||
            DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv >/dev/null ||
            die "could not install $pkg"
    else
        die "$PYTHON has no venv module; install it first: sudo apt-get install $pkg"
    fi
}

# make_venv DIR: create DIR as a venv unless it is one already made with Python >= 3.10.
make_venv() {
    local dir="$1"
    if [ -x "$dir/bin/python" ] &&
        "$dir/bin/python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
        say "reusing venv $dir ($("$dir/bin/python" --version 2>&1))"
        return 0
    fi
    if [ -e "$dir" ]; then
        warn "$dir exists but is not a usable venv; recreating it"
        rm -rf "$dir"
    fi
    ensure_venv_module
    say "creating venv $dir with $PYTHON ($PY_VERSION)"
    "$PYTHON" -m venv "$dir"
}

pip_quiet() {
    "$@" --disable-pip-version-check --no-input -q
}

# -- broker -----------------------------------------------------------------------

# Reads [mqtt] host/port from a TOML file (Python >= 3.11 has tomllib); prints "host port".
config_broker() {
    local file="$1"
    [ -r "$file" ] || return 0
    "$PYTHON" - "$file" 2>/dev/null <<'PY' || true
import sys
try:
    import tomllib
except ImportError:
    sys.exit(0)
with open(sys.argv[1], "rb") as fh:
    mqtt = tomllib.load(fh).get("mqtt", {})
print(mqtt.get("host", ""), mqtt.get("port", ""))
PY
}

broker_answers() {
    # shellcheck disable=SC2016  # $1/$2 expand in the child bash, from its arguments
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

is_local_host() {
    case "$1" in
        127.* | localhost | ::1 | "$(hostname 2>/dev/null || echo localhost)") return 0 ;;
        *) return 1 ;;
    esac
}

start_mosquitto() {
    if [ -d /run/systemd/system ]; then
        systemctl enable --now mosquitto
    else
        mosquitto -d -c /etc/mosquitto/mosquitto.conf
    fi
}

check_broker() {
    local host="$MQTT_HOST" port="$MQTT_PORT" from_config="" cfg_host="" cfg_port=""
    if [ -z "$host" ] || [ -z "$port" ]; then
        local cfg="${EDGEAGENT_CONFIG:-$ETC_DIR/edgeagent.toml}"
        read -r cfg_host cfg_port <<<"$(config_broker "$cfg")" || true
        [ -n "${cfg_host:-}${cfg_port:-}" ] && from_config=" (from $cfg)"
        host="${host:-${EDGEAGENT_MQTT__HOST:-${cfg_host:-127.0.0.1}}}"
        port="${port:-${EDGEAGENT_MQTT__PORT:-${cfg_port:-1883}}}"
    fi
    [[ "$port" =~ ^[0-9]+$ ]] || die "bad MQTT port: $port"
    if broker_answers "$host" "$port"; then
        say "MQTT broker answers on $host:$port$from_config"
        return 0
    fi
    if ! is_local_host "$host"; then
        warn "no MQTT broker answers on $host:$port$from_config; it is not this host, so" \
            "nothing is installed here. The daemon keeps retrying until it answers."
        return 0
    fi
    if [ "$port" != 1883 ]; then
        warn "no MQTT broker answers on $host:$port$from_config; Debian's mosquitto listens" \
            "on 1883, so it is not installed automatically for port $port."
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        warn "no MQTT broker answers on $host:$port and apt-get is not available;" \
            "install an MQTT broker (e.g. mosquitto) yourself."
        return 0
    fi
    if [ "$IS_ROOT" -eq 0 ]; then
        warn "no MQTT broker answers on $host:$port. To install Debian's mosquitto:"
        note "sudo apt-get update && sudo apt-get install -y mosquitto"
        note "sudo systemctl enable --now mosquitto   # or: sudo mosquitto -d -c /etc/mosquitto/mosquitto.conf"
        return 0
    fi
    if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
        say "no MQTT broker answers on $host:$port; installing Debian's mosquitto"
        DEBIAN_FRONTEND=noninteractive apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q mosquitto
        # The package starts it where systemd runs; give it a moment.
        sleep 1
        broker_answers "$host" "$port" && {
            say "mosquitto answers on $host:$port"
            return 0
        }
    elif pgrep -x mosquitto >/dev/null 2>&1; then
        warn "mosquitto is running but does not answer on $host:$port; check its listeners" \
            "in /etc/mosquitto/ (not starting a second one)"
        return 0
    else
        say "no MQTT broker answers on $host:$port; mosquitto is installed, starting it"
    fi
    if ! PATH="$PATH:/usr/sbin" start_mosquitto; then
        warn "could not start mosquitto; see /var/log/mosquitto/ (or journalctl -u mosquitto)"
        return 0
    fi
    local i
    for i in 1 2 3 4 5 6 7 8 9 10; do
        broker_answers "$host" "$port" && {
            say "mosquitto answers on $host:$port"
            return 0
        }
        sleep "0.$i"
    done
    warn "started mosquitto, but nothing answers on $host:$port yet; see /var/log/mosquitto/"
}

# -- broker drop-in (system install) -----------------------------------------------

MOSQ_DIR=/etc/mosquitto

have_mosquitto() {
    command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]
}

# install_if_absent SRC DEST MODE: copy unless DEST exists (an operator's file is never
# overwritten).  Returns 0 if it copied, 1 if it left DEST alone; says which.
install_if_absent() {
    local src="$1" dest="$2" mode="$3"
    if [ -e "$dest" ]; then
        if cmp -s "$src" "$dest"; then
            say "$dest is up to date"
        else
            say "kept existing $dest (it differs from ${src#"$SRC"/}; compare them)"
        fi
        return 1
    fi
    install -m "$mode" "$src" "$dest"
    say "installed $dest from ${src#"$SRC"/}"
}

# The mosquitto drop-in (persistence, queue and in-flight limits, TCP_NODELAY) and the
# ACL template, for a mosquitto on this host.  Without the drop-in Debian's defaults
# drop queued jobs beyond 1000 per client.  Restarts mosquitto only when the drop-in is
# new, and takes it out again if mosquitto then fails to start.
install_broker_config() {
    local conf="$MOSQ_DIR/mosquitto.conf" dropin="$MOSQ_DIR/conf.d/edgeagent.conf"
    if ! have_mosquitto; then
        note "no mosquitto on this host: no broker drop-in installed; for a broker elsewhere" \
            "see examples/mosquitto/edgeagent.conf"
        return 0
    fi
    install -d -m 0755 "$MOSQ_DIR/conf.d"
    install_if_absent "$SRC/examples/mosquitto/edgeagent.acl" "$MOSQ_DIR/edgeagent.acl" 0644 || true
    install_if_absent "$SRC/examples/mosquitto/edgeagent.conf" "$dropin" 0644 || return 0
    if [ -f "$conf" ] && ! grep -Eq "^[[:space:]]*include_dir[[:space:]]+$MOSQ_DIR/conf.d/?[[:space:]]*$" "$conf"; then
        warn "$conf has no 'include_dir $MOSQ_DIR/conf.d', so mosquitto does not read" \
            "$dropin: add that line (Debian's stock file has it) and restart mosquitto"
        return 0
    fi
    if ! [ -d /run/systemd/system ] || ! systemctl is-active --quiet mosquitto; then
        note "restart mosquitto to apply $dropin"
        return 0
    fi
    if systemctl restart mosquitto && sleep 1 && systemctl is-active --quiet mosquitto; then
        say "restarted mosquitto with $dropin (persistence, max_queued_messages 100000, set_tcp_nodelay)"
        return 0
    fi
    warn "mosquitto did not start with $dropin (see journalctl -u mosquitto); moved it to" \
        "$dropin.disabled and restarted mosquitto without it"
    mv "$dropin" "$dropin.disabled"
    systemctl restart mosquitto || warn "mosquitto does not start: see journalctl -u mosquitto"
}

# -- torch (build extra) ----------------------------------------------------------

# The torch requirement of the build extra, e.g. "torch==2.13.0".
torch_requirement() {
    grep -Eo '"torch[^"]*"' "$SRC/pyproject.toml" | head -1 | tr -d '"'
}

# url_answers PY URL: 0 if an HTTP(S) GET of URL succeeds within 5 s.  `timeout` bounds
# what urllib's timeout does not (a DNS lookup that hangs).
url_answers() {
    timeout 8 "$1" - "$2" <<'PY' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=5).close()
PY
}

# ensure_torch VENV_PYTHON: before the build extra is installed, put a CPU torch in the
# venv when pip would otherwise fetch PyPI's CUDA build.  In order: torch already
# installed at the pinned version; a local torch file pip's own configuration finds
# (find-links); the PyTorch CPU index if it answers; else PyPI's torch (with a warning).
ensure_torch() {
    local py="$1" req
    case ",$EXTRAS," in *,build,*) ;; *) return 0 ;; esac
    req="$(torch_requirement)"
    [ -n "$req" ] || return 0
    if "$py" - "$req" <<'PY' 2>/dev/null; then
import sys
from importlib.metadata import PackageNotFoundError, version
spec = sys.argv[1]
want = spec.split("==", 1)[1] if "==" in spec else None
try:
    have = version("torch").split("+")[0]
except PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if want is None or have == want else 1)
PY
        say "torch: $req already installed"
        return 0
    fi
    case "$(uname -s)/$(uname -m)" in
        Linux/x86_64) ;;
        *)
            note "torch: PyPI's $req for $(uname -m) has no CUDA libraries; installing it from PyPI"
            return 0
            ;;
    esac
    if pip_quiet "$py" -m pip install --dry-run --no-index --no-deps "$req" >/dev/null 2>&1; then
        say "torch: a local $req file (pip's find-links) will be used"
        return 0
    fi
    if [ -n "$TORCH_INDEX" ] && url_answers "$py" "${TORCH_INDEX%/}/torch/"; then
        say "torch: installing $req from the CPU wheel index $TORCH_INDEX (~200 MB, not ~3 GB of CUDA)"
        pip_quiet "$py" -m pip install --index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple "$req"
        return 0
    fi
    warn "torch: ${TORCH_INDEX:-no CPU index set} does not answer; pip will install $req from" \
        "PyPI, which on Linux x86_64 pulls ~3 GB of CUDA libraries (--torch-index URL to change)"
}

# -- development install ----------------------------------------------------------

dev_install() {
    local venv="$SRC/.venv"
    make_venv "$venv"
    say "upgrading pip in $venv"
    pip_quiet "$venv/bin/python" -m pip install --upgrade pip
    ensure_torch "$venv/bin/python"
    say "installing edgeagent (editable) with extras [$EXTRAS]"
    pip_quiet "$venv/bin/python" -m pip install -e "$SRC$PKG_SPEC_SUFFIX"
    if [ "$CHECK_BROKER" -eq 1 ]; then
        check_broker
        if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
            warn "the integration tests start their own mosquitto and none is installed:" \
                "sudo apt-get install -y mosquitto"
        fi
    fi
    cat <<EOF

Done: development install in $venv (extras: $EXTRAS).
Next steps:
  . $venv/bin/activate
  pytest                               # unit and integration tests
  ruff check . && mypy --strict edgeagent
  edgeagent check-config --config examples/edgeagent.toml
  edgeagent run --config examples/edgeagent.toml
EOF
}

# -- system install ---------------------------------------------------------------

copy_source() {
    # Build from a clean copy so the checkout gets no build/ or *.egg-info, and
    # uncommitted changes are included (unlike git archive).
    local dest="$1"
    mkdir -p "$dest"
    tar -C "$SRC" \
        --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
        --exclude='./*.egg-info' --exclude='__pycache__' --exclude=./.mypy_cache \
        --exclude=./.pytest_cache --exclude=./.ruff_cache --exclude=./.ci-venvs \
        -cf - . | tar -C "$dest" -xf -
}

# install_models: models prepared in the checkout (./install.sh --demo, models pull --dest
# models/gguf) go to $STATE_DIR/models, where the service can read them; existing ones stay.
install_models() {
    local models="$STATE_DIR/models" src name
    install -d -m 0755 -o root -g root "$models"
    for src in "$SRC"/models/bundles/*/latest; do
        [ -e "$src/manifest.json" ] || continue
        name="$(basename "$(dirname "$src")")"
        if [ -e "$models/bundles/$name/latest" ]; then
            say "model bundle $models/bundles/$name/latest exists (kept)"
            continue
        fi
        install -d -m 0755 "$models/bundles/$name"
        cp -rL "$src" "$models/bundles/$name/latest"
        chmod -R a+rX "$models/bundles/$name"
        say "copied model bundle $name to $models/bundles/$name/latest"
    done
    for src in "$SRC"/models/gguf/*.gguf; do
        [ -f "$src" ] || continue
        if [ -e "$models/gguf/$(basename "$src")" ]; then
            say "GGUF $models/gguf/$(basename "$src") exists (kept)"
            continue
        fi
        install -d -m 0755 "$models/gguf"
        install -m 0644 "$src" "$models/gguf/"
        say "copied $(basename "$src") to $models/gguf/"
    done
}

# install_cloud_config: /etc/edgeagent/cloud.toml from examples/cloud.toml, never overwritten.
install_cloud_config() {
    if [ -e "$ETC_DIR/cloud.toml" ]; then
        say "kept existing $ETC_DIR/cloud.toml"
    else
        install -m 0640 -o root -g "$SYSTEM_USER" "$SRC/examples/cloud.toml" "$ETC_DIR/cloud.toml"
        say "installed $ETC_DIR/cloud.toml from examples/cloud.toml (root:$SYSTEM_USER 0640); set [llm]"
    fi
    note "API key: $CRED_DIR/llm-api-key (root, 0600; systemd credential llm-api-key)"
    "$SYSTEM_VENV/bin/edgeagent" cloud --config "$ETC_DIR/cloud.toml" --check ||
        warn "'edgeagent cloud --check' rejected $ETC_DIR/cloud.toml (see above)"
}

system_install() {
    [ "$IS_ROOT" -eq 1 ] || die "--system needs root (try: sudo $0 --system${EXTRAS:+ --extras $EXTRAS})"
    local real
    real="$(readlink -f "$PYTHON")"
    case "$real" in
        /root/* | /home/*)
            die "$PYTHON resolves to $real; the service user cannot run it there" \
                "(and ProtectHome=yes hides it). Use --python /usr/bin/python3."
            ;;
    esac

    # User and group.
    if getent passwd "$SYSTEM_USER" >/dev/null; then
        say "system user $SYSTEM_USER exists"
    else
        local nologin
        nologin="$(command -v nologin || echo /usr/sbin/nologin)"
        useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
            --shell "$nologin" --comment "edgeagent daemon" "$SYSTEM_USER"
        say "created system user and group $SYSTEM_USER (shell $nologin)"
    fi

    # The venv and the package.
    install -d -m 0755 "$OPT_DIR"
    make_venv "$SYSTEM_VENV"
    say "upgrading pip in $SYSTEM_VENV"
    pip_quiet "$SYSTEM_VENV/bin/python" -m pip install --upgrade pip
    local tmp wheel
    local -a wheels
    tmp="$(mktemp -d)"
    # shellcheck disable=SC2064  # expand $tmp now: it is local to this function
    trap "rm -rf '$tmp'" EXIT
    copy_source "$tmp/src"
    say "building the edgeagent wheel from $SRC"
    pip_quiet "$SYSTEM_VENV/bin/python" -m pip wheel --no-deps -w "$tmp/dist" "$tmp/src"
    wheels=("$tmp"/dist/edgeagent-*.whl)
    [ -f "${wheels[0]}" ] || die "pip wheel produced no edgeagent wheel"
    wheel="${wheels[0]}"
    ensure_torch "$SYSTEM_VENV/bin/python"
    say "installing $(basename "$wheel")${EXTRAS:+ with extras [$EXTRAS]}"
    pip_quiet "$SYSTEM_VENV/bin/python" -m pip install "$wheel$PKG_SPEC_SUFFIX"
    # Same version number, new code: replace the package itself, keep its dependencies.
    pip_quiet "$SYSTEM_VENV/bin/python" -m pip install --force-reinstall --no-deps "$wheel"
    rm -rf "$tmp"
    trap - EXIT

    # Configuration (never overwritten) and the credentials directory.
    install -d -m 0755 "$ETC_DIR"
    local have_config=0
    if [ -e "$ETC_DIR/edgeagent.toml" ]; then
        say "kept existing $ETC_DIR/edgeagent.toml"
        have_config=1
    elif [ -f "$SRC/examples/edgeagent.toml" ]; then
        # The example's model paths are relative to examples/ in a checkout; the service
        # reads its models from $STATE_DIR/models (see install_models).
        sed "s|\"\\.\\./models/|\"$STATE_DIR/models/|" "$SRC/examples/edgeagent.toml" >"$ETC_DIR/.edgeagent.toml.new"
        install -m 0640 -o root -g "$SYSTEM_USER" "$ETC_DIR/.edgeagent.toml.new" "$ETC_DIR/edgeagent.toml"
        rm -f "$ETC_DIR/.edgeagent.toml.new"
        say "installed $ETC_DIR/edgeagent.toml from examples/edgeagent.toml (root:$SYSTEM_USER 0640; models in $STATE_DIR/models); edit it"
        have_config=1
    else
        warn "no $ETC_DIR/edgeagent.toml and no examples/edgeagent.toml in $SRC;" \
            "write $ETC_DIR/edgeagent.toml before starting the service"
    fi
    install -d -m 0700 -o root -g root "$CRED_DIR"
    say "credentials directory $CRED_DIR (root, 0700): put mqtt-password and mqtt-client.key there if needed"

    # State.
    install -d -m 0700 -o "$SYSTEM_USER" -g "$SYSTEM_USER" "$STATE_DIR"
    say "state directory $STATE_DIR (owned by $SYSTEM_USER, 0700)"
    install_models
    [ "$CLOUD" -eq 0 ] || install_cloud_config

    # Units.
    local unit
    for unit in edgeagent.service edgeagent-cloud.service; do
        if [ -f "$UNIT_DIR/$unit" ] && cmp -s "$SRC/systemd/$unit" "$UNIT_DIR/$unit"; then
            say "unit $UNIT_DIR/$unit is up to date"
        else
            install -m 0644 "$SRC/systemd/$unit" "$UNIT_DIR/$unit"
            say "installed unit $UNIT_DIR/$unit"
        fi
    done

    if [ "$CHECK_BROKER" -eq 1 ]; then
        check_broker
        install_broker_config
    fi

    local config_ok=0
    if [ "$have_config" -eq 1 ]; then
        if "$SYSTEM_VENV/bin/edgeagent" check-config --config "$ETC_DIR/edgeagent.toml"; then
            config_ok=1
        else
            warn "'edgeagent check-config' rejected $ETC_DIR/edgeagent.toml (see above)"
        fi
    fi

    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        say "systemctl daemon-reload"
        if [ "$config_ok" -eq 1 ]; then
            systemctl enable --now edgeagent.service
            say "enabled and started edgeagent.service"
            systemctl --no-pager --lines=5 status edgeagent.service || true
        else
            systemctl enable edgeagent.service
            say "enabled edgeagent.service but did not start it (fix the config, then: systemctl start edgeagent)"
        fi
    else
        say "systemd is not running (no /run/systemd/system): skipped daemon-reload, enable and start"
    fi

    cat <<EOF

Done: system install.
  package:     $SYSTEM_VENV (extras: ${EXTRAS:-none})
  config:      $ETC_DIR/edgeagent.toml
  credentials: $CRED_DIR/mqtt-password, $CRED_DIR/mqtt-client.key (optional, root 0600)
  state:       $STATE_DIR
  units:       $UNIT_DIR/edgeagent.service, $UNIT_DIR/edgeagent-cloud.service (not enabled)
Next steps:
  $SYSTEM_VENV/bin/edgeagent check-config --config $ETC_DIR/edgeagent.toml
  systemctl restart edgeagent && journalctl -u edgeagent -f
EOF
}

# -- after a development install ------------------------------------------------

# free_port PY: a TCP port nothing listens on now.
free_port() {
    "$1" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# prepare_demo_models VENV: the INT8 encoder and the intent bundle, unless already built.
prepare_demo_models() {
    local venv="$1" t0
    cd "$SRC"
    if [ -f models/minilm-l6-int8/manifest.json ]; then
        say "demo: INT8 encoder models/minilm-l6-int8 exists"
    else
        say "demo: building the INT8 encoder (models/build_default.sh, all-MiniLM-L6-v2 from PyPI)"
        t0=$SECONDS
        PYTHON="$venv/bin/python" models/build_default.sh >"$DEMO_DIR/build.log" 2>&1 ||
            die "models/build_default.sh failed; see $DEMO_DIR/build.log"
        note "built in $((SECONDS - t0)) s (log: $DEMO_DIR/build.log)"
    fi
    if [ -e models/bundles/intent/latest/manifest.json ]; then
        say "demo: intent bundle models/bundles/intent/latest exists"
    else
        say "demo: training the intent head on examples/intent-examples.jsonl (72 examples, 9 labels)"
        t0=$SECONDS
        "$venv/bin/edgeagent" train intent --examples examples/intent-examples.jsonl \
            >"$DEMO_DIR/train.log" 2>&1 || die "edgeagent train failed; see $DEMO_DIR/train.log"
        note "trained in $((SECONDS - t0)) s (log: $DEMO_DIR/train.log)"
    fi
}

# demo_submit TASK TEXT...: submit, print each result a consumer receives, one per line.
demo_submit() {
    local task="$1" t
    shift
    for t in "$@"; do
        printf '    %s: "%s"\n' "$task" "$t"
        "$DEMO_VENV/bin/edgeagent" submit --config "$DEMO_CONFIG" "$task" --text "$t" --timeout 20 \
            --await-superseding | "$DEMO_VENV/bin/python" "$SRC/examples/show_results.py"
    done
}

# start_cloud: the cloud agent, in the background; waits until it says it is online.
start_cloud() {
    "$DEMO_VENV/bin/edgeagent" cloud --config "$SRC/examples/cloud.toml" >>"$DEMO_DIR/cloud.log" 2>&1 &
    CLOUD_PID=$!
    local i
    for i in $(seq 1 60); do
        grep -q 'cloud.connected\|"cloud.started"\|cloud.started' "$DEMO_DIR/cloud.log" 2>/dev/null && break
        sleep 0.25
    done
    sleep 0.5
}

run_demo() {
    local venv="$SRC/.venv" py llm_port metrics_port prefix t0=$SECONDS
    py="$venv/bin/python"
    DEMO_DIR="$(mktemp -d "${TMPDIR:-/tmp}/edgeagent-demo.XXXXXX")"
    DEMO_VENV="$venv"
    broker_answers 127.0.0.1 1883 || die "the demo needs a broker on 127.0.0.1:1883 (see above)"
    prepare_demo_models "$venv"
    DEMO_CONFIG="$SRC/examples/demo.toml"
    local extract_task="reading" extract_text="12:00:01 device=th-12 temperature 21.5 C"
    if "$py" -c 'import llama_cpp' 2>/dev/null; then
        say "demo: llama-cpp-python is installed: pulling SmolLM2 and running examples/edgeagent.toml"
        "$venv/bin/edgeagent" models pull smollm2 --dest models/gguf >/dev/null ||
            die "edgeagent models pull smollm2 failed"
        DEMO_CONFIG="$SRC/examples/edgeagent.toml"
        extract_text="2026-11-26 07:12:03 WARN sensor=boiler-2 pressure 2.4 bar"
    fi
    llm_port="$(free_port "$py")"
    metrics_port="$(free_port "$py")"
    prefix="edgeagent-demo-$$"
    export EDGEAGENT_DEVICE_ID=demo EDGEAGENT_TOPICS__PREFIX="$prefix"
    export EDGEAGENT_STORE__STATE_DIR="$DEMO_DIR/state" EDGEAGENT_CLOUD__ENABLED=true
    export EDGEAGENT_METRICS__LISTEN="127.0.0.1:$metrics_port" EDGEAGENT_TOPICS__STATS_INTERVAL_S=2
    export EDGEAGENT_CLOUD_AGENT__PREFIX="$prefix" EDGEAGENT_CLOUD_AGENT__WORKER_ID=demo-cloud
    export EDGEAGENT_CLOUD_LLM__BASE_URL="http://127.0.0.1:$llm_port/v1"
    export EDGEAGENT_CLOUD_LLM__MODEL=edgeagent-standin-rules EDGEAGENT_CLOUD_LLM__API_KEY_ENV=
    CLOUD_PID="" DEMO_PIDS=""
    trap 'for p in $DEMO_PIDS $CLOUD_PID; do kill -TERM "$p" 2>/dev/null || true; done' EXIT

    say "demo: cloud side = 'edgeagent cloud' (the real agent) + 'edgeagent cloud-standin'"
    note "(a deterministic OpenAI-compatible stand-in that picks labels by keyword: NOT a model,"
    note " so the demo needs no API key and no llama.cpp build; point [llm] base_url at a real"
    note " endpoint in examples/cloud.toml for real answers)"
    "$venv/bin/edgeagent" cloud-standin --listen "127.0.0.1:$llm_port" >"$DEMO_DIR/standin.log" 2>&1 &
    DEMO_PIDS="$DEMO_PIDS $!"
    start_cloud
    say "demo: edgeagent run --config ${DEMO_CONFIG#"$SRC"/} (device 'demo', topics $prefix/demo/...)"
    (cd "$SRC" && exec "$venv/bin/edgeagent" run --config "$DEMO_CONFIG") >"$DEMO_DIR/daemon.log" 2>&1 &
    DEMO_PIDS="$DEMO_PIDS $!"
    local i
    for i in $(seq 1 120); do
        curl -fs "http://127.0.0.1:$metrics_port/readyz" >/dev/null 2>&1 && break
        grep -q '"mqtt.connected"\|mqtt.connected' "$DEMO_DIR/daemon.log" 2>/dev/null && break
        sleep 0.25
    done
    sleep 0.5

    say "demo: 1. a command the local INT8 model knows (answered on the device)"
    demo_submit intent "turn off the lights in the kitchen" "please lock the front door"
    say "demo: 2. answered on the device when it is sure; escalated when it is not (the cloud answers)"
    demo_submit intent "what's the status of the garage door" "what is the capital of France"
    say "demo: 3. the cloud agent is down: a provisional local answer now, the cloud's supersedes it"
    kill -TERM "$CLOUD_PID" 2>/dev/null || true
    wait "$CLOUD_PID" 2>/dev/null || true
    CLOUD_PID=""
    sleep 0.5
    demo_submit intent "tone the lights down a notch" &
    local waiter=$!
    sleep 2
    note "(starting the cloud agent again)"
    start_cloud
    wait "$waiter" || true
    say "demo: 4. field extraction ($extract_task)"
    demo_submit "$extract_task" "$extract_text"
    sleep 2.2
    say "demo: 5. the daemon's status and stats (edgeagent status; also /metrics, /readyz)"
    "$venv/bin/edgeagent" status --config "$DEMO_CONFIG" --device demo 2>/dev/null ||
        curl -fs "http://127.0.0.1:$metrics_port/metrics" | grep -E '^edgeagent_jobs_total' || true
    for p in $DEMO_PIDS $CLOUD_PID; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    trap - EXIT
    say "demo: done in $((SECONDS - t0)) s; stopped daemon and cloud agent; logs in $DEMO_DIR"
}

run_tests() {
    local venv="$SRC/.venv"
    cd "$SRC"
    say "ruff check"
    "$venv/bin/ruff" check .
    say "ruff format --check"
    "$venv/bin/ruff" format --check .
    say "mypy --strict edgeagent"
    "$venv/bin/mypy" --strict edgeagent
    say "pytest"
    "$venv/bin/python" -m pytest
}

if [ "$SYSTEM" -eq 1 ]; then
    [ -z "$THEN" ] || die "--demo and --test are for a development install, not --system"
    system_install
else
    dev_install
    case "$THEN" in
        demo) run_demo ;;
        test) run_tests ;;
    esac
fi
