"""The cloud agent's settings: TOML file < ``EDGEAGENT_CLOUD_*`` environment.

The file is ``--config``, else ``$EDGEAGENT_CLOUD_CONFIG``, else
``/etc/edgeagent/cloud.toml``.  Every key can be overridden by an environment
variable ``EDGEAGENT_CLOUD_<SECTION>__<KEY>`` (``EDGEAGENT_CLOUD_MQTT__HOST``,
``EDGEAGENT_CLOUD_LLM__MODEL``, ``EDGEAGENT_CLOUD_MQTT__CLIENT_ID``).  Unknown keys
are errors.  The ``[mqtt]`` and ``[log]`` sections are the daemon's own classes.

Secrets: the LLM API key comes from ``llm.api_key_file``, else the environment
variable named by ``llm.api_key_env``, else the systemd credential ``llm-api-key``;
the broker password as for the daemon (``mqtt.password``/``password_file``/the
credential ``mqtt-password``), both through :mod:`edgeagent.credentials`.  Like
``edgeagent/config.py``, this module (with :mod:`edgeagent.credentials`) is the only
one of the cloud agent that reads the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import (
    SettingsConfigDict,
)

from edgeagent.config import (
    BrokerClientSettings,
    ConfigError,
    LogConfig,
    MqttConfig,
    host_id,
    mqtt_file_errors,
    read_settings_file,
    resolve_path,
    segment,
)
from edgeagent.credentials import load_secret

ENV_PREFIX = "EDGEAGENT_CLOUD_"
DEFAULT_CONFIG_PATH = Path("/etc/edgeagent/cloud.toml")

StructuredOutput = Literal["json_schema", "json_object_schema", "json_object", "prompt"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _default_worker_id() -> str:
    return host_id("cloud")


class LlmConfig(_Section):
    """The OpenAI-compatible chat-completions endpoint (hosted API, vLLM, Ollama, llama.cpp)."""

    base_url: str = Field(
        "http://127.0.0.1:8080/v1",
        description="API base URL; requests go to `{base_url}/chat/completions`.",
    )
    model: str = Field("default", description="The `model` sent with every request.")
    api_key_file: Path | None = Field(
        None, description="File whose first line is the API key (sent as a Bearer token)."
    )
    api_key_env: str | None = Field(
        "OPENAI_API_KEY",
        description="Environment variable holding the API key, used when `api_key_file` is "
        "unset.  No key at all is fine for local servers.",
    )
    timeout_s: float = Field(
        60.0, gt=0, description="One HTTP attempt's limit (seconds); the request deadline caps it."
    )
    max_tokens: int = Field(512, ge=1, description="`max_tokens` of every completion.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature.")
    structured_output: StructuredOutput = Field(
        "json_schema",
        description="How JSON answers are requested: `json_schema` (OpenAI structured outputs: "
        "hosted APIs, vLLM, llama.cpp's llama-server, Ollama), `json_object_schema` "
        "(`{type: json_object, schema}`: llama-cpp-python's server), `json_object` (JSON mode, "
        "schema in the prompt only) or `prompt` (no response_format; schema in the prompt).",
    )
    strict_schema: bool = Field(
        True,
        description="Send `strict: true` with json_schema (hosted APIs then require "
        "`additionalProperties: false` and every property required in extract schemas).",
    )
    max_attempts: int = Field(
        5, ge=1, le=50, description="HTTP attempts per completion (429, 5xx, connection errors)."
    )
    backoff_min_s: float = Field(0.5, gt=0, description="First retry delay (seconds).")
    backoff_max_s: float = Field(8.0, gt=0, description="Retry delay cap (seconds).")
    max_connections: int = Field(
        16, ge=1, description="HTTP connections kept to the endpoint (pool size)."
    )

    @field_validator("base_url")
    @classmethod
    def _v_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


class AgentConfig(_Section):
    """What the agent serves and how much at once."""

    prefix: str = Field("edgeagent", description="First topic level (the daemons' `prefix`).")
    group: str = Field(
        "cloud",
        description="Shared subscription group: workers of one group split "
        "`$share/{group}/{prefix}/cloud/requests/+` between them.",
    )
    worker_id: str = Field(
        default_factory=_default_worker_id,
        description="This worker's name (logs, status); default: the host name.  The MQTT "
        "client id defaults to `edgeagent-cloud-{worker_id}`: give each worker its own.",
    )
    status_per_worker: bool = Field(
        True,
        description="Publish the retained status on `{prefix}/cloud/status/{worker_id}`, as "
        "PROTOCOL.md says; `false`: on the one shared topic `{prefix}/cloud/status` (older "
        "daemons; with several workers, one worker's `stopped` or `offline` then hides that "
        "the others are up).",
    )
    max_concurrency: int = Field(
        4, ge=1, le=1024, description="Requests answered at the same time (LLM calls in flight)."
    )
    default_deadline_ms: int = Field(
        30000, ge=1, description="Deadline of a request that carries no `deadline_ms` (ms)."
    )
    max_deadline_ms: int = Field(120000, ge=1, description="Cap on a request's `deadline_ms` (ms).")
    deadline_margin_ms: int = Field(
        100,
        ge=0,
        description="Give up this long before a request's deadline, so the reply can still "
        "arrive in time (ms).",
    )
    max_request_bytes: int = Field(
        262144, ge=256, description="Largest request payload accepted (bytes)."
    )
    publish_timeout_s: float = Field(
        30.0,
        gt=0,
        description="How long to wait for the broker's PUBACK of a reply before leaving the "
        "request unacknowledged (the broker then redelivers it) (seconds).",
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, wait this long for requests in flight (seconds)."
    )
    reply_cache_ttl_s: float = Field(
        600.0,
        ge=0,
        description="Remember each published reply this long, so a re-sent escalation is "
        "answered again without another LLM call (seconds; 0 = off).",
    )
    reply_cache_max_entries: int = Field(
        4096, ge=0, description="Replies remembered at most (oldest dropped first)."
    )

    _v_prefix = field_validator("prefix", "group", "worker_id")(segment)


class CloudSettings(BrokerClientSettings):
    """The whole cloud agent configuration."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    mqtt: MqttConfig = Field(
        default_factory=MqttConfig,
        description="Broker connection (same keys as the daemon's; protocol must be 5).  "
        "`receive_maximum` defaults to 2 x agent.max_concurrency here.",
    )
    llm: LlmConfig = Field(default_factory=LlmConfig, description="The model endpoint.")
    agent: AgentConfig = Field(default_factory=AgentConfig, description="Serving.")
    log: LogConfig = Field(default_factory=LogConfig, description="Logging.")

    # -- derived values -------------------------------------------------------------

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"edgeagent-cloud-{self.agent.worker_id}"

    @property
    def receive_maximum(self) -> int:
        """Requests the broker may push before we ack: the backpressure window."""
        if "receive_maximum" in self.mqtt.model_fields_set:
            return self.mqtt.receive_maximum
        return min(65535, 2 * self.agent.max_concurrency)

    def api_key(self, environ: dict[str, str] | None = None) -> str | None:
        """The LLM API key: `api_key_file`, else `$api_key_env`, else credential `llm-api-key`."""
        key = load_secret(
            self.llm.api_key_file,
            "llm.api_key_file",
            "llm-api-key",
            env_var=self.llm.api_key_env,
            environ=environ,
        )
        return key or None


