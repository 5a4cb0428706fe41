"""Daemon end-to-end throughput with an ONNX classifier vs raw batched inference, same run.

    .venv/bin/python benchmarks/bench_onnx_daemon.py --bundle models/bundles/intent/latest \\
        [--data ../shared/datasets/clinc150/validation.jsonl] [--n 2000] [--batch 32]

Baseline: the same bundle loaded in this process (``OnnxBackend``: onnxruntime +
tokenizers + numpy) answering the same texts in batches of ``--batch``.  Then the daemon
(``edgeagent run`` subprocess, own mosquitto, cache off, ``max_batch = --batch``) answers
the same texts sent over MQTT with ``--window`` jobs in flight.  Prints jobs/s for both, the
ratio (goal >= 0.8), and the daemon's RSS with the classifier loaded (goal <= 200 MB).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_daemon import Producer, rss_mb  # noqa: E402

from edgeagent.backends.onnx import OnnxBackend  # noqa: E402
from edgeagent.config import TaskConfig  # noqa: E402
from tests.broker import Broker  # noqa: E402

FALLBACK_TEXTS = [
    "turn on the lights in the kitchen",
    "set the heating to 21 degrees",
    "is the garage door open",
    "close the blinds in the office",
    "what is the capital of france",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, help="JSONL with text (default: a few built-in texts)")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    texts = FALLBACK_TEXTS
    if args.data:
        texts = [json.loads(x)["text"] for x in args.data.read_text().splitlines() if x.strip()]
    texts = [texts[i % len(texts)] + ("" if i < len(texts) else f" #{i}") for i in range(args.n)]
    bundle = args.bundle.resolve()
    task_toml = (
        f'[tasks.cls]\nkind = "classify"\ncache = false\nmax_batch = {args.batch}\n'
        f'threshold = 0.0\n[tasks.cls.backend]\ntype = "onnx"\nbundle = "{bundle}"\n'
        f"intra_op_threads = {args.threads}\n"
    )

    from edgeagent.config import tomllib  # tomli on Python 3.10

    task = TaskConfig.model_validate(tomllib.loads(task_toml)["tasks"]["cls"])
    backend = OnnxBackend("cls", task)
    backend.load()
    start = time.perf_counter()
    for i in range(0, len(texts), args.batch):
        backend.infer_batch(texts[i : i + args.batch])
    raw = len(texts) / (time.perf_counter() - start)
    backend.close()

    with (
        tempfile.TemporaryDirectory() as tmp,
        Broker(Path(tmp) / "broker", extra_config=["set_tcp_nodelay true"]) as broker,
    ):
        cfg = Path(tmp) / "d.toml"
        cfg.write_text(
            f'device_id = "onnxbench"\n[mqtt]\nport = {broker.port}\nreceive_maximum = 512\n'
            f'[store]\nstate_dir = "{tmp}/state"\nsynchronous = "normal"\n'
            f'[metrics]\nlisten = ""\n[log]\nformat = "json"\nlevel = "warning"\n'
            f'[topics]\nallowed_reply_prefixes = ["bench/"]\n' + task_toml
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeagent", "run", "--config", str(cfg)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            prod = Producer(broker.port)
            topic = "edgeagent/onnxbench/jobs/cls"

            def make(i: int) -> bytes:
                return json.dumps({"v": 1, "input": texts[i % len(texts)]}).encode()

            time.sleep(3)
            prod.sequential(topic, make, 20)  # wait until loaded and warm
            daemon = prod.pipelined(topic, make, len(texts), args.window)
            rss = rss_mb(proc.pid)
            prod.close()
        finally:
            proc.terminate()
            proc.wait(60)
    print(
        f"\nONNX classifier {bundle.name}: {len(texts)} texts, batch {args.batch}, "
        f"{args.threads} intra-op threads"
    )
    print(f"  raw onnxruntime batched (in process)   {raw:8.0f} jobs/s")
    print(f"  daemon end to end over MQTT            {daemon:8.0f} jobs/s")
    print(f"  ratio daemon / raw                     {daemon / raw:8.2f}   (goal >= 0.8)")
    print(f"  daemon RSS with the classifier         {rss:8.1f} MB (goal <= 200)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
