"""One validated settings tree: TOML file < ``EDGEAGENT_*`` environment.

The file is ``--config``, else ``$EDGEAGENT_CONFIG``, else
``/etc/edgeagent/edgeagent.toml``.  Every key can be overridden by an
environment variable ``EDGEAGENT_<SECTION>__<KEY>`` (``EDGEAGENT_MQTT__PORT``,
``EDGEAGENT_DEVICE_ID``, ``EDGEAGENT_TASKS__INTENT__THRESHOLD``).  Unknown keys
are errors.  This is the only module that reads the environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (a declared dependency there)
    import tomli as tomllib

from edgeagent.backends.config_llamacpp import LlamaCppBackendConfig
from edgeagent.backends.config_onnx import OnnxBackendConfig
from edgeagent.learning.config import LearnConfig

DEFAULT_CONFIG_PATH = Path("/etc/edgeagent/edgeagent.toml")
ENV_PREFIX = "EDGEAGENT_"
TOPIC_SEGMENT = re.compile(r"^[A-Za-z0-9_.\-]+$")


class ConfigError(Exception):
    """The configuration is invalid; ``errors`` lists ``(key, message)`` pairs."""

    def __init__(self, source: str, errors: list[tuple[str, str]]) -> None:
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {key}: {msg}" for key, msg in errors)
        super().__init__(f"invalid configuration ({source}):\n{lines}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def segment(value: str) -> str:
    """Validate one MQTT topic level (letters, digits, '_', '-', '.')."""
    if not TOPIC_SEGMENT.match(value):
        raise ValueError("must be a single MQTT topic level of letters, digits, '_', '-', '.'")
    return value


class TlsConfig(_Section):
    """TLS towards the broker.  Verification is on unless explicitly disabled."""

    enabled: bool = Field(False, description="Connect with TLS.")
    ca_file: Path | None = Field(
        None, description="CA bundle that signed the broker certificate (PEM); system CAs if unset."
    )
    cert_file: Path | None = Field(None, description="Client certificate (PEM) for mutual TLS.")
    key_file: Path | None = Field(
        None,
        description="Client private key (PEM).  Default: the systemd credential `mqtt-client.key` "
        "when $CREDENTIALS_DIRECTORY has it.",
    )
    insecure_skip_verify: bool = Field(
        False, description="Do NOT verify the broker certificate or host name (testing only)."
    )


class MqttConfig(_Section):
    """Connection to the MQTT broker."""

    host: str = Field("127.0.0.1", description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker TCP port (8883 is usual for TLS).")
    protocol: Literal["5", "3.1.1"] = Field(
        "5", description="MQTT protocol version. v5 enables Response Topic/Correlation Data."
    )
    client_id: str | None = Field(
        None,
        description="MQTT client id; default `edgeagent-{device_id}`.  Must be stable for a "
        "persistent session.",
    )
    username: str | None = Field(None, description="Broker user name.")
    password: SecretStr | None = Field(
        None,
        description="Broker password.  Prefer `password_file`, the systemd credential "
        "`mqtt-password`, or EDGEAGENT_MQTT__PASSWORD over writing it here.",
    )
    password_file: Path | None = Field(None, description="File whose first line is the password.")
    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS settings.")
    keepalive_s: int = Field(30, ge=5, le=3600, description="Keep-alive interval (seconds).")
    session_expiry_s: int = Field(
        86400,
        ge=0,
        description="How long the broker keeps our session and queued jobs while we are away "
        "(seconds, v5 only).",
    )
    receive_maximum: int = Field(
        64,
        ge=1,
        le=65535,
        description="Jobs the broker may send before we acknowledge them (backpressure).",
    )
    max_inflight: int = Field(
        256, ge=1, le=65535, description="Unacknowledged QoS 1 publishes (results) in flight."
    )
    reconnect_min_s: float = Field(0.5, gt=0, description="First reconnect delay (seconds).")
    reconnect_max_s: float = Field(30.0, gt=0, description="Reconnect delay cap (seconds).")
    connect_timeout_s: float = Field(10.0, gt=0, description="TCP/TLS connect timeout (seconds).")

    @model_validator(mode="after")
    def _check(self) -> MqttConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        if self.password is not None and self.password_file is not None:
            raise ValueError("set either password or password_file, not both")
        return self


class TopicsConfig(_Section):
    """Topic layout (see PROTOCOL.md)."""

    prefix: str = Field("edgeagent", description="First topic level of every topic.")
    fleet_group: str | None = Field(
        None,
        description="If set, also take fleet jobs from `$share/{fleet_group}/{prefix}/fleet/jobs/+`"
        " (v5 only).",
    )
    allowed_reply_prefixes: list[str] = Field(
        default_factory=list,
        description="Topic prefixes a job's Response Topic / reply_to may name, besides this "
        "device's own `{prefix}/{device}/` (always allowed).  Matched on whole levels.  "
        "Wildcards, `$` topics, empty levels and any device's job, status, stats and cloud "
        "topics are always refused.",
    )
    stats_interval_s: float = Field(
        30.0,
        ge=0,
        description="Publish counters on `{prefix}/{device}/stats` this often (0 = off).",
    )

    _v_prefix = field_validator("prefix")(segment)

    @field_validator("fleet_group")
    @classmethod
    def _v_group(cls, value: str | None) -> str | None:
        return None if value is None else segment(value)

    @field_validator("allowed_reply_prefixes")
    @classmethod
    def _v_prefixes(cls, value: list[str]) -> list[str]:
        for p in value:
            if not p or "+" in p or "#" in p or p.startswith("$") or "\x00" in p:
                raise ValueError(f"{p!r}: a literal topic prefix without wildcards or '$'")
            if "" in p.rstrip("/").split("/"):
                raise ValueError(f"{p!r}: a topic prefix without empty levels")
        return value


class LimitsConfig(_Section):
    """Input limits; anything larger is rejected with a structured error."""

    max_payload_bytes: int = Field(
        65536, ge=256, description="Largest job message accepted (bytes)."
    )
    max_input_bytes: int = Field(16384, ge=1, description="Largest `input` accepted (UTF-8 bytes).")
    default_deadline_ms: int = Field(
        30000, ge=1, description="Deadline for jobs that do not carry `deadline_ms` (ms)."
    )
    max_deadline_ms: int = Field(
        3_600_000, ge=1, description="Longest `deadline_ms` a job may ask for (ms)."
    )


class StoreConfig(_Section):
    """The on-disk journal, outbox and cache (one SQLite file)."""

    state_dir: Path | None = Field(
        None,
        description="Directory of `edgeagent.db`.  Default: $STATE_DIRECTORY (systemd "
        "StateDirectory=), else `./state`.",
    )
    synchronous: Literal["full", "normal"] = Field(
        "full",
        description="SQLite fsync policy.  `full` survives power loss; `normal` survives process "
        "crashes only and is faster on slow SD cards.",
    )
    journal_retention_s: int = Field(
        7 * 86400,
        ge=60,
        description="How long answered job ids are remembered for idempotency (seconds).",
    )
    outbox_max_rows: int = Field(
        100_000,
        ge=10,
        description="Outbox bound.  When full, new jobs are not acknowledged (the broker keeps "
        "them) until it drains.",
    )


class CacheConfig(_Section):
    """Exact-match result cache."""

    enabled: bool = Field(True, description="Serve repeated inputs from the cache.")
    ttl_s: int = Field(86400, ge=1, description="Entry lifetime (seconds).")
    max_entries: int = Field(100_000, ge=1, description="Entry cap; the oldest go first.")


class MetricsConfig(_Section):
    """Prometheus endpoint."""

    listen: str | None = Field(
        "127.0.0.1:9464",
        description="`host:port` for `/metrics`; empty or unset disables it.",
    )

    @field_validator("listen")
    @classmethod
    def _v_listen(cls, value: str | None) -> str | None:
        if not value:
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("expected host:port, e.g. 127.0.0.1:9464")
        return value


class LogConfig(_Section):
    """Logging (structlog)."""

    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    format: Literal["auto", "json", "console"] = Field(
        "auto", description="`auto`: console on a TTY, JSON lines otherwise (journald)."
    )


class RuntimeConfig(_Section):
    """Daemon lifecycle."""

    drain_timeout_s: float = Field(
        20.0, ge=0, description="On SIGTERM, wait this long for jobs in flight (seconds)."
    )


class HomeAssistantConfig(_Section):
    """Home Assistant MQTT discovery (the daemon appears as a device with sensors)."""

    enabled: bool = Field(
        False,
        description="Publish retained discovery configs: availability from the status topic, "
        "sensors for jobs/s, local share, escalation rate, queue and outbox depth, and each "
        "task's last answer.",
    )
    discovery_prefix: str = Field(
        "homeassistant",
        description="Home Assistant's discovery prefix; configs are re-sent when "
        "`{discovery_prefix}/status` says `online`.",
    )

    _v_prefix = field_validator("discovery_prefix")(segment)


RedactKind = Literal["email", "phone", "iban", "card", "ip"]
REDACT_KINDS: tuple[RedactKind, ...] = ("email", "phone", "iban", "card", "ip")


class CloudConfig(_Section):
    """Escalation to a cloud agent over MQTT (PROTOCOL.md, "Escalation")."""

    enabled: bool = Field(
        False, description="Escalate jobs the local model cannot answer with confidence."
    )
    max_in_flight: int = Field(
        64,
        ge=1,
        description="Escalations awaiting a reply, all tasks together.  Past it the task's "
        "`over_budget` policy applies (counted in edgeagent_escalations_total{outcome}).",
    )
    retry_min_s: float = Field(
        5.0, gt=0, description="First re-send of an unanswered escalation (seconds)."
    )
    retry_max_s: float = Field(60.0, gt=0, description="Re-send backoff cap (seconds).")
    max_reply_bytes: int = Field(65536, ge=256, description="Largest cloud reply accepted (bytes).")
    assume_online: bool = Field(
        False,
        description="Treat the cloud as reachable even before its retained status says `online` "
        "(for agents that publish no status).",
    )


def _check_pattern(key: str, pattern: str) -> None:
    """Config-load check of a pattern that will see job input: it must compile on RE2."""
    from edgeagent import regex

    try:
        regex.compile(pattern)
    except regex.PatternError as exc:
        raise ValueError(f"{key}: {exc}") from None


class RuleConfig(_Section):
    """One classification rule: the first rule that matches wins."""

    label: str = Field(description="Label answered when this rule matches.")
    keywords: list[str] = Field(
        default_factory=list, description="Case-insensitive whole-word keywords."
    )
    patterns: list[str] = Field(
        default_factory=list,
        description="Regular expressions (RE2 syntax: linear time; no backreferences or "
        "lookaround); any match answers `label`.",
    )

    @field_validator("patterns")
    @classmethod
    def _v_patterns(cls, value: list[str]) -> list[str]:
        for i, p in enumerate(value):
            _check_pattern(f"patterns[{i}]", p)
        return value


class RulesBackendConfig(_Section):
    """Deterministic, model-free backend: keyword/regex classification, regex extraction."""

    type: Literal["rules"] = "rules"
    rules: list[RuleConfig] = Field(
        default_factory=list, description="Classification rules, tried in order."
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Extraction: field name -> regex (RE2 syntax); the first group (or the whole "
        "match) is the value, converted to the schema's type.",
    )
    ignore_case: bool = Field(True, description="Match case-insensitively.")

    @field_validator("fields")
    @classmethod
    def _v_fields(cls, value: dict[str, str]) -> dict[str, str]:
        for name, p in value.items():
            _check_pattern(f"fields.{name}", p)
        return value


BackendConfig = Annotated[
    RulesBackendConfig | OnnxBackendConfig | LlamaCppBackendConfig,
    Field(discriminator="type"),
]


class TaskConfig(_Section):
    """One task: what jobs on `{prefix}/{device}/jobs/{name}` are answered with."""

    kind: Literal["classify", "extract", "generate"] = Field(description="What the task does.")
    description: str = Field("", description="Human description; sent to the cloud agent.")
    labels: list[str] = Field(
        default_factory=list,
        description="Classify: the label set.  Default: the labels of the backend's rules/model.",
    )
    output_schema: dict[str, Any] | None = Field(
        None,
        alias="schema",
        description="Extract: JSON Schema (object) the output must satisfy.",
    )
    threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="Answer locally only at or above this confidence."
    )
    escalate: Literal["auto", "never", "always"] | None = Field(
        None, description="Escalation policy; default `auto` (`always` for generate tasks)."
    )
    out_of_scope: Literal["escalate", "decline"] = Field(
        "escalate",
        description="What a job the local model flags out of scope gets: `escalate` (like any "
        "uncertain job), or `decline`: one that is *confidently* out of scope (the score above "
        "the bundle's decline cut-off, `train --oos-decline-loss`) is answered `unrecognized` "
        "/ `out_of_scope` locally, without the cloud; borderline ones still escalate.",
    )
    timeout_s: float = Field(10.0, gt=0, description="Per-job inference deadline (seconds).")
    concurrency: int = Field(1, ge=1, le=64, description="Inference calls in parallel.")
    max_batch: int = Field(16, ge=1, le=1024, description="Jobs per inference batch.")
    max_wait_ms: float = Field(
        0.0,
        ge=0,
        description="Extra wait for a batch to fill (ms).  0: run with what is queued; jobs "
        "that arrive while a batch runs form the next one.",
    )
    cache: bool = Field(True, description="Use the result cache for this task.")
    instructions: str = Field(
        "", description="Instructions for the cloud agent (how to answer this task)."
    )
    allow_cloud: bool = Field(
        True, description="May this task's inputs leave the device at all (after redaction)?"
    )
    offline: Literal["provisional", "wait", "reject"] = Field(
        "provisional",
        description="When the cloud is unreachable: answer locally now and supersede later "
        "(`provisional`), hold until the deadline (`wait`), or answer `unrecognized` (`reject`).",
    )
    on_deadline: Literal["local", "expired"] = Field(
        "local",
        description="A job still waiting for the cloud at its deadline gets the local answer "
        "(flagged, when there is one) or `expired`.",
    )
    audit_rate: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Share of confident local answers also sent to the cloud to measure agreement.",
    )
    budget_per_minute: float = Field(
        60.0, ge=0.0, description="Escalations per minute this task may start (token bucket)."
    )
    budget_burst: int = Field(20, ge=0, description="Token bucket size (escalations at once).")
    over_budget: Literal["local", "unrecognized"] = Field(
        "local",
        description="Over budget: answer with the local answer (flagged) or `unrecognized`.",
    )
    redact: list[RedactKind] = Field(
        default_factory=lambda: list(REDACT_KINDS),
        description="What is replaced by placeholders before an input leaves the device.",
    )
    redact_patterns: dict[str, str] = Field(
        default_factory=dict,
        description="Extra redactions: NAME -> regex (RE2 syntax; placeholder <NAME_n>).",
    )
    redact_region: str = Field(
        "US",
        description="Region (ISO 3166 alpha-2) whose national phone formats are redacted, "
        "besides international (+CC) numbers: `DE` finds `030 1234567`, `US` `555 123 4567`.",
    )
    restore_redacted: bool = Field(
        True, description="Put the original values back into the cloud's answer."
    )
    backend: BackendConfig = Field(description="How the task is answered locally.")
    learn: LearnConfig = Field(
        default_factory=LearnConfig,
        description="Learning from the cloud agent's answers (README: Learning from the cloud).",
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("redact_region")
    @classmethod
    def _v_redact_region(cls, value: str) -> str:
        from edgeagent.redact import check_region

        return check_region(value)

    @model_validator(mode="after")
    def _check(self) -> TaskConfig:
        b = self.backend
        if isinstance(b, RulesBackendConfig):
            if self.kind == "classify" and not b.rules:
                raise ValueError("a classify task on the rules backend needs backend.rules")
            if self.kind == "extract" and not b.fields:
                raise ValueError("an extract task on the rules backend needs backend.fields")
            if self.kind == "generate":
                raise ValueError("the rules backend cannot generate text")
            if self.labels:
                unknown = {r.label for r in b.rules} - set(self.labels)
                if unknown:
                    raise ValueError(f"rules answer labels not in `labels`: {sorted(unknown)}")
        if isinstance(b, LlamaCppBackendConfig) and b.calibration and self.kind == "generate":
            raise ValueError("backend.calibration: generate tasks are not calibrated")
        for name, pattern in self.redact_patterns.items():
            segment(name)
            if name.lower() in REDACT_KINDS:
                raise ValueError(f"redact_patterns.{name}: clashes with the built-in kind")
            _check_pattern(f"redact_patterns.{name}", pattern)
        if self.output_schema is not None:
            if self.output_schema.get("type") != "object":
                raise ValueError("schema: must be a JSON Schema with type = 'object'")
            _check_json_schema(self.output_schema)
        if isinstance(b, LlamaCppBackendConfig):
            self._check_examples(b)
        if self.learn.enabled and not (
            self.kind == "classify" and isinstance(b, OnnxBackendConfig)
        ):
            raise ValueError("learn.enabled: only classify tasks on an onnx bundle learn")
        return self

    def _check_examples(self, b: LlamaCppBackendConfig) -> None:
        """Few-shot examples teach the model the answer's form: one that the task itself
        would refuse (a label not in `labels`, an object the schema rejects) is a typo."""
        for i, ex in enumerate(b.examples):
            where = f"backend.examples[{i}].output"
            out = ex.output
            if self.kind == "classify":
                label = out if isinstance(out, str) else out.get("label")
                if self.labels and label not in self.labels:
                    raise ValueError(f"{where}: {label!r} is not one of `labels`")
            elif self.kind == "extract":
                if not isinstance(out, dict):
                    raise ValueError(f"{where}: an extract example's output must be an object")
                if self.output_schema is not None:
                    import jsonschema

                    errors = list(
                        jsonschema.Draft202012Validator(self.output_schema).iter_errors(out)
                    )
                    if errors:
                        message = errors[0].message
                        raise ValueError(f"{where}: not valid against `schema`: {message}")

    @property
    def policy(self) -> Literal["auto", "never", "always"]:
        if self.escalate is not None:
            return self.escalate
        return "always" if self.kind == "generate" else "auto"

    def fingerprint(self) -> str:
        """Digest of everything in the task config that can change an answer."""
        data = self.model_dump(
            mode="json",
            by_alias=True,
            include={"kind", "labels", "output_schema", "threshold", "backend"},
        )
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _check_json_schema(schema: dict[str, Any]) -> None:
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - jsonschema is a core dependency
        return
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"schema: not a valid JSON Schema: {exc.message}") from exc


class BrokerClientSettings(BaseSettings):
    """What every edgeagent process that talks to the broker shares: the `[mqtt]` section,
    its secrets, and the sources (init + environment; `read_settings_file` adds the TOML)."""

    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="Broker connection.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings)

    def mqtt_password(self, environ: dict[str, str] | None = None) -> str | None:
        """The broker password: `password`, else `password_file`, else the systemd credential."""
        if self.mqtt.password is not None:
            return self.mqtt.password.get_secret_value()
        if self.mqtt.password_file is not None:
            return read_secret(self.mqtt.password_file, "mqtt.password_file")
        cred = credential_path("mqtt-password", environ)
        return read_secret(cred, "credential mqtt-password") if cred else None

    def tls_key_file(self, environ: dict[str, str] | None = None) -> Path | None:
        return self.mqtt.tls.key_file or credential_path("mqtt-client.key", environ)


class Settings(BrokerClientSettings):
    """The whole edgeagent configuration."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    device_id: str = Field(
        default_factory=lambda: host_id(),
        description="This device's topic level; default: the host name.",
    )
    topics: TopicsConfig = Field(default_factory=TopicsConfig, description="Topic layout.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Input limits.")
    store: StoreConfig = Field(default_factory=StoreConfig, description="Journal/outbox/cache.")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="Result cache.")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus.")
    log: LogConfig = Field(default_factory=LogConfig, description="Logging.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Lifecycle.")
    cloud: CloudConfig = Field(default_factory=CloudConfig, description="Cloud escalation.")
    homeassistant: HomeAssistantConfig = Field(
        default_factory=HomeAssistantConfig, description="Home Assistant MQTT discovery."
    )
    tasks: dict[str, TaskConfig] = Field(
        default_factory=dict, description="Tasks by name (`[tasks.NAME]`)."
    )

    _v_device = field_validator("device_id")(segment)

    @field_validator("tasks")
    @classmethod
    def _v_tasks(cls, value: dict[str, TaskConfig]) -> dict[str, TaskConfig]:
        for name in value:
            segment(name)
        return value

    # -- derived values -------------------------------------------------------------

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"edgeagent-{self.device_id}"

    @property
    def reply_prefixes(self) -> list[str]:
        """Reply-topic prefixes the operator allows besides the device's own namespace."""
        return list(self.topics.allowed_reply_prefixes)

    def state_dir(self, environ: dict[str, str] | None = None) -> Path:
        env = os.environ if environ is None else environ
        if self.store.state_dir is not None:
            return self.store.state_dir
        systemd_dir = env.get("STATE_DIRECTORY")
        if systemd_dir:
            return Path(systemd_dir.split(":")[0])
        return Path("state")