def resolve_config_path(explicit: Path | None, environ: dict[str, str] | None = None) -> Path:
    return resolve_path(explicit, "EDGEAGENT_CLOUD_CONFIG", DEFAULT_CONFIG_PATH, environ)


def load_cloud_settings(explicit: Path | None = None) -> tuple[CloudSettings, Path]:
    """Read and validate the configuration; raise :class:`ConfigError` with precise keys."""
    path = resolve_config_path(explicit)
    settings = read_settings_file(CloudSettings, path)
    _cross_check(settings, path)
    return settings, path


def _cross_check(settings: CloudSettings, path: Path) -> None:
    m = settings.mqtt
    errors = mqtt_file_errors(m, settings.tls_key_file())
    if m.protocol != "5":
        errors.append(
            ("mqtt.protocol", "the cloud agent needs MQTT 5 (shared subscriptions, Response Topic)")
        )
    if settings.llm.api_key_file is not None and not settings.llm.api_key_file.is_file():
        errors.append(("llm.api_key_file", f"no such file: {settings.llm.api_key_file}"))
    if settings.llm.backoff_max_s < settings.llm.backoff_min_s:
        errors.append(("llm.backoff_max_s", "must be >= llm.backoff_min_s"))
    if settings.agent.default_deadline_ms > settings.agent.max_deadline_ms:
        errors.append(("agent.default_deadline_ms", "must be <= agent.max_deadline_ms"))
    if errors:
        raise ConfigError(str(path), errors)
