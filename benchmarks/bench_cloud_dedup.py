"""LLM calls per escalation when daemons re-send escalations (issue 9, item 8).

Own mosquitto, a counting OpenAI-compatible endpoint (answers `{"label": "fire"}`
after ``--llm-ms``), and two `edgeagent cloud` agents on separate prefixes: the
baseline with the recent-reply memory off (``agent.reply_cache_ttl_s = 0``: only
copies that arrive while the first is being answered are folded, as before), and the
default.  Each of ``--n`` escalations is sent once, then re-sent ``--resends`` times at
random moments within ``--spread`` x the model's latency, the way a daemon's re-send
timer and a cloud status flap do.  Prints LLM calls per escalation for both and the
ratio.

    .venv/bin/python benchmarks/bench_cloud_dedup.py [--n 500] [--resends 1] [--llm-ms 50]

``BENCH_KEEP=DIR`` keeps the broker's and the agents' logs and configs in DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.broker import Broker  # noqa: E402
from tests.harness import TestClient  # noqa: E402


class CountingLLM:
    """Counts chat completions per user message; answers after ``delay_s``."""

    def __init__(self, delay_s: float) -> None:
        self.calls: Counter[str] = Counter()
        self.lock = threading.Lock()
        llm = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = next(m["content"] for m in body["messages"] if m["role"] == "user")
                with llm.lock:
                    llm.calls[key] += 1
                time.sleep(delay_s)
                raw = json.dumps(
                    {
                        "model": "counting",
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": '{"label": "fire"}'},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 3},
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"


def start_agent(
    tmp: Path, port: int, llm: CountingLLM, prefix: str, ttl_s: float
) -> subprocess.Popen[bytes]:
    cfg = tmp / f"{prefix}.toml"
    cfg.write_text(
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\nclient_id = "bench-{prefix}"\n'
        f'[llm]\nbase_url = "{llm.url}"\nmodel = "counting"\napi_key_env = ""\n'
        f'[agent]\nprefix = "{prefix}"\nworker_id = "w-{prefix}"\nmax_concurrency = 4\n'
        f"reply_cache_ttl_s = {ttl_s}\n"
        '[log]\nlevel = "warning"\nformat = "json"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEAGENT_")}
    log = (tmp / f"{prefix}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "edgeagent", "cloud", "--config", str(cfg)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO,
    )


def run(
    broker: Broker, llm: CountingLLM, prefix: str, args: argparse.Namespace
) -> dict[str, float]:
    client = TestClient(broker.port)
    client.subscribe(f"{prefix}/+/cloud/replies")
    client.subscribe(f"{prefix}/cloud/status")
    until = time.monotonic() + 30
    while time.monotonic() < until:  # the agent's `online` follows its SUBACK
        got = client.collect(1, timeout=0.5, where=lambda m: m.topic.endswith("/status"))
        if got and json.loads(got[0].payload)["state"] == "online":
            break
    rng = random.Random(7)
    sends: list[tuple[float, dict[str, Any]]] = []
    t0 = time.monotonic()
    for i in range(args.n):
        req = {
            "v": 1,
            "escalation_id": uuid.uuid4().hex,
            "device": f"d{i % 10}",
            "task": "alarm",
            "kind": "classify",
            "input": f"{prefix}|{i}",
            "labels": ["fire", "intrusion"],
            "deadline_ms": 60000,
        }
        start = i * args.gap_ms / 1000
        sends.append((start, req))
        for _ in range(args.resends):
            sends.append((start + rng.uniform(0, args.spread * args.llm_ms / 1000), req))
    sends.sort(key=lambda s: s[0])
    for at, req in sends:
        delay = t0 + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        client.publish(
            f"{prefix}/cloud/requests/alarm",
            req,
            response_topic=f"{prefix}/{req['device']}/cloud/replies",
            correlation=req["escalation_id"].encode(),
        )
    answered: set[str] = set()
    until = time.monotonic() + 120
    while len(answered) < args.n and time.monotonic() < until:
        for m in client.collect(1, timeout=1.0):
            if m.topic.endswith("/cloud/replies"):
                answered.add(json.loads(m.payload)["escalation_id"])
    client.drain(1.0)
    client.close()
    calls = sum(n for k, n in llm.calls.items() if k.startswith(prefix + "|"))
    return {"answered": len(answered), "sent": len(sends), "calls": calls}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=500, help="escalations")
    ap.add_argument("--resends", type=int, default=1, help="re-sends of each escalation")
    ap.add_argument("--llm-ms", type=float, default=50.0, help="model latency (ms)")
    ap.add_argument("--gap-ms", type=float, default=15.0, help="between escalations (ms)")
    ap.add_argument(
        "--spread", type=float, default=4.0, help="re-sends within this x the model latency"
    )
    args = ap.parse_args()
    llm = CountingLLM(args.llm_ms / 1000)
    keep = os.environ.get("BENCH_KEEP")
    with tempfile.TemporaryDirectory() as d, Broker(Path(keep or d) / "broker") as broker:
        tmp = Path(keep or d)
        results = {}
        for prefix, ttl in (("baseline", 0.0), ("dedup", 600.0)):
            agent = start_agent(tmp, broker.port, llm, prefix, ttl)
            try:
                results[prefix] = run(broker, llm, prefix, args)
            finally:
                agent.terminate()
                agent.wait(60)
    print(
        f"{args.n} escalations, each re-sent {args.resends}x within "
        f"{args.spread:g} x {args.llm_ms:g} ms; agent max_concurrency 4"
    )
    for name, r in results.items():
        print(
            f"  {name:9} requests {r['sent']:5.0f}  answered {r['answered']:4.0f}/{args.n}  "
            f"LLM calls {r['calls']:5.0f}  per escalation {r['calls'] / args.n:.3f}"
        )
    base, new = results["baseline"]["calls"], results["dedup"]["calls"]
    print(f"  LLM calls dedup/baseline: {new / base:.3f}")


if __name__ == "__main__":
    main()
