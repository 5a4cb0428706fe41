"""``edgeagent learn status|rollback|export|import TASK`` (parsing: :mod:`edgeagent.cli`)."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgeagent.bundle import BundleError, read_manifest
from edgeagent.config import Settings
from edgeagent.learning.examples import learnable, per_label
from edgeagent.learning.learner import append_round, read_rounds
from edgeagent.learning.versions import current, rollback, versions, versions_dir


def status(settings: Settings, task: str, as_json: bool) -> int:
    """Print rounds, holdout figures before/after, versions and stored examples."""
    cfg = settings.tasks.get(task)
    if cfg is None:
        print(f"edgeagent: no task {task!r} in the config", file=sys.stderr)
        return 2
    state = settings.state_dir()
    vdir = versions_dir(state, task)
    cur = current(vdir)
    rounds = read_rounds(state, task)
    examples = _examples(settings, task)
    info: dict[str, Any] = {
        "task": task,
        "learning": cfg.learn.enabled,
        "serving": str(cur) if cur else str(getattr(cfg.backend, "bundle", "")),
        "versions": [v.name for v in versions(vdir)],
        "rounds": rounds,
        "examples": examples,
    }
    if as_json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    lc = cfg.learn
    print(
        f"task {task}: learning {'on' if lc.enabled else 'off'} (a round every "
        f"{lc.every_examples} new examples, or {lc.every_s:g} s with {lc.min_new_examples})"
    )
    print(f"serving: {info['serving']}{'' if cur else '  (the configured bundle)'}")
    for v in versions(vdir):
        print(f"  {'*' if cur and v == cur else ' '} {v.name}{_version_note(v)}")
    outcomes: dict[str, int] = {}
    for r in rounds:
        key = r.get("outcome") or r.get("event", "?")
        outcomes[key] = outcomes.get(key, 0) + 1
    print(
        f"rounds: {sum(1 for r in rounds if 'outcome' in r)}  "
        + ", ".join(f"{k} {n}" for k, n in sorted(outcomes.items()))
    )
    for r in rounds[-10:]:
        print("  " + _round_line(r))
    if examples is None:
        print("examples: no state file yet")
        return 0
    print(
        f"examples stored: {examples['stored']} (learnable {examples['learnable']}: "
        f"train {examples['train']}, holdout {examples['holdout']})"
    )
    labels = examples["per_label"]
    for lb, c in sorted(labels.items(), key=lambda kv: -(kv[1]["train"] + kv[1]["holdout"]))[:30]:
        print(f"  {lb:<32} train {c['train']:>5}  holdout {c['holdout']:>5}")
    if len(labels) > 30:
        print(f"  … {len(labels) - 30} more labels (--json shows all)")
    return 0


def do_rollback(settings: Settings, task: str) -> int:
    """Point ``latest`` one version back; the daemon follows within seconds (or on SIGHUP)."""
    if task not in settings.tasks:
        print(f"edgeagent: no task {task!r} in the config", file=sys.stderr)
        return 2
    state = settings.state_dir()
    try:
        old, new = rollback(versions_dir(state, task))
    except LookupError as exc:
        print(f"edgeagent: {task}: {exc}", file=sys.stderr)
        return 1
    append_round(
        state,
        task,
        {
            "event": "rollback",
            "from": old.name if old else None,
            "to": new.name if new else None,
            "at": datetime.now(timezone.utc).timestamp(),
        },
    )
    target = new.name if new else "the configured bundle"
    print(
        f"{task}: rolled back from {old.name if old else '?'} to {target}; a running daemon "
        "switches within a few seconds (or at once on SIGHUP: systemctl reload edgeagent)"
    )
    return 0


def _examples(settings: Settings, task: str) -> dict[str, Any] | None:
    from edgeagent.store import Store, StoreError

    path = settings.state_dir() / "edgeagent.db"
    if not path.exists():
        return None
    try:
        store = Store(path, synchronous=settings.store.synchronous)
    except StoreError as exc:
        print(f"edgeagent: {exc}", file=sys.stderr)
        return None
    try:
        rows = store.learn_examples(task)
    finally:
        store.close()
    kept, _ = learnable(task, rows, settings.tasks[task].learn)
    counts = per_label(kept)
    return {
        "stored": len(rows),
        "learnable": len(kept),
        "train": sum(c["train"] for c in counts.values()),
        "holdout": sum(c["holdout"] for c in counts.values()),
        "per_label": counts,
    }


def _version_note(v: Any) -> str:
    try:
        m = read_manifest(v, verify=False)
    except BundleError:
        return "  (unreadable manifest)"
    learned = m.get("learned") or {}
    new = learned.get("new_labels") or []
    return f"  round {learned.get('round', '?')}, {learned.get('learned_train', 0)} learned" + (
        f", new labels {', '.join(new[:5])}" if new else ""
    )


def _round_line(r: dict[str, Any]) -> str:
    when = datetime.fromtimestamp(float(r.get("at", 0)), timezone.utc).strftime("%Y-%m-%d %H:%M")
    if r.get("event") == "rollback":
        return f"{when}  rollback {r.get('from')} -> {r.get('to') or 'configured bundle'}"
    if r.get("event") == "import":
        return f"{when}  import of bundle {r.get('bundle')}: {r.get('result')} ({r.get('why')})"
    parts = [f"#{r.get('round')} {when} {r.get('outcome', '?'):<8}"]
    ev = r.get("evaluation") or {}
    for name, short in (("learned_holdout", "holdout"), ("bundle_held_out", "bundle split")):
        if name in ev:
            s, c = ev[name]["serving"], ev[name]["candidate"]
            target = (r.get("operating_point") or {}).get("target_accuracy", 0)
            parts.append(
                f"{short} (n={s['n']}): local acc {s['local_accuracy']:.1%} -> "
                f"{c['local_accuracy']:.1%}, escalation for {target:.0%} "
                f"{s['escalation_needed']:.1%} -> {c['escalation_needed']:.1%}"
            )
    parts.append(f"[{r.get('learned_train', 0)} train, {r.get('seconds', '?')} s]")
    if r.get("outcome") != "promoted" and r.get("why"):
        parts.append(f"why: {r['why']}")
    if r.get("new_labels"):
        parts.append(f"new labels: {', '.join(r['new_labels'][:5])}")
    return "; ".join(parts)


def do_import(settings: Settings, task: str, path: Path) -> int:
    """Add examples exported on another device (``learn export`` JSON lines or archive,
    ``edgeagent examples`` lines, or ``{"text", "label"}`` lines) to this device's store;
    the next round learns from them.  An archive's bundle is judged on this device and
    served only when no worse (:mod:`edgeagent.learning.fleet`)."""
    import tempfile

    from edgeagent.learning.fleet import FleetError, judge_import, read_import, store_examples
    from edgeagent.store import StoreError

    if task not in settings.tasks:
        print(f"edgeagent: no task {task!r} in the config", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="edgeagent-import-") as scratch:
        try:
            rows, bundle = read_import(task, path, Path(scratch))
            store_examples(settings, task, rows, path.name)
        except (FleetError, StoreError) as exc:
            print(f"edgeagent: {exc}", file=sys.stderr)
            return 1
        print(
            f"{task}: imported {len(rows)} examples from {path}; the next learning round uses them"
        )
        if bundle is None:
            return 0
        record = judge_import(settings, task, bundle)
    append_round(settings.state_dir(), task, record)
    if record["result"] == "promoted":
        print(
            f"{task}: bundle {bundle.name} is no worse here: now served (a running daemon "
            "switches within a few seconds, or at once on SIGHUP)"
        )
        return 0
    print(f"{task}: bundle {bundle.name} not served: {record['why']}")
    return 0


def do_export(settings: Settings, task: str, out: Path, with_bundle: bool) -> int:
    """Write the task's learned examples (and, with ``with_bundle``, the learned version it
    serves) for ``edgeagent learn import`` on another device."""
    from edgeagent.learning.fleet import FleetError, write_export
    from edgeagent.store import Store, StoreError

    if task not in settings.tasks:
        print(f"edgeagent: no task {task!r} in the config", file=sys.stderr)
        return 2
    path = settings.state_dir() / "edgeagent.db"
    if not path.exists():
        print(f"edgeagent: no state file at {path}", file=sys.stderr)
        return 1
    try:
        store = Store(path, synchronous=settings.store.synchronous)
    except StoreError as exc:
        print(f"edgeagent: {exc}", file=sys.stderr)
        return 1
    try:
        rows = store.learn_examples(task)
    finally:
        store.close()
    try:
        info = write_export(settings, task, rows, out, with_bundle=with_bundle)
    except (FleetError, BundleError, OSError) as exc:
        print(f"edgeagent: {exc}", file=sys.stderr)
        return 1
    what = f"{info['examples']} examples" + (
        f" and bundle {info['bundle']}" if "bundle" in info else ""
    )
    print(f"{task}: exported {what} to {out}")
    return 0
