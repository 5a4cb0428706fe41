"""`edgeagent replay FILE.jsonl`: run recorded jobs through a running daemon and report.

Each line is a job object (``{"input": ..., "id"?: ...}``) or a bare input string; an
optional gold answer in ``"label"`` (classify) or ``"gold"`` (any output object) lets the
report say how often the daemon was right.  The report tells an operator what share is
answered locally, why jobs were escalated, how often the local model agrees with the gold
answer and with the cloud, and latency quantiles, so thresholds can be tuned on one's own
traffic.

Counting rules: an answer served from the result cache (``source = "cache"``) is a local
answer (the device answered without the cloud).  For a gold label that means out of scope
(``oos``, ``out_of_scope`` or ``--oos-label``), the right answer is to not answer with an
intent: status ``unrecognized`` with error ``out_of_scope`` / ``low_confidence``, or an
output whose label is itself an out-of-scope label.  A job the device *declined* (a task
with ``out_of_scope = "decline"``: ``unrecognized`` / ``out_of_scope`` from the local model,
no escalation) is counted in ``declined_locally``, and ``accuracy_declined`` says how many
of those had an out-of-scope gold label.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from edgeagent.config import Settings
from edgeagent.submit import SubmitError, exchange


def load(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    gold: dict[str, Any] = {}
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise SystemExit(f"edgeagent replay: {path}:{n}: not JSON: {exc}") from exc
            if not isinstance(item, dict):
                item = {"input": item}
            job_id = str(item.get("id") or f"replay-{uuid.uuid4().hex}")
            if "label" in item:
                gold[job_id] = {"label": item["label"]}
            elif "gold" in item:
                gold[job_id] = item["gold"]
            job = {"v": 1, "id": job_id, "input": item.get("input", item.get("text"))}
            for key in ("params", "deadline_ms", "escalate"):
                if key in item:
                    job[key] = item[key]
            jobs.append(job)
    return jobs, gold


#: Gold labels that mean "out of scope" (plus the one given with ``--oos-label``).
OOS_LABELS = frozenset({"oos", "out_of_scope"})
#: ``unrecognized`` error codes that mean the device declined to answer with an intent.
DECLINED = frozenset({"out_of_scope", "low_confidence"})
#: How a declined job's ``error.message`` starts (PROTOCOL.md, "Declined out-of-scope jobs"):
#: without a cloud, a job merely flagged out of scope is ``unrecognized``/``out_of_scope`` too.
DECLINED_PREFIX = "declined:"
LOCAL_SOURCES = ("local", "cache")


def is_right(answer: dict[str, Any], gold: Any, oos_labels: frozenset[str] = OOS_LABELS) -> bool:
    """Whether a result matches the gold answer; for an out-of-scope gold label, declining
    (``unrecognized`` for ``out_of_scope``/``low_confidence``) or answering an out-of-scope
    label is right."""
    output = answer.get("output")
    if output == gold:
        return True
    gold_label = gold.get("label") if isinstance(gold, dict) else None
    if gold_label not in oos_labels:
        return False
    if isinstance(output, dict) and output.get("label") in oos_labels:
        return True
    code = (answer.get("error") or {}).get("code")
    return answer.get("status") == "unrecognized" and code in DECLINED


def is_declined(answer: dict[str, Any]) -> bool:
    """The device declined the job as out of scope on its own: ``unrecognized`` /
    ``out_of_scope`` from the local model with a ``declined:`` message, never escalated."""
    error = answer.get("error") or {}
    return (
        answer.get("status") == "unrecognized"
        and error.get("code") == "out_of_scope"
        and str(error.get("message") or "").startswith(DECLINED_PREFIX)
        and answer.get("source") in LOCAL_SOURCES
        and not answer.get("escalation")
    )


def report(
    jobs: list[dict[str, Any]],
    gold: dict[str, Any],
    first: dict[str, dict[str, Any]],
    final: dict[str, dict[str, Any]],
    latency_ms: dict[str, float],
    oos_labels: frozenset[str] = OOS_LABELS,
) -> dict[str, Any]:
    n = len(jobs)
    answered = len(first)
    sources = collections.Counter(r.get("source") or r.get("status") for r in final.values())
    statuses = collections.Counter(r.get("status") for r in final.values())
    reasons = collections.Counter(
        (r.get("escalation") or {}).get("reason") for r in final.values() if r.get("escalation")
    )
    local_ok = [
        k for k, r in first.items() if r.get("source") in LOCAL_SOURCES and r["status"] == "ok"
    ]
    cached = [k for k in local_ok if first[k].get("source") == "cache"]
    declined = [k for k, r in final.items() if is_declined(r)]
    cloud = [k for k, r in final.items() if r.get("source") == "cloud"]

    def share(k: int, total: int) -> float | None:
        return round(k / total, 4) if total else None

    def agreement(keys: list[str], answers: dict[str, dict[str, Any]]) -> float | None:
        scored = [k for k in keys if k in gold]
        right = sum(1 for k in scored if is_right(answers[k], gold[k], oos_labels))
        return share(right, len(scored))

    gold_oos = [
        k
        for k in final
        if k in gold and isinstance(gold[k], dict) and gold[k].get("label") in oos_labels
    ]

    with_gold = [k for k in final if k in gold]
    lat = sorted(latency_ms.values())

    def q(p: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))], 2) if lat else None

    return {
        "jobs": n,
        "answered": answered,
        "missing": n - answered,
        "status": dict(statuses),
        "source": dict(sources),
        "answered_locally": share(len(local_ok), n),
        "answered_from_cache": share(len(cached), n),
        "declined_locally": share(len(declined), n),
        "escalation_rate": share(sum(reasons.values()), n),
        "escalation_reasons": {str(k): v for k, v in reasons.items()},
        "accuracy_overall": agreement(with_gold, final),
        "accuracy_local": agreement(local_ok, first),
        "accuracy_cloud": agreement(cloud, final),
        "accuracy_declined": agreement(declined, final),
        "out_of_scope_jobs": len(gold_oos),
        "accuracy_out_of_scope": agreement(gold_oos, final),
        "local_vs_cloud_agreement": _local_vs_cloud(first, final),
        "latency_ms": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": q(1.0)},
    }


def _local_vs_cloud(
    first: dict[str, dict[str, Any]], final: dict[str, dict[str, Any]]
) -> float | None:
    pairs = [
        (first[k].get("output"), final[k].get("output"))
        for k in final
        if final[k].get("supersedes") and k in first and first[k].get("output") is not None
    ]
    if not pairs:
        return None
    return round(sum(1 for a, b in pairs if a == b) / len(pairs), 4)


def main(settings: Settings, args: argparse.Namespace) -> int:
    jobs, gold = load(Path(args.file))
    sent_at = time.monotonic()
    first: dict[str, dict[str, Any]] = {}
    final: dict[str, dict[str, Any]] = {}
    latency_ms: dict[str, float] = {}

    def on_result(result: dict[str, Any]) -> None:
        rid = str(result.get("id"))
        if rid not in first:
            first[rid] = result
            latency_ms[rid] = (time.monotonic() - sent_at) * 1000.0
        final[rid] = result
        if args.results:
            print(json.dumps(result, ensure_ascii=False), file=sys.stderr)

    try:
        asyncio.run(
            exchange(
                settings,
                args.task,
                jobs,
                device=args.device,
                timeout=args.timeout,
                on_result=on_result,
                await_superseding=True,
            )
        )
    except SubmitError as exc:
        print(f"edgeagent replay: {exc}", file=sys.stderr)
        return 1
    oos_labels = OOS_LABELS | ({args.oos_label} if getattr(args, "oos_label", None) else set())
    print(json.dumps(report(jobs, gold, first, final, latency_ms, oos_labels), indent=2))
    return 0 if len(first) == len(jobs) else 3
