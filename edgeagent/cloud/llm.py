"""OpenAI-compatible chat-completions client (httpx, async): retries within a deadline.

Works against hosted APIs, vLLM, Ollama and the llama.cpp server: it only uses
``POST {base_url}/chat/completions`` with ``messages``, ``max_tokens``,
``temperature`` and (optionally) ``response_format``.

Retry policy: 429 (honouring ``Retry-After``), 408, 5xx, timeouts and connection
errors are retried with capped, jittered exponential backoff, at most
``max_attempts`` times and never past the caller's deadline.  Every other HTTP
status is final.  The API key is sent as a Bearer token and never logged.
Runs on the event loop thread; httpx does the I/O.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from dataclasses import dataclass
from datetime import timezone
from typing import Any

import httpx

from edgeagent import __version__
from edgeagent.backoff import backoff_delays
from edgeagent.cloud.config import LlmConfig
from edgeagent.logs import get_logger
from edgeagent.protocol import truncate

log = get_logger("edgeagent.cloud.llm")

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class Completion:
    """One successful chat completion."""

    content: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    attempts: int
    """HTTP attempts it took (1 = first try)."""


class LlmError(Exception):
    """The endpoint gave no usable answer; ``code`` goes into the reply's ``error.code``."""

    code = "upstream_error"


class DeadlineExceeded(LlmError):
    """The deadline passed before the endpoint answered."""

    code = "deadline_exceeded"


class UpstreamUnavailable(LlmError):
    """Retryable failures (429, 5xx, connection errors) until attempts or time ran out."""

    code = "upstream_unavailable"


class UpstreamRejected(LlmError):
    """A final HTTP error (400, 401, 404, ...) or a response that is not a completion."""

    code = "upstream_rejected"


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date; None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        current = time.time() if now is None else now
        seconds = when.timestamp() - current
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


class LlmClient:
    """One connection pool to the endpoint.  Create and use on the event loop thread."""

    def __init__(
        self,
        config: LlmConfig,
        api_key: str | None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        headers = {"User-Agent": f"edgeagent-cloud/{__version__}"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.AsyncClient(
            base_url=config.base_url + "/",
            headers=headers,
            timeout=httpx.Timeout(config.timeout_s),
            limits=httpx.Limits(
                max_connections=config.max_connections,
                max_keepalive_connections=config.max_connections,
            ),
            transport=transport,
        )
        self._delay = backoff_delays(
            config.backoff_min_s, config.backoff_max_s, rng or random.Random()
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def chat(
        self,
        messages: list[dict[str, str]],
        *,
        response_format: dict[str, Any] | None,
        deadline: float,
    ) -> Completion:
        """One completion, retried as the module docstring says.

        ``deadline`` is a ``time.monotonic()`` instant.  Raises :class:`DeadlineExceeded`,
        :class:`UpstreamUnavailable` or :class:`UpstreamRejected`.
        """
        cfg = self.config
        body: dict[str, Any] = {
            "model": cfg.model,
            "messages": messages,
            "max_tokens": cfg.max_tokens,
            "temperature": cfg.temperature,
        }
        if response_format is not None:
            body["response_format"] = response_format
        attempt = 0
        last = "no attempt"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(f"deadline passed after {attempt} attempt(s); last: {last}")
            attempt += 1
            limit = min(cfg.timeout_s, remaining)
            retry_after: float | None = None
            try:
                # httpx's timeout bounds each read; wait_for bounds the whole exchange.
                resp = await asyncio.wait_for(
                    self._http.post("chat/completions", json=body, timeout=limit), limit
                )
            except (TimeoutError, asyncio.TimeoutError, httpx.TimeoutException):
                last = f"no answer within {limit:.1f}s"
                if time.monotonic() >= deadline:
                    raise DeadlineExceeded(
                        f"deadline passed after {attempt} attempt(s); last: {last}"
                    ) from None
            except httpx.TransportError as exc:
                last = f"connection error: {type(exc).__name__}: {truncate(str(exc), 120)}"
            else:
                if resp.status_code == 200:
                    return _completion(resp, cfg.model, attempt)
                if resp.status_code not in RETRYABLE_STATUS:
                    raise UpstreamRejected(
                        f"HTTP {resp.status_code} from the model endpoint: "
                        f"{truncate(resp.text, 300)}"
                    )
                last = f"HTTP {resp.status_code}"
                retry_after = retry_after_s(resp.headers.get("retry-after"))
            if attempt >= cfg.max_attempts:
                raise UpstreamUnavailable(f"gave up after {attempt} attempt(s); last: {last}")
            wait = retry_after if retry_after is not None else self._delay(attempt - 1)
            if time.monotonic() + wait >= deadline:
                # Waiting would only end past the deadline: say so now rather than then.
                raise UpstreamUnavailable(
                    f"{last}; the next attempt (in {wait:.1f}s) would be past the deadline"
                )
            log.warning("cloud.llm_retry", attempt=attempt, reason=last, retry_in_s=round(wait, 2))
            await asyncio.sleep(wait)


def _completion(resp: httpx.Response, default_model: str, attempts: int) -> Completion:
    try:
        data = resp.json()
        choice = data["choices"][0]
        message = choice["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise UpstreamRejected(
            f"the model endpoint answered 200 without a completion: {truncate(resp.text, 300)}"
        ) from None
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        refusal = message.get("refusal") if isinstance(message, dict) else None
        content = f"(refused: {refusal})" if isinstance(refusal, str) else ""
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    model = data.get("model")
    return Completion(
        content=content,
        model=model if isinstance(model, str) and model else default_model,
        prompt_tokens=_int(usage.get("prompt_tokens")),
        completion_tokens=_int(usage.get("completion_tokens")),
        finish_reason=choice.get("finish_reason") if isinstance(choice, dict) else None,
        attempts=attempts,
    )


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
