"""Single-job cost of the GGUF example, this checkout vs another one (e.g. the commit
before a change to the backend), in the same run.

    git archive <commit> | tar -x -C /tmp/base && ln -s $PWD/models/gguf /tmp/base/models/gguf
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_extract_latency.py \\
        --other /tmp/base [--rounds 2] [--lines 30]

Each round runs, in a fresh process per checkout (alternating, so a change in machine
load hits both), the `reading` task of that checkout's ``examples/extract.toml`` (one
thread, no calibration) over the first ``--lines`` lines of
``examples/extract-labelled.jsonl``, and records per job the wall time and the CPU time
of the process (``time.process_time``: steadier than wall time on a shared machine).
Prints the medians per checkout and the ratio this/other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
from pathlib import Path
import edgeagent.backends  # noqa: F401
from edgeagent.backends.llamacpp import LlamaCppBackend
from edgeagent.config import load_settings
from edgeagent.inputs import model_input
repo, labelled, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
settings, _ = load_settings(repo / "examples" / "extract.toml")
task = settings.tasks["reading"]
cfg = task.backend.model_copy(update={"calibration": None, "n_threads": 1})
backend = LlamaCppBackend("reading", task.model_copy(update={"backend": cfg}))
backend.load()
backend.warmup()
lines = [json.loads(x)["text"] for x in labelled.read_text("utf-8").splitlines() if x.strip()]
out = []
for text in lines[:n]:
    w, c = time.perf_counter(), time.process_time()
    backend.infer_batch([model_input(text)])
    out.append([time.perf_counter() - w, time.process_time() - c])
backend.close()
print(json.dumps(out))
"""


def _run(checkout: Path, labelled: Path, lines: int) -> list[list[float]]:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-c", CHILD, str(checkout), str(labelled), str(lines)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--other", type=Path, required=True, help="the checkout to compare with")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--lines", type=int, default=30)
    ap.add_argument("--labelled", type=Path, default=REPO / "examples" / "extract-labelled.jsonl")
    args = ap.parse_args()
    times: dict[str, list[list[float]]] = {"this": [], "other": []}
    for r in range(args.rounds):
        for name, checkout in (("other", args.other), ("this", REPO)):
            times[name] += _run(checkout, args.labelled, args.lines)
            print(f"round {r + 1}: {name} done", file=sys.stderr, flush=True)
    med = {
        name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
        for name, ts in times.items()
    }
    for name, (wall, cpu) in med.items():
        print(f"{name:>6}: median wall {wall * 1000:7.1f} ms, median CPU {cpu * 1000:7.1f} ms")
    print(
        f" ratio this/other: wall {med['this'][0] / med['other'][0]:.2f}x, "
        f"CPU {med['this'][1] / med['other'][1]:.2f}x ({len(times['this'])} jobs each)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
