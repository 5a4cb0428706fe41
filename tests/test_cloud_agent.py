"""The reference cloud agent (``edgeagent cloud``).

* unit: request parsing, prompts, output checks, the LLM client's retry policy
  (httpx ``MockTransport``);
* integration / end to end: the agent as a real subprocess against a real
  mosquitto, its model endpoint a scripted OpenAI-compatible HTTP server in a
  thread on 127.0.0.1 (:class:`ScriptedLLM`);
* optionally a real ``llama_cpp.server`` with a small GGUF model (skipped when
  not installed).

The scripted server picks its behaviour from the user message, which every test
sends as ``"{scenario}|{unique}"``: one agent serves many tests without them
seeing each other's calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
import pytest

from edgeagent.cloud.config import LlmConfig
from edgeagent.cloud.llm import (
    DeadlineExceeded,
    LlmClient,
    UpstreamRejected,
    UpstreamUnavailable,
    retry_after_s,
)
from edgeagent.cloud.messages import BadRequest, CloudRequest, parse_request, reply_topic_for
from edgeagent.cloud.prompts import InvalidOutput, build_messages, check_output, response_format
from tests.broker import Broker, free_port
from tests.harness import REPO, TestClient

API_KEY = "sk-test-" + "S3CRET" * 4
LABELS = ["fire", "intrusion", "water_leak"]
SCHEMA = {
    "type": "object",
    "properties": {"device_id": {"type": "string"}, "value": {"type": "number"}},
    "required": ["device_id", "value"],
}

# -- the scripted model endpoint -----------------------------------------------------


@dataclass
class Call:
    key: str
    body: dict[str, Any]
    headers: dict[str, str]
    n: int
    """1-based index of this call among the calls with the same key."""


@dataclass
class ScriptedLLM:
    """An OpenAI-compatible ``/v1/chat/completions`` whose answers a test scripts."""

    server: ThreadingHTTPServer
    calls: list[Call] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    """Lets `drain` calls answer."""
    closing: threading.Event = field(default_factory=threading.Event)
    """Lets `slow` calls answer (set at teardown only)."""
    gate: threading.Event = field(default_factory=threading.Event)
    """Lets `gated` calls answer (one test at a time sets it)."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def calls_for(self, key: str) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.key == key]

    def wait_calls(self, key: str, n: int, timeout: float = 20.0) -> list[Call]:
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            got = self.calls_for(key)
            if len(got) >= n:
                return got
            time.sleep(0.02)
        raise TimeoutError(f"{key}: {len(self.calls_for(key))} call(s), expected {n}")


def _completion(content: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:8]}",
        "object": "chat.completion",
        "model": "scripted-1",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 3},
    }


def _script(scenario: str, n: int, llm: ScriptedLLM) -> tuple[int, dict[str, str], Any]:
    """(HTTP status, headers, body) of the n-th call of a scenario."""
    label = json.dumps({"label": "fire"})
    match scenario:
        case "classify" | "split":
            return 200, {}, _completion(label)
        case "extract":
            return 200, {}, _completion('```json\n{"device_id": "pump-3", "value": 4.5}\n```')
        case "generate":
            return 200, {}, _completion("  Hello from the cloud.  ")
        case "rate-limited":
            if n == 1:
                return 429, {"Retry-After": "1"}, {"error": {"message": "slow down"}}
            return 200, {}, _completion(label)
        case "server-error":
            if n == 1:
                return 500, {}, {"error": {"message": "boom"}}
            return 200, {}, _completion(label)
        case "unauthorized":
            return 401, {}, {"error": {"message": "bad key"}}
        case "slow":
            llm.closing.wait(10)
            return 200, {}, _completion(label)
        case "drain":
            llm.release.wait(20)
            return 200, {}, _completion(label)
        case "gated":
            llm.gate.wait(20)
            return 200, {}, _completion(label)
        case "lag":
            time.sleep(0.05)
            return 200, {}, _completion(label)
        case "malformed":
            return 200, {}, _completion("this is not JSON {")
        case "bad-label":
            return 200, {}, _completion(json.dumps({"label": "banana"}))
        case "fixed-on-retry":
            bad = json.dumps({"label": "banana"})
            return 200, {}, _completion(bad if n == 1 else json.dumps({"label": "Water_Leak"}))
        case "bad-extract":
            return 200, {}, _completion(json.dumps({"device_id": 3}))
    return 400, {}, {"error": {"message": f"unknown scenario {scenario!r}"}}


def _handler(llm: ScriptedLLM) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length))
            key = next((m["content"] for m in body["messages"] if m["role"] == "user"), "(none)")
            with llm.lock:
                n = 1 + sum(1 for c in llm.calls if c.key == key)
                llm.calls.append(Call(key, body, dict(self.headers.items()), n))
            script: tuple[int, dict[str, str], Any] = (404, {}, {"error": "not found"})
            if self.path == "/v1/chat/completions":
                script = _script(key.split("|")[0], n, llm)
            status, headers, data = script
            raw = json.dumps(data).encode()
            with contextlib.suppress(OSError):  # the agent may have given up on us
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

    return Handler