def credential_path(name: str, environ: dict[str, str] | None = None) -> Path | None:
    """A systemd credential (``LoadCredential=name:...``) if the service has a non-blank one.

    The unit pairs each ``LoadCredential=`` with an empty ``SetCredential=`` default
    (systemd 252 has no optional form), so a blank credential means "not configured".
    """
    env = os.environ if environ is None else environ
    directory = env.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / name
    try:
        blank = not path.read_bytes().strip()
    except OSError:
        return None
    return None if blank else path


def read_secret(path: Path, what: str) -> str:
    """The first line of a secret file, stripped."""
    try:
        return (
            path.read_text(encoding="utf-8").splitlines()[0].strip() if path.stat().st_size else ""
        )
    except OSError as exc:
        raise ConfigError(str(path), [(what, f"cannot read secret file: {exc.strerror}")]) from exc


def host_id(fallback: str = "edgeagent") -> str:
    """The host name as a topic level."""
    name = socket.gethostname().split(".")[0]
    cleaned = re.sub(r"[^A-Za-z0-9_.\-]", "-", name)
    return cleaned or fallback


def resolve_path(
    explicit: Path | None, env_var: str, default: Path, environ: dict[str, str] | None = None
) -> Path:
    """``explicit``, else ``$env_var``, else ``default``."""
    env = os.environ if environ is None else environ
    if explicit is not None:
        return explicit
    return Path(env[env_var]) if env.get(env_var) else default


