"""Prometheus metrics of one daemon (own registry, so tests can run several)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


CHILDREN_CACHED = 4096
"""Labelled children :meth:`Metrics.child` remembers, at most."""


class Metrics:
    def __init__(self) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._levels: dict[int, float] = {}
        r = self.registry = CollectorRegistry()
        self.jobs = Counter(
            "edgeagent_jobs", "Jobs finished", ["task", "status", "source"], registry=r
        )
        self.rejected = Counter(
            "edgeagent_rejected", "Jobs rejected as bad input", ["code"], registry=r
        )
        self.latency = Histogram(
            "edgeagent_job_latency_seconds",
            "Receipt to result, seconds",
            ["task", "source"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "edgeagent_inference_seconds",
            "Backend batch inference time, seconds",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "edgeagent_batch_size",
            "Jobs per inference batch",
            ["task"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.cache = Counter("edgeagent_cache", "Cache lookups", ["task", "result"], registry=r)
        self.queue_depth = Gauge("edgeagent_queue_depth", "Jobs received, not answered", registry=r)
        self.outbox_depth = Gauge(
            "edgeagent_outbox_depth", "Messages waiting for the broker's PUBACK", registry=r
        )
        self.connected = Gauge("edgeagent_mqtt_connected", "1 while connected", registry=r)
        self.reconnects = Counter("edgeagent_mqtt_connects", "Successful connects", registry=r)
        self.unrecognized = Counter(
            "edgeagent_unrecognized", "Jobs answered unrecognized", ["task", "reason"], registry=r
        )
        self.timeouts = Counter(
            "edgeagent_inference_timeouts", "Inference calls past timeout_s", ["task"], registry=r
        )
        self.escalations = Counter(
            "edgeagent_escalations",
            "Escalations by reason, and by outcome (over_budget, rejected_offline, expired)",
            ["task", "reason"],
            registry=r,
        )
        self.replies = Counter(
            "edgeagent_cloud_replies", "Cloud replies by verdict", ["verdict"], registry=r
        )
        self.cloud_reachable = Gauge(
            "edgeagent_cloud_reachable", "1 while the cloud agent's status is online", registry=r
        )
        self.escalations_in_flight = Gauge(
            "edgeagent_escalations_in_flight", "Escalations awaiting a reply", registry=r
        )
        self.redactions = Counter(
            "edgeagent_redactions",
            "Items redacted before leaving the device",
            ["task", "kind"],
            registry=r,
        )
        self.audits = Counter(
            "edgeagent_audits",
            "Audited local answers by agreement with the cloud",
            ["task", "verdict"],
            registry=r,
        )
        self.dead_letters = Counter(
            "edgeagent_dead_letters",
            "Publishes the broker refused (PUBACK reason code >= 0x80), kept as dead letters",
            ["reason"],
            registry=r,
        )
        self.subscriptions_refused = Counter(
            "edgeagent_subscriptions_refused",
            "Subscriptions the broker refused after a reconnect (SUBACK >= 0x80)",
            ["topic"],
            registry=r,
        )
        self.quarantined = Counter(
            "edgeagent_quarantined",
            "Messages acknowledged without an answer because not even a rejection could be "
            "written (each is logged once, payload truncated)",
            registry=r,
        )
        self.degraded = Gauge(
            "edgeagent_degraded",
            "1 while the state store refuses writes (disk full, I/O error): intake is paused",
            registry=r,
        )
        self.store_errors = Counter(
            "edgeagent_store_errors",
            "Failed state-store writes by reason (disk_full, io_error, read_only)",
            ["reason"],
            registry=r,
        )
        self.learn_rounds = Counter(
            "edgeagent_learn_rounds",
            "Learning rounds by outcome (promoted, rejected, skipped, failed)",
            ["task", "outcome"],
            registry=r,
        )
        self.learn_holdout_accuracy = Gauge(
            "edgeagent_learn_holdout_accuracy",
            "Serving model's local accuracy on the learned holdout (at the last round)",
            ["task"],
            registry=r,
        )
        self.learn_examples = Gauge(
            "edgeagent_learn_examples", "Learned examples stored", ["task"], registry=r
        )
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: prometheus_client takes a lock and builds
        the key at every call, and the daemon counts several per job."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = metric.labels(*labels)
            if len(self._children) < CHILDREN_CACHED:
                self._children[key] = found
        return found

    def level(self, gauge: Any, value: float) -> None:
        """``gauge.set(value)`` if ``value`` changed since the last call for that gauge
        (the pipeline reports its depths after every commit)."""
        key = id(gauge)
        if self._levels.get(key) != value:
            self._levels[key] = value
            gauge.set(value)

    def serve(self, listen: str, readiness: Callable[[], list[str]] | None = None) -> None:
        """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` (own thread).

        ``/healthz``: 200 while the process serves HTTP at all.  ``/readyz``: 200 when
        ``readiness()`` returns no reasons, else 503 with one reason per line.  Any other
        path: 404.  ``readiness`` runs on the HTTP thread: it must only read state.
        """
        host, _, port = listen.rpartition(":")
        server = ThreadingHTTPServer((host.strip("[]"), int(port)), _handler(self, readiness))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int | None:
        """The bound port (useful with port 0), None when not serving."""
        return int(self._server.server_address[1]) if self._server is not None else None

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _handler(
    metrics: Metrics, readiness: Callable[[], list[str]] | None
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "edgeagent"

        def log_message(self, format: str, *args: Any) -> None:
            return  # scrapes every few seconds are not events

        def _reply(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            if path == "/metrics":
                self._reply(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._reply(200, b"ok\n")
            elif path == "/readyz":
                try:
                    reasons = readiness() if readiness is not None else []
                except Exception as exc:  # a bug in a check must not look like "ready"
                    reasons = [f"readiness check failed: {exc!r}"]
                if reasons:
                    self._reply(503, ("\n".join(reasons) + "\n").encode())
                else:
                    self._reply(200, b"ready\n")
            else:
                self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

        do_HEAD = do_GET

    return Handler