@pytest.fixture(scope="module")
def llm() -> Iterator[ScriptedLLM]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    server.daemon_threads = True
    scripted = ScriptedLLM(server)
    server.RequestHandlerClass = _handler(scripted)
    thread = threading.Thread(target=server.serve_forever, name="scripted-llm", daemon=True)
    thread.start()
    yield scripted
    scripted.release.set()
    scripted.closing.set()
    server.shutdown()
    server.server_close()
    thread.join(10)


# -- the agent as a subprocess ---------------------------------------------------------


def write_cloud_config(
    path: Path,
    *,
    port: int,
    base_url: str,
    prefix: str,
    worker: str,
    key_file: Path,
    group: str = "cloud",
    extra_agent: str = "",
    extra_llm: str = "",
    extra_mqtt: str = "",
) -> Path:
    path.write_text(
        f"""
[mqtt]
host = "127.0.0.1"
port = {port}
client_id = "cloud-{worker}-{uuid.uuid4().hex[:6]}"
reconnect_min_s = 0.1
reconnect_max_s = 1.0
{extra_mqtt}
[llm]
base_url = "{base_url}"
model = "scripted"
api_key_file = "{key_file}"
backoff_min_s = 0.05
backoff_max_s = 0.2
{extra_llm}
[agent]
prefix = "{prefix}"
group = "{group}"
worker_id = "{worker}"
max_concurrency = 4
{"" if "status_per_worker" in extra_agent else "status_per_worker = false"}
{extra_agent}
[log]
format = "json"
level = "info"
"""
    )
    return path


class CloudProcess:
    """``python -m edgeagent cloud --config ...`` with its JSON log in a file."""

    def __init__(self, config: Path, log_path: Path, worker: str) -> None:
        self.config = config
        self.log_path = log_path
        self.worker = worker
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> CloudProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEAGENT_")}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgeagent", "cloud", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and (event is None or rec.get("event") == event):
                out.append(rec)
        return out

    def wait_for_log(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            found = self.records(event)
            if found:
                return found[0]
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}:\n{self.log_text()}")
            time.sleep(0.05)
        raise TimeoutError(f"no {event!r} in the agent log:\n{self.log_text()[-3000:]}")

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class Env:
    """What a test needs to start agents and talk to them."""

    broker: Broker
    llm: ScriptedLLM
    tmp: Path
    key_file: Path
    started: list[CloudProcess] = field(default_factory=list)

    def agent(self, prefix: str, worker: str = "w1", **kw: Any) -> CloudProcess:
        cfg = write_cloud_config(
            self.tmp / f"cloud-{prefix}-{worker}.toml",
            port=self.broker.port,
            base_url=self.llm.base_url,
            prefix=prefix,
            worker=worker,
            key_file=self.key_file,
            **kw,
        )
        proc = CloudProcess(cfg, self.tmp / f"cloud-{prefix}-{worker}.log", worker)
        self.started.append(proc)
        return proc.start()


def _make_env(broker: Broker, llm: ScriptedLLM, tmp: Path) -> Env:
    key_file = tmp / "llm-api-key"
    key_file.write_text(API_KEY + "\n")
    return Env(broker, llm, tmp, key_file)


def wait_online(client: TestClient, status_topic: str, workers: set[str]) -> None:
    """Wait until each worker's `online` status arrived on ``client`` (subscribed before).

    The status follows the SUBSCRIBE on the agent's connection, so once it is seen the
    shared subscription is in place."""
    seen: set[str] = set()
    until = time.monotonic() + 30
    while seen != workers and time.monotonic() < until:
        for m in client.collect(1, timeout=0.5, where=lambda m: m.topic == status_topic):
            data = json.loads(m.payload)
            if data["state"] == "online":
                seen.add(data["worker"])
    assert seen == workers, f"online: {seen}, expected {workers}"


def escalation(kind: str, scenario: str, *, device: str = "dev1", **fields: Any) -> dict[str, Any]:
    req: dict[str, Any] = {
        "v": 1,
        "escalation_id": uuid.uuid4().hex,
        "device": device,
        "task": {"classify": "alarm", "extract": "reading", "generate": "chat"}[kind],
        "kind": kind,
        "input": f"{scenario}|{uuid.uuid4().hex}",
        "instructions": "Be precise.",
        "local": {"output": None, "confidence": 0.2},
        "deadline_ms": 20000,
    }
    if kind == "classify":
        req["labels"] = LABELS
    if kind == "extract":
        req["schema"] = SCHEMA
    req.update(fields)
    return req


def send(client: TestClient, prefix: str, req: dict[str, Any]) -> None:
    client.publish(
        f"{prefix}/cloud/requests/{req['task']}",
        req,
        response_topic=f"{prefix}/{req['device']}/cloud/replies",
        correlation=f"corr-{req['escalation_id']}".encode(),
    )


def replies(client: TestClient, n: int, timeout: float = 30.0) -> list[paho.MQTTMessage]:
    return client.collect(n, timeout=timeout, where=lambda m: m.topic.endswith("/cloud/replies"))


