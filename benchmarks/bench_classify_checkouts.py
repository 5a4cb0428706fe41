"""A classifier bundle through this checkout's ``OnnxBackend`` vs another checkout's (e.g.
the commit before a change to the head), in the same run: single-job latency, the
process's memory, and whether the answers are the same.

    git archive <commit> | tar -x -C /tmp/base
    D=../shared/datasets/clinc150
    .venv/bin/edgeagent train clinc --examples $D/train.jsonl --threads 1 \\
        --oos-score knn+oos_class --out /tmp/bundles
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_classify_checkouts.py \\
        --other /tmp/base --bundle /tmp/bundles/clinc/latest --data $D/validation.jsonl \\
        [--rounds 3] [--n 200] [--batch 16]

Each round runs, in a fresh process per checkout (alternating, so a change in machine
load hits both), the bundle as a task with one onnxruntime thread: load and warm-up
(VmRSS then), ``--n`` texts of ``--data`` one job at a time (wall and process CPU time per
job), and in the first round every text of ``--data`` in batches of ``--batch`` (the
daemon's micro-batches), whose answers are compared between the checkouts (labels,
reasons, largest confidence and out-of-scope margin differences) and scored with a
perfect cloud: local-only accuracy and the escalation needed for 98 % / 99 % with
``out_of_scope = "decline"``.  VmRSS and VmHWM (peak) at the end.  Prints medians per
checkout and the ratios this/other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgeagent.backends.base import OOS_MARGIN, Prediction  # noqa: E402
from edgeagent.heads.curves import curve_from_predictions, escalation_for, is_correct  # noqa: E402

CHILD = r"""
import json, sys, time
from pathlib import Path
import edgeagent.backends  # noqa: F401
from edgeagent.backends.onnx import OnnxBackend
from edgeagent.config import TaskConfig
bundle, data = sys.argv[1], Path(sys.argv[2])
n, batch, answers = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
def mem():
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out
task = TaskConfig.model_validate(
    {"kind": "classify", "backend": {"type": "onnx", "bundle": bundle, "intra_op_threads": 1}}
)
backend = OnnxBackend("bench", task)
backend.load()
loaded = mem()
texts = [json.loads(x)["text"] for x in data.read_text("utf-8").splitlines() if x.strip()]
times = []
for text in texts[:: max(1, len(texts) // n)][:n]:
    w, c = time.perf_counter(), time.process_time()
    backend.infer_batch([text])
    times.append([time.perf_counter() - w, time.process_time() - c])
rows = []
if answers:
    for i in range(0, len(texts), batch):
        for p in backend.infer_batch(texts[i : i + batch]):
            rows.append([p.output, p.confidence, p.reason, p.details])
end = mem()
backend.close()
print(json.dumps({"loaded": loaded, "end": end, "times": times, "answers": rows}))
"""


def _run(checkout: Path, args: argparse.Namespace, answers: bool) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    argv = [str(args.bundle.resolve()), str(args.data), str(args.n), str(args.batch)]
    cmd = [sys.executable, "-c", CHILD, *argv, "1" if answers else "0"]
    done = subprocess.run(cmd, env=env, cwd=checkout, capture_output=True, text=True, check=True)
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def _quality(rows: list[list[Any]], truths: list[str], oos_label: str) -> dict[str, float]:
    preds = [Prediction(out, conf, reason, details) for out, conf, reason, details in rows]
    curve = curve_from_predictions(preds, truths, decline_label=oos_label)
    return {
        "local_accuracy": sum(is_correct(p, t) for p, t in zip(preds, truths, strict=True))
        / len(preds),
        "escalation_for_98": escalation_for(curve, 0.98).escalation,
        "escalation_for_99": escalation_for(curve, 0.99).escalation,
    }


def _differences(a: list[list[Any]], b: list[list[Any]]) -> dict[str, float]:
    labels = sum(x[0] != y[0] for x, y in zip(a, b, strict=True))
    reasons = sum(x[2] != y[2] for x, y in zip(a, b, strict=True))
    conf = max(abs(x[1] - y[1]) for x, y in zip(a, b, strict=True))
    margins = [
        abs(x[3][OOS_MARGIN] - y[3][OOS_MARGIN])
        for x, y in zip(a, b, strict=True)
        if OOS_MARGIN in x[3] and OOS_MARGIN in y[3]
    ]
    return {
        "labels_differing": labels,
        "reasons_differing": reasons,
        "max_confidence_difference": conf,
        "max_oos_margin_difference": max(margins, default=0.0),
        "margins_compared": len(margins),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--other", type=Path, required=True, help="the checkout to compare with")
    ap.add_argument("--bundle", type=Path, required=True, help="classifier bundle")
    ap.add_argument("--data", type=Path, required=True, help='JSON lines {"text", "label"}')
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=200, help="single jobs timed per round")
    ap.add_argument("--batch", type=int, default=16, help="batch size of the answer pass")
    ap.add_argument("--oos-label", default="oos")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {"other": [], "this": []}
    for r in range(args.rounds):
        for name, checkout in (("other", args.other.resolve()), ("this", REPO)):
            runs[name].append(_run(checkout, args, answers=r == 0))
            print(f"round {r + 1}: {name} done", file=sys.stderr, flush=True)
    lines = [json.loads(x) for x in args.data.read_text("utf-8").splitlines() if x.strip()]
    truths = [str(x["label"]) for x in lines]
    report: dict[str, Any] = {}
    for name, rs in runs.items():
        times = [t for r in rs for t in r["times"]]
        report[name] = {
            "wall_ms": statistics.median(t[0] for t in times) * 1000,
            "cpu_ms": statistics.median(t[1] for t in times) * 1000,
            "rss_loaded_mib": [r["loaded"]["VmRSS"] for r in rs],
            "rss_end_mib": [r["end"]["VmRSS"] for r in rs],
            "peak_mib": [r["end"]["VmHWM"] for r in rs],
            **_quality(rs[0]["answers"], truths, args.oos_label),
        }
        q = report[name]
        print(
            f"{name:>6}: single job median wall {q['wall_ms']:6.2f} ms, CPU {q['cpu_ms']:6.2f} ms"
            f" ({len(times)} jobs); VmRSS loaded {_mib(q['rss_loaded_mib'])}, end "
            f"{_mib(q['rss_end_mib'])}, peak {_mib(q['peak_mib'])} MiB; local accuracy "
            f"{q['local_accuracy']:.2%}, escalation for 98 % {q['escalation_for_98']:.2%}, "
            f"for 99 % {q['escalation_for_99']:.2%}"
        )
    this, other = report["this"], report["other"]
    report["ratio"] = {k: this[k] / other[k] for k in ("wall_ms", "cpu_ms")}
    report["answers"] = _differences(runs["this"][0]["answers"], runs["other"][0]["answers"])
    print(
        f" ratio this/other: wall {report['ratio']['wall_ms']:.2f}x, CPU "
        f"{report['ratio']['cpu_ms']:.2f}x; VmRSS at the end "
        f"{statistics.median(this['rss_end_mib']) - statistics.median(other['rss_end_mib']):+.1f}"
        f" MiB (medians)"
    )
    print(f" answers ({len(truths)} texts, batches of {args.batch}): {report['answers']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def _mib(values: list[float]) -> str:
    return "/".join(f"{v:.1f}" for v in values)


if __name__ == "__main__":
    raise SystemExit(main())