def resolve_config_path(explicit: Path | None, environ: dict[str, str] | None = None) -> Path:
    return resolve_path(explicit, "EDGEAGENT_CONFIG", DEFAULT_CONFIG_PATH, environ)


S = TypeVar("S", bound=BaseSettings)


def read_settings_file(cls: type[S], path: Path) -> S:
    """Validate the TOML file ``path``, overridden by ``cls``'s environment variables.

    Raises :class:`ConfigError` naming every offending key (unknown keys included).
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), [("(file)", f"cannot read: {exc.strerror}")]) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(str(path), [("(syntax)", str(exc))]) from exc

    class _FromFile(cls):  # type: ignore[valid-type,misc]
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            toml = TomlConfigSettingsSource(settings_cls, toml_file=path)
            return (init_settings, env_settings, toml)

    try:
        loaded = _FromFile()
    except ValidationError as exc:
        raise _config_error(cls, path, flatten_errors(exc)) from None
    settings = cast(S, cls.model_construct(_fields_set=loaded.model_fields_set, **dict(loaded)))
    return cast(S, resolve_relative_paths(settings, data, path.resolve().parent))


def resolve_relative_paths(model: BaseModel, raw: Any, base: Path) -> BaseModel:
    """Relative paths written in a config file are relative to the file's directory.

    Under systemd the working directory is ``/``; resolving against the file makes a
    config mean the same wherever it is run from.  Only values that come from the file
    (``raw``, its parsed TOML) are resolved: a path from an environment variable keeps
    its meaning relative to the working directory.  Returns ``model`` itself if nothing
    changed.
    """
    if not isinstance(raw, dict):
        return model
    update: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        key = field.alias or name
        if key not in raw:
            continue
        value, written = getattr(model, name), raw[key]
        if isinstance(value, Path):
            if not value.is_absolute() and isinstance(written, str) and Path(written) == value:
                update[name] = Path(os.path.normpath(base / value))
        elif isinstance(value, BaseModel):
            new = resolve_relative_paths(value, written, base)
            if new is not value:
                update[name] = new
        elif isinstance(value, dict) and isinstance(written, dict):
            items = {
                k: resolve_relative_paths(v, written.get(k), base)
                if isinstance(v, BaseModel)
                else v
                for k, v in value.items()
            }
            if any(items[k] is not value[k] for k in value):
                update[name] = items
    return model.model_copy(update=update) if update else model


def missing_model_hint(name: str, task: TaskConfig) -> str | None:
    """If the task's model file or bundle does not exist: what is missing and the command
    that prepares it (for check-config and the daemon's start-up error); else None."""
    b = task.backend
    if isinstance(b, OnnxBackendConfig):
        if (b.bundle / "manifest.json").is_file():
            return None
        return (
            f"the model bundle {b.bundle} does not exist yet.  Build the INT8 encoder and "
            f"train the task from a checkout: models/build_default.sh && edgeagent train "
            f"{name} --examples EXAMPLES.jsonl --out DIR (./install.sh --demo does both for "
            "the example intent task, into models/)"
        )
    if isinstance(b, LlamaCppBackendConfig):
        if b.model.is_file():
            return None
        return (
            f"the GGUF model {b.model} does not exist yet.  Fetch it: edgeagent models pull "
            f"smollm2 --dest {b.model.parent} (and the llamacpp extra: install.sh "
            "--extras llamacpp, with --system for the service)"
        )
    return None


def _config_error(
    cls: type[BaseSettings], path: Path, errors: list[tuple[str, str]]
) -> ConfigError:
    """Name the environment variable, not the file, for a value that came from one."""
    prefix = str(cls.model_config.get("env_prefix") or "")
    env = {k.upper(): k for k in os.environ}
    named: list[tuple[str, str]] = []
    from_env = 0
    for key, msg in errors:
        parts = key.split(".")
        var = None
        for n in range(len(parts), 0, -1):  # the deepest variable that sets this key
            candidate = (prefix + "__".join(parts[:n])).upper()
            if candidate in env:
                var = env[candidate]
                break
        if var is not None:
            from_env += 1
            named.append((f"${var} ({key})", msg))
        else:
            named.append((key, msg))
    if from_env == len(errors):
        return ConfigError("environment", named)
    return ConfigError(f"{path}{' and environment' if from_env else ''}", named)


def load_settings(explicit: Path | None = None) -> tuple[Settings, Path]:
    """Read and validate the configuration; raise :class:`ConfigError` with precise keys."""
    path = resolve_config_path(explicit)
    settings = read_settings_file(Settings, path)
    _cross_check(settings, path)
    return settings, path


def mqtt_file_errors(m: MqttConfig, key_file: Path | None) -> list[tuple[str, str]]:
    """Files the MQTT section names that do not exist (checked at start, not mid-connect)."""
    errors: list[tuple[str, str]] = []
    for key, file in (("mqtt.tls.ca_file", m.tls.ca_file), ("mqtt.tls.cert_file", m.tls.cert_file)):
        if file is not None and not file.is_file():
            errors.append((key, f"no such file: {file}"))
    if m.tls.cert_file is not None and key_file is None:
        errors.append(("mqtt.tls.key_file", "cert_file is set but no key (file or credential)"))
    if m.password_file is not None and not m.password_file.is_file():
        errors.append(("mqtt.password_file", f"no such file: {m.password_file}"))
    return errors


def _cross_check(settings: Settings, path: Path) -> None:
    errors = mqtt_file_errors(settings.mqtt, settings.tls_key_file())
    if settings.topics.fleet_group and settings.mqtt.protocol != "5":
        errors.append(("topics.fleet_group", "shared subscriptions need mqtt.protocol = '5'"))
    if errors:
        raise ConfigError(str(path), errors)


def flatten_errors(exc: ValidationError) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for err in exc.errors():
        parts = [str(p) for p in err["loc"]]
        # Drop the union tag pydantic inserts after `backend` (backend.rules.x -> backend.x).
        parts = [
            p for i, p in enumerate(parts) if not (i and parts[i - 1] == "backend" and p in _TAGS)
        ]
        loc = ".".join(parts)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        out.append((loc or "(root)", msg))
    return out


_TAGS = {"rules", "onnx", "llamacpp"}


def reference_markdown() -> str:
    """The configuration reference, generated from the settings model (for the README)."""
    lines = ["| key | type | default | description |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{field.alias or name}"
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, key + ".")
                continue
            default = (
                ""
                if field.is_required()
                else _fmt_default(field.get_default(call_default_factory=True))
            )
            tname = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
            tname = tname.replace("pathlib._local.", "pathlib.")  # Python 3.13's module name
            desc = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{key}` | {tname} | {default} | {desc} |")

    walk(Settings, "")
    for sub, title in (
        (TaskConfig, "tasks.NAME."),
        (RulesBackendConfig, "tasks.NAME.backend. (type = rules)"),
        (RuleConfig, "tasks.NAME.backend.rules[]."),
        (OnnxBackendConfig, "tasks.NAME.backend. (type = onnx)"),
        (LlamaCppBackendConfig, "tasks.NAME.backend. (type = llamacpp)"),
    ):
        lines.append(f"| **{title}** | | | |")
        walk(sub, title.split(" ")[0])
    return "\n".join(lines)


REF_START = "<!-- config-reference:start -->"
REF_END = "<!-- config-reference:end -->"


def update_reference(readme: Path) -> None:
    """Replace the section between the reference markers of ``readme``."""
    text = readme.read_text(encoding="utf-8")
    head, _, rest = text.partition(REF_START)
    _, _, tail = rest.partition(REF_END)
    readme.write_text(
        f"{head}{REF_START}\n{reference_markdown()}\n{REF_END}{tail}", encoding="utf-8"
    )


def _fmt_default(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, SecretStr):
        return ""
    text = json.dumps(value, default=str)
    return f"`{text}`".replace("|", "\\|")