# -- one agent for the request/answer tests --------------------------------------------


@dataclass
class Served:
    env: Env
    agent: CloudProcess
    client: TestClient
    prefix: str

    def ask(self, req: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """Send one request; return its reply (checking the Correlation Data came back)."""
        corr = f"corr-{req['escalation_id']}".encode()
        send(self.client, self.prefix, req)
        got = self.client.collect(
            1,
            timeout=timeout,
            where=lambda m: getattr(m.properties, "CorrelationData", None) == corr,
        )
        assert got, f"no reply to {req['escalation_id']}:\n{self.agent.log_text()[-3000:]}"
        assert got[0].topic == f"{self.prefix}/{req['device']}/cloud/replies"
        reply: dict[str, Any] = json.loads(got[0].payload)
        assert reply["v"] == 1
        assert reply["escalation_id"] == req["escalation_id"]
        return reply


@pytest.fixture(scope="module")
def served(
    broker: Broker, llm: ScriptedLLM, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    env = _make_env(broker, llm, tmp_path_factory.mktemp("cloud"))
    prefix = f"ea{uuid.uuid4().hex[:8]}"
    client = TestClient(broker.port)
    client.subscribe(f"{prefix}/+/cloud/replies")
    client.subscribe(f"{prefix}/cloud/status")
    agent = env.agent(prefix)
    try:
        wait_online(client, f"{prefix}/cloud/status", {"w1"})
        yield Served(env, agent, client, prefix)
    finally:
        llm.closing.set()
        agent.stop()
        client.close()


@pytest.mark.e2e
def test_classify_happy_path(served: Served) -> None:
    req = escalation("classify", "classify")
    reply = served.ask(req)
    assert reply["status"] == "ok"
    assert reply["output"] == {"label": "fire"}
    assert reply["model"] == "scripted-1"
    assert reply["usage"] == {"prompt_tokens": 10, "completion_tokens": 3}
    assert reply["error"] is None
    (call,) = served.env.llm.calls_for(req["input"])
    assert call.headers["Authorization"] == f"Bearer {API_KEY}"
    fmt = call.body["response_format"]
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"]["properties"]["label"]["enum"] == LABELS
    assert call.body["model"] == "scripted"
    # Logs: one event per request and reply; never the input, never the key.
    served.agent.wait_for_log("cloud.reply")
    log = served.agent.log_text()
    assert req["input"] not in log
    assert API_KEY not in log
    events = [r for r in served.agent.records() if r.get("escalation_id") == req["escalation_id"]]
    assert [e["event"] for e in events] == ["cloud.request", "cloud.reply"]


@pytest.mark.e2e
def test_extract_happy_path(served: Served) -> None:
    req = escalation("extract", "extract")
    reply = served.ask(req)
    assert reply["status"] == "ok"
    assert reply["output"] == {"device_id": "pump-3", "value": 4.5}
    (call,) = served.env.llm.calls_for(req["input"])
    assert call.body["response_format"]["json_schema"]["schema"] == SCHEMA


@pytest.mark.e2e
def test_generate_happy_path(served: Served) -> None:
    req = escalation("generate", "generate")
    reply = served.ask(req)
    assert reply["status"] == "ok"
    assert reply["output"] == {"text": "Hello from the cloud."}
    (call,) = served.env.llm.calls_for(req["input"])
    assert "response_format" not in call.body


@pytest.mark.e2e
def test_429_with_retry_after_then_success(served: Served) -> None:
    req = escalation("classify", "rate-limited")
    reply = served.ask(req)
    assert reply["status"] == "ok"
    assert reply["output"] == {"label": "fire"}
    assert len(served.env.llm.calls_for(req["input"])) == 2
    retries = [
        r
        for r in served.agent.records("cloud.llm_retry")
        if r.get("escalation_id") == req["escalation_id"]
    ]
    assert [(r["reason"], r["retry_in_s"]) for r in retries] == [("HTTP 429", 1.0)]


@pytest.mark.e2e
def test_500_then_success(served: Served) -> None:
    req = escalation("classify", "server-error")
    reply = served.ask(req)
    assert reply["status"] == "ok"
    assert len(served.env.llm.calls_for(req["input"])) == 2


@pytest.mark.e2e
def test_final_http_error_is_not_retried(served: Served) -> None:
    req = escalation("classify", "unauthorized")
    reply = served.ask(req)
    assert reply["status"] == "error"
    assert reply["error"]["code"] == "upstream_rejected"
    assert "401" in reply["error"]["message"]
    assert len(served.env.llm.calls_for(req["input"])) == 1


@pytest.mark.e2e
def test_model_slower_than_the_deadline_gives_expired(served: Served) -> None:
    req = escalation("classify", "slow", deadline_ms=800)
    reply = served.ask(req)
    assert reply["status"] == "expired"
    assert reply["error"]["code"] == "deadline_exceeded"
    assert reply["output"] is None


@pytest.mark.e2e
def test_malformed_json_is_retried_once_then_invalid_output(served: Served) -> None:
    req = escalation("extract", "malformed")
    reply = served.ask(req)
    assert reply["status"] == "error"
    assert reply["error"]["code"] == "invalid_output"
    calls = served.env.llm.calls_for(req["input"])
    assert len(calls) == 2
    # The retry shows the model its bad answer and asks again.
    second = calls[1].body["messages"]
    assert second[-2] == {"role": "assistant", "content": "this is not JSON {"}
    assert second[-1]["role"] == "user" and "invalid" in second[-1]["content"]
    assert reply["usage"] == {"prompt_tokens": 20, "completion_tokens": 6}


@pytest.mark.e2e
def test_label_outside_the_set_is_an_error(served: Served) -> None:
    req = escalation("classify", "bad-label")
    reply = served.ask(req)
    assert reply["status"] == "error"
    assert reply["error"]["code"] == "invalid_output"
    assert "banana" in reply["error"]["message"]
    assert len(served.env.llm.calls_for(req["input"])) == 2


def _corr_replies(served: Served, corr: bytes, timeout: float) -> list[dict[str, Any]]:
    got = served.client.collect(
        99,
        timeout=timeout,
        where=lambda m: getattr(m.properties, "CorrelationData", None) == corr,
    )
    return [json.loads(m.payload) for m in got]


@pytest.mark.e2e
def test_resent_escalation_is_answered_without_a_second_llm_call(served: Served) -> None:
    """Issue 9 item 8: a daemon re-sends an escalation it has no reply to yet (its timer
    fired, or the cloud came back online).  Copies that arrive while the first is being
    answered, and copies that arrive after the reply went out, cost no LLM call."""
    llm = served.env.llm
    req = escalation("classify", "gated")
    send(served.client, served.prefix, req)
    llm.wait_calls(req["input"], 1)
    for _ in range(3):  # in flight: the LLM call has not returned yet
        send(served.client, served.prefix, req)
    llm.gate.set()
    corr = f"corr-{req['escalation_id']}".encode()
    first = _corr_replies(served, corr, timeout=5.0)
    assert first and all(r["status"] == "ok" for r in first)
    assert first[0]["usage"] == {"prompt_tokens": 10, "completion_tokens": 3}
    # After the reply: re-sent with new Correlation Data; answered from memory.
    for i in range(3):
        again = dict(req)
        served.client.publish(
            f"{served.prefix}/cloud/requests/{req['task']}",
            again,
            response_topic=f"{served.prefix}/{req['device']}/cloud/replies",
            correlation=f"resend-{i}".encode(),
        )
        [r] = _corr_replies(served, f"resend-{i}".encode(), timeout=10.0)[:1]
        assert r["escalation_id"] == req["escalation_id"]
        assert (r["status"], r["output"], r["model"]) == ("ok", {"label": "fire"}, "scripted-1")
        assert r["usage"] == {"prompt_tokens": 0, "completion_tokens": 0}  # nothing spent
    assert len(llm.calls_for(req["input"])) == 1
    assert len(served.agent.records("cloud.request_answered_before")) >= 3


@pytest.mark.e2e
def test_burst_beyond_the_window_loses_no_request(env: Env, client: TestClient) -> None:
    """A burst of QoS 1 requests for a busy agent: every one is answered (none is dropped
    from a full queue and left unacknowledged until the next reconnect)."""
    prefix = f"ea{uuid.uuid4().hex[:8]}"
    client.subscribe(f"{prefix}/+/cloud/replies")
    client.subscribe(f"{prefix}/cloud/status")
    agent = env.agent(prefix, "wl")
    wait_online(client, f"{prefix}/cloud/status", {"wl"})
    reqs = [escalation("classify", "lag", device=f"d{i % 4}") for i in range(80)]
    for r in reqs:
        send(client, prefix, r)
    got = {json.loads(m.payload)["escalation_id"] for m in replies(client, len(reqs), 60)}
    assert got == {r["escalation_id"] for r in reqs}
    assert not agent.records("cloud.queue_full")


@pytest.mark.e2e
def test_reply_refused_by_the_broker_is_logged_once(
    llm: ScriptedLLM, tmp_path: Path, client_factory: Callable[..., TestClient]
) -> None:
    """The broker's ACL forbids the agent's replies (PUBACK 0x87): the agent says so, by
    topic and reason, and does not loop on the request (one LLM call)."""
    acl = (
        "user cloud\ntopic read ea/cloud/requests/#\ntopic write ea/cloud/status/#\n"
        "topic write ea/cloud/status\nuser producer\ntopic readwrite ea/#\n"
    )
    with Broker(tmp_path / "b", users={"cloud": "pc", "producer": "pp"}, acl=acl) as b:
        pw = tmp_path / "pw"
        pw.write_text("pc\n")
        env = _make_env(b, llm, tmp_path)
        agent = env.agent("ea", "wr", extra_mqtt=f'username = "cloud"\npassword_file = "{pw}"')
        try:
            c = client_factory(b.port, username="producer", password="pp")
            c.subscribe("ea/cloud/status")
            wait_online(c, "ea/cloud/status", {"wr"})
            req = escalation("classify", "classify")
            send(c, "ea", req)
            rec = agent.wait_for_log("cloud.reply_refused")
            assert rec["topic"] == "ea/dev1/cloud/replies"
            assert rec["reason"] == "Not authorized (reason code 135)"
            assert rec["escalation_id"] == req["escalation_id"]
            assert len(llm.calls_for(req["input"])) == 1
            assert not agent.records("cloud.reply")
        finally:
            agent.stop()


@pytest.mark.e2e
def test_transient_failure_is_not_remembered(served: Served) -> None:
    """An upstream failure is not an answer: the re-sent request gets a fresh call."""
    req = escalation("classify", "unauthorized")
    assert served.ask(req)["status"] == "error"
    assert served.ask(req)["error"]["code"] == "upstream_rejected"
    assert len(served.env.llm.calls_for(req["input"])) == 2


def test_recent_replies_are_bounded_in_age_and_number() -> None:
    from edgeagent.cloud.agent import RecentReplies
    from edgeagent.cloud.messages import CloudReply
    from edgeagent.protocol import ErrorInfo

    now = [0.0]
    cache = RecentReplies(ttl_s=10.0, max_entries=2, clock=lambda: now[0])
    ok = CloudReply(escalation_id="a", status="ok", output={"label": "fire"})
    assert cache.put(("d", "a"), ok)
    assert cache.get(("d", "a")) == ok
    assert cache.get(("other-device", "a")) is None
    bad = ErrorInfo(code="invalid_output", message="x")
    assert cache.put(("d", "b"), CloudReply(escalation_id="b", status="error", error=bad))
    transient = ErrorInfo(code="upstream_unavailable", message="x")
    assert not cache.put(("d", "c"), CloudReply(escalation_id="c", status="error", error=transient))
    assert not cache.put(("d", "e"), CloudReply(escalation_id="e", status="expired", error=bad))
    assert cache.put(("d", "f"), ok)  # a third entry: the oldest ("a") goes
    assert len(cache) == 2 and cache.get(("d", "a")) is None
    now[0] = 10.5
    assert cache.get(("d", "f")) is None and len(cache) == 0
    assert not RecentReplies(ttl_s=0, max_entries=5).put(("d", "a"), ok)


@pytest.mark.e2e
def test_corrective_retry_can_fix_the_answer(served: Served) -> None:
    req = escalation("classify", "fixed-on-retry")
    reply = served.ask(req)
    assert reply["status"] == "ok"
    assert reply["output"] == {"label": "water_leak"}  # canonical spelling of the label


@pytest.mark.e2e
def test_extract_answer_against_the_schema(served: Served) -> None:
    req = escalation("extract", "bad-extract")
    reply = served.ask(req)
    assert reply["status"] == "error"
    assert reply["error"]["code"] == "invalid_output"


@pytest.mark.e2e
def test_bad_requests_get_an_error_reply_and_do_not_stall(served: Served) -> None:
    # No labels for a classify task.
    req = escalation("classify", "classify", labels=[])
    reply = served.ask(req)
    assert reply["status"] == "error"
    assert reply["error"]["code"] == "invalid_request"
    assert served.env.llm.calls_for(req["input"]) == []
    # A newer protocol version.
    req = escalation("classify", "classify", v=2)
    reply = served.ask(req)
    assert reply["error"]["code"] == "unsupported_version"
    # Not JSON at all: answered on the Response Topic, escalation id from the Correlation Data.
    eid = uuid.uuid4().hex
    served.client.publish(
        f"{served.prefix}/cloud/requests/alarm",
        b"{not json",
        response_topic=f"{served.prefix}/dev1/cloud/replies",
        correlation=eid.encode(),
    )
    got = served.client.collect(
        1, where=lambda m: getattr(m.properties, "CorrelationData", None) == eid.encode()
    )
    assert got, served.agent.log_text()[-2000:]
    data = json.loads(got[0].payload)
    assert (data["status"], data["escalation_id"], data["error"]["code"]) == (
        "error",
        eid,
        "invalid_request",
    )
    # And the agent still answers.
    assert served.ask(escalation("classify", "classify"))["status"] == "ok"


@pytest.mark.e2e
def test_reply_topic_outside_the_reply_pattern_is_not_used(served: Served) -> None:
    # A Response Topic that is not `{prefix}/{device}/cloud/replies`: the agent is no relay.
    req = escalation("classify", "classify")
    served.client.subscribe(f"{served.prefix}/elsewhere/#")
    served.client.publish(
        f"{served.prefix}/cloud/requests/alarm",
        req,
        response_topic=f"{served.prefix}/elsewhere/x",
        correlation=b"x",
    )
    _wait_record(served.agent, "cloud.unanswerable", req["escalation_id"])
    assert served.env.llm.calls_for(req["input"]) == []  # no tokens spent on it
    assert all(not m.topic.startswith(f"{served.prefix}/elsewhere") for m in served.client.drain())


def _wait_record(agent: CloudProcess, event: str, eid: str) -> dict[str, Any]:
    until = time.monotonic() + 30
    while time.monotonic() < until:
        for r in agent.records(event):
            if r.get("escalation_id") == eid:
                return r
        time.sleep(0.05)
    raise TimeoutError(f"no {event} for {eid}:\n{agent.log_text()[-2000:]}")


# -- several workers, status, shutdown --------------------------------------------------


@pytest.fixture
def env(broker: Broker, llm: ScriptedLLM, tmp_path: Path) -> Iterator[Env]:
    e = _make_env(broker, llm, tmp_path)
    yield e
    for p in e.started:
        p.stop()


@pytest.fixture
def client(broker: Broker) -> Iterator[TestClient]:
    c = TestClient(broker.port)
    yield c
    c.close()


@pytest.mark.e2e
def test_two_workers_split_requests_none_answered_twice(env: Env, client: TestClient) -> None:
    prefix = f"ea{uuid.uuid4().hex[:8]}"
    client.subscribe(f"{prefix}/+/cloud/replies")
    client.subscribe(f"{prefix}/cloud/status")
    a, b = env.agent(prefix, "wa"), env.agent(prefix, "wb")
    wait_online(client, f"{prefix}/cloud/status", {"wa", "wb"})
    reqs = [escalation("classify", "split", device=f"d{i % 3}") for i in range(20)]
    for r in reqs:
        send(client, prefix, r)
    got = replies(client, 20)
    got += [m for m in client.drain(quiet=1.0) if m.topic.endswith("/cloud/replies")]
    ids = [json.loads(m.payload)["escalation_id"] for m in got]
    assert sorted(ids) == sorted(r["escalation_id"] for r in reqs)  # each exactly once
    assert all(json.loads(m.payload)["status"] == "ok" for m in got)
    by_a = {r["escalation_id"] for r in a.records("cloud.reply")}
    by_b = {r["escalation_id"] for r in b.records("cloud.reply")}
    assert by_a and by_b
    assert not by_a & by_b
    assert by_a | by_b == set(ids)


def _status(client: TestClient, topic: str, state: str) -> dict[str, Any]:
    """The next status in ``state`` that ``client`` receives on ``topic``."""
    until = time.monotonic() + 30
    while time.monotonic() < until:
        for m in client.collect(1, timeout=0.5, where=lambda m: m.topic == topic):
            data: dict[str, Any] = json.loads(m.payload)
            if data["state"] == state:
                return data
    raise AssertionError(f"no {state!r} status on {topic}")


@pytest.mark.e2e
def test_retained_status_online_stopped_offline(
    env: Env, client_factory: Callable[..., TestClient]
) -> None:
    prefix = f"ea{uuid.uuid4().hex[:8]}"
    topic = f"{prefix}/cloud/status"
    first = env.agent(prefix, "ws")
    first.wait_for_log("cloud.connected")
    # A late subscriber gets the retained `online`.
    watcher = client_factory(env.broker.port)
    watcher.subscribe(topic)
    online = _status(watcher, topic, "online")
    assert online["model"] == "scripted"
    assert online["worker"] == "ws"
    assert online["version"] and online["since"]
    # SIGTERM: `stopped`, exit 0.
    first.signal(signal.SIGTERM)
    assert first.wait() == 0
    assert _status(watcher, topic, "stopped")["worker"] == "ws"
    later = client_factory(env.broker.port)
    later.subscribe(topic)
    assert _status(later, topic, "stopped")  # retained
    # SIGKILL: the broker publishes the last will, `offline`.
    second = env.agent(prefix, "ws")
    assert _status(watcher, topic, "online")
    assert second.proc is not None
    second.proc.kill()
    second.proc.wait(10)
    assert _status(watcher, topic, "offline")["worker"] == "ws"
    last = client_factory(env.broker.port)
    last.subscribe(topic)
    assert _status(last, topic, "offline")  # retained


@pytest.mark.e2e
def test_sigterm_drains_requests_in_flight_before_stopped(env: Env, client: TestClient) -> None:
    prefix = f"ea{uuid.uuid4().hex[:8]}"
    client.subscribe(f"{prefix}/+/cloud/replies")
    client.subscribe(f"{prefix}/cloud/status")
    agent = env.agent(prefix, "wd")
    wait_online(client, f"{prefix}/cloud/status", {"wd"})
    env.llm.release.clear()
    try:
        req = escalation("classify", "drain")
        send(client, prefix, req)
        env.llm.wait_calls(req["input"], 1)  # the model is working on it
        agent.signal(signal.SIGTERM)
        agent.wait_for_log("cloud.stop_requested")
    finally:
        env.llm.release.set()
    got = client.collect(
        2,
        timeout=30,
        where=lambda m: m.topic.endswith("/cloud/replies") or b'"stopped"' in m.payload,
    )
    assert [m.topic for m in got] == [f"{prefix}/dev1/cloud/replies", f"{prefix}/cloud/status"]
    assert json.loads(got[0].payload)["status"] == "ok"
    assert agent.wait() == 0


@pytest.mark.e2e
def test_check_config(tmp_path: Path) -> None:
    good = write_cloud_config(
        tmp_path / "good.toml",
        port=1883,
        base_url="http://127.0.0.1:1/v1",
        prefix="edgeagent",
        worker="w",
        key_file=tmp_path / "missing-key",
    )
    run = [sys.executable, "-m", "edgeagent", "cloud", "--check", "--config"]
    out = subprocess.run([*run, str(good)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 78
    assert "llm.api_key_file" in out.stderr
    (tmp_path / "missing-key").write_text(API_KEY)
    out = subprocess.run([*run, str(good)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert API_KEY not in out.stdout + out.stderr
    example = REPO / "examples" / "cloud.toml"
    out = subprocess.run([*run, str(example)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[llm]\nbase_url = "ftp://x"\nfoo = 1\n')
    out = subprocess.run([*run, str(bad)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 78
    assert "llm.base_url" in out.stderr and "llm.foo: unknown key" in out.stderr
    bad.write_text('[mqtt]\nprotocol = "3.1.1"\n')
    out = subprocess.run([*run, str(bad)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 78
    assert "mqtt.protocol" in out.stderr


# -- unit: messages, prompts, checks ----------------------------------------------------


def _req(**kw: Any) -> CloudRequest:
    return parse_request(json.dumps(escalation(**kw)).encode(), 1 << 20)


def test_parse_request_errors_carry_what_could_be_read() -> None:
    with pytest.raises(BadRequest) as bad:
        parse_request(
            json.dumps({"v": 1, "escalation_id": "e1", "device": "d", "kind": "x"}).encode(), 4096
        )
    assert (bad.value.code, bad.value.escalation_id, bad.value.device) == (
        "invalid_request",
        "e1",
        "d",
    )
    with pytest.raises(BadRequest) as bad:
        parse_request(b"x" * 5000, 4096)
    assert "limit" in str(bad.value)
    with pytest.raises(BadRequest):
        parse_request(json.dumps(escalation("extract", "x", schema={"type": 3})).encode(), 4096)


def test_prompts_and_response_formats() -> None:
    req = _req(kind="classify", scenario="s")
    system, user = build_messages(req)
    assert all(label in system["content"] for label in LABELS)
    assert "Be precise." in system["content"]
    assert user == {"role": "user", "content": req.input}
    assert response_format(req, "json_object", True) == {"type": "json_object"}
    assert response_format(req, "prompt", True) is None
    fmt = response_format(req, "json_object_schema", True)
    assert fmt is not None and fmt["schema"]["required"] == ["label"]
    ext = _req(kind="extract", scenario="s", input={"raw": "value=3"})
    assert json.dumps(SCHEMA) in build_messages(ext)[0]["content"]
    assert build_messages(ext)[1]["content"] == '{"raw": "value=3"}'


def test_check_output() -> None:
    cls = _req(kind="classify", scenario="s")
    assert check_output(cls, 'Sure! {"label": "intrusion"}') == {"label": "intrusion"}
    assert check_output(cls, '{"label": " FIRE "}') == {"label": "fire"}
    for bad in ('{"label": "banana"}', "[]", "nope", '{"label": 3}'):
        with pytest.raises(InvalidOutput):
            check_output(cls, bad)
    ext = _req(kind="extract", scenario="s")
    assert check_output(ext, '{"device_id": "a", "value": 1}') == {"device_id": "a", "value": 1}
    with pytest.raises(InvalidOutput, match="value"):
        check_output(ext, '{"device_id": "a", "value": "high"}')
    gen = _req(kind="generate", scenario="s")
    with pytest.raises(InvalidOutput):
        check_output(gen, "   ")


def test_reply_topics() -> None:
    assert reply_topic_for("ea", "ea/dev1/cloud/replies", "x") == "ea/dev1/cloud/replies"
    assert reply_topic_for("ea", None, "dev1") == "ea/dev1/cloud/replies"
    for bad in ("ea/dev1/results/x", "other/dev1/cloud/replies", "ea/+/cloud/replies", "x"):
        assert reply_topic_for("ea", bad, "dev1") is None
    assert reply_topic_for("ea", None, "a/b") is None


def test_retry_after_parsing() -> None:
    assert retry_after_s("3") == 3.0
    assert retry_after_s("0.5") == 0.5
    assert retry_after_s(None) is None and retry_after_s("soon") is None
    assert retry_after_s("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert retry_after_s("-4") == 0.0


# -- unit: the LLM client with httpx MockTransport --------------------------------------


def _client(handler: Callable[[httpx.Request], httpx.Response], **cfg: Any) -> LlmClient:
    config = LlmConfig(base_url="http://llm.test/v1", backoff_min_s=0.01, backoff_max_s=0.02, **cfg)
    return LlmClient(config, "k", transport=httpx.MockTransport(handler))


def _chat(client: LlmClient, budget_s: float = 10.0) -> Any:
    async def go() -> Any:
        try:
            return await client.chat(
                [{"role": "user", "content": "hi"}],
                response_format=None,
                deadline=time.monotonic() + budget_s,
            )
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_llm_client_retries_connection_errors_then_succeeds() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) < 3:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json=_completion("hello"))

    done = _chat(_client(handler))
    assert (done.content, done.attempts, done.model) == ("hello", 3, "scripted-1")
    assert seen[0].url == "http://llm.test/v1/chat/completions"
    assert seen[0].headers["authorization"] == "Bearer k"


def test_llm_client_gives_up_after_max_attempts() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(503)

    with pytest.raises(UpstreamUnavailable, match="503"):
        _chat(_client(handler, max_attempts=3))
    assert calls == 3


def test_llm_client_does_not_wait_past_the_deadline() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(429, headers={"Retry-After": "3600"})

    with pytest.raises(UpstreamUnavailable, match="past the deadline"):
        _chat(_client(handler), budget_s=5)
    assert calls == 1


def test_llm_client_final_statuses_and_bad_bodies() -> None:
    with pytest.raises(UpstreamRejected, match="400"):
        _chat(_client(lambda r: httpx.Response(400, json={"error": "bad"})))
    with pytest.raises(UpstreamRejected, match="without a completion"):
        _chat(_client(lambda r: httpx.Response(200, text="<html>")))
    with pytest.raises(DeadlineExceeded):
        _chat(_client(lambda r: httpx.Response(200)), budget_s=0)


# -- optional: a real OpenAI-compatible server (llama-cpp-python) -----------------------


def _llama_python() -> str | None:
    """This interpreter (or $EDGEAGENT_LLAMA_PYTHON) if it can run llama_cpp.server."""
    for exe in (os.environ.get("EDGEAGENT_LLAMA_PYTHON"), sys.executable):
        if not exe or not Path(exe).exists():
            continue
        probe = subprocess.run(
            [exe, "-c", "import llama_cpp.server.app"], capture_output=True, timeout=120
        )
        if probe.returncode == 0:
            return exe
    return None


def _gguf() -> str | None:
    """$EDGEAGENT_TEST_GGUF, else SmolLM2 pulled (verified) like the llamacpp backend tests."""
    explicit = os.environ.get("EDGEAGENT_TEST_GGUF")
    if explicit and Path(explicit).is_file():
        return explicit
    from edgeagent.modeltools.pull import CACHE_DIR, PullError, pull

    try:
        return str(pull("smollm2", Path(os.environ.get("EDGEAGENT_MODEL_DIR") or CACHE_DIR)))
    except PullError:
        return None


@pytest.mark.e2e
@pytest.mark.slow
def test_against_llama_cpp_server(
    broker: Broker, tmp_path: Path, client_factory: Callable[..., TestClient]
) -> None:
    exe = _llama_python()
    if exe is None:
        pytest.skip("llama_cpp.server is not importable (pip install 'llama-cpp-python[server]')")
    model = _gguf()
    if model is None:
        pytest.skip("no GGUF model (set EDGEAGENT_TEST_GGUF)")
    port = free_port()
    log = (tmp_path / "llama-server.log").open("wb")
    args = ["--model", model, "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048"]
    server = subprocess.Popen(
        [exe, "-m", "llama_cpp.server", *args, "--n_threads", "2"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        until = time.monotonic() + 120
        while time.monotonic() < until:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            assert server.poll() is None, (tmp_path / "llama-server.log").read_text()[-2000:]
            time.sleep(0.5)
        else:
            pytest.fail("llama_cpp.server did not come up")
        prefix = f"ea{uuid.uuid4().hex[:8]}"
        key = tmp_path / "key"
        key.write_text("unused\n")
        cfg = write_cloud_config(
            tmp_path / "cloud.toml",
            port=broker.port,
            base_url=f"http://127.0.0.1:{port}/v1",
            prefix=prefix,
            worker="llama",
            key_file=key,
            extra_llm='structured_output = "json_object_schema"\nmax_tokens = 64',
        )
        agent = CloudProcess(cfg, tmp_path / "cloud.log", "llama").start()
        try:
            client = client_factory(broker.port)
            client.subscribe(f"{prefix}/+/cloud/replies")
            client.subscribe(f"{prefix}/cloud/status")
            wait_online(client, f"{prefix}/cloud/status", {"llama"})
            req = escalation("classify", "classify", deadline_ms=120000)
            req["input"] = "Smoke detected in the server room, flames visible."
            send(client, prefix, req)
            got = replies(client, 1, timeout=150)
            assert got, agent.log_text()[-3000:]
            reply = json.loads(got[0].payload)
            # A 135M model may or may not pick the right label; grammar keeps it in the set.
            assert reply["status"] in ("ok", "error"), reply
            if reply["status"] == "ok":
                assert reply["output"]["label"] in LABELS
            else:
                assert reply["error"]["code"] == "invalid_output"
        finally:
            agent.stop()
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        log.close()


def test_each_worker_has_its_own_status_topic_by_default() -> None:
    """PROTOCOL.md: `{prefix}/cloud/status/{worker}`, so one worker's `stopped` never hides
    the others (the shared topic is an opt-out for older daemons)."""
    from edgeagent.cloud.config import AgentConfig

    assert AgentConfig(worker_id="w9").status_per_worker is True
