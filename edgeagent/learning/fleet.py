"""A fleet learns together: ``edgeagent learn export`` / ``import``.

An export is either JSON lines of the task's learned examples (``{"task", "text", "label",
"source", "created_at"}``, ``source`` = ``escalation``, ``audit`` or ``imported``), or,
with ``--bundle``, a tar archive holding those lines (``examples.jsonl``), the bundle
version the device serves (``bundle/``) and ``export.json`` (task, device, fingerprints).

Import adds the examples to this device's store (the next round learns from them; a
repeated input keeps its newest answer).  An imported bundle is never served on trust: it
must descend from the same configured bundle (base fingerprint), its files must hash to
its manifest, and it is judged like a refit candidate against the model this device
serves, on this device's learned holdout and the bundle's own held-out split
(:func:`edgeagent.learning.refit.judge`).  Only when it is no worse is it copied into
the task's versions and ``latest`` pointed at it (a running daemon follows within
seconds, like a rollback).  The train/holdout split is a hash of task name and input,
the same on every device, so a bundle learned on another device never trained on this
device's holdout (for the same task name).
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from edgeagent.bundle import BundleError, read_manifest
from edgeagent.config import Settings, TaskConfig
from edgeagent.learning.examples import learnable
from edgeagent.learning.refit import PROMOTED, REJECTED
from edgeagent.learning.versions import (
    base_fingerprint,
    point_latest,
    serving_bundle,
    versions,
    versions_dir,
)

EXAMPLES_FILE = "examples.jsonl"
INFO_FILE = "export.json"
BUNDLE_DIR = "bundle"
IMPORTED = "imported"


class FleetError(Exception):
    """An export or import that cannot be done (the message says why)."""


def _source(reason: str) -> str:
    return reason if reason in ("audit", IMPORTED) else "escalation"


def export_lines(task: str, rows: list[tuple[int, Any, Any, str, float]]) -> list[str]:
    """JSON lines of a task's stored examples (as :meth:`Store.learn_examples` gives
    them) that have a text input and a label."""
    out = []
    for _seq, inp, outp, reason, created in rows:
        label = outp.get("label") if isinstance(outp, dict) else None
        if isinstance(inp, str) and isinstance(label, str):
            row = {
                "task": task,
                "text": inp,
                "label": label,
                "source": _source(reason),
                "created_at": created,
            }
            out.append(json.dumps(row, ensure_ascii=False) + "\n")
    return out


def write_export(
    settings: Settings,
    task: str,
    rows: list[tuple[int, Any, Any, str, float]],
    out: Path,
    *,
    with_bundle: bool,
) -> dict[str, Any]:
    """Write the export file; returns what it holds (for the command's message)."""
    lines = export_lines(task, rows)
    info: dict[str, Any] = {
        "format": 1,
        "task": task,
        "device_id": settings.device_id,
        "examples": len(lines),
        "exported_at": time.time(),
    }
    if not with_bundle:
        _atomic_write(out, "".join(lines).encode())
        return info
    cfg = settings.tasks[task]
    configured = getattr(cfg.backend, "bundle", None)
    if configured is None:
        raise FleetError(f"task {task!r} has no bundle (only onnx classifier tasks learn)")
    bundle = serving_bundle(Path(configured), versions_dir(settings.state_dir(), task))
    if bundle == Path(configured):
        raise FleetError(
            f"task {task!r} serves its configured bundle: no learned version to export "
            "(export the examples without --bundle)"
        )
    manifest = read_manifest(bundle, verify=True)
    info.update(
        bundle=bundle.name,
        fingerprint=manifest["fingerprint"],
        base_fingerprint=base_fingerprint(manifest),
    )
    tmp = out.with_name(f".{out.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        _add_bytes(tar, INFO_FILE, json.dumps(info, indent=2, sort_keys=True).encode())
        _add_bytes(tar, EXAMPLES_FILE, "".join(lines).encode())
        tar.add(bundle, arcname=f"{BUNDLE_DIR}/{bundle.name}")
    tmp.replace(out)
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = int(time.time())
    ti.mode = 0o644
    tar.addfile(ti, io.BytesIO(data))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def parse_lines(task: str, text: str, where: str) -> list[tuple[str, str, str]]:
    """``(text, label, reason)`` from export lines, ``edgeagent examples`` lines or
    ``{"text", "label"}`` lines; lines of another task are skipped.  An audit keeps its
    source (``learn.sources`` applies to it here too); everything else is ``imported``."""
    rows: list[tuple[str, str, str]] = []
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise FleetError(f"{where}:{no}: not JSON") from None
        if not isinstance(row, dict):
            raise FleetError(f"{where}:{no}: expected a JSON object")
        if row.get("task") not in (None, task):
            continue
        inp = row.get("text", row.get("input"))
        label = row.get("label")
        out = row.get("cloud_output")
        if label is None and isinstance(out, dict):
            label = out.get("label")
        if not isinstance(inp, str) or not isinstance(label, str):
            raise FleetError(f"{where}:{no}: expected a text input and a label")
        audit = row.get("source") == "audit" or row.get("reason") == "audit"
        rows.append((inp, label, "audit" if audit else IMPORTED))
    return rows


def store_examples(
    settings: Settings, task: str, rows: list[tuple[str, str, str]], src: str
) -> None:
    from edgeagent.store import Store

    store = Store(settings.state_dir() / "edgeagent.db", synchronous=settings.store.synchronous)
    try:
        with store.transaction() as tx:
            for text, label, reason in rows:
                tx.add_example(
                    task=task,
                    input=text,
                    cloud_output={"label": label},
                    local_output=None,
                    local_confidence=None,
                    reason=reason,
                    model=f"import:{src}",
                )
    finally:
        store.close()


def read_import(
    task: str, path: Path, scratch: Path
) -> tuple[list[tuple[str, str, str]], Path | None]:
    """The examples of an export file, and its bundle unpacked under ``scratch`` (or None)."""
    try:
        is_tar = tarfile.is_tarfile(path)
    except OSError as exc:
        raise FleetError(f"{path}: cannot read: {exc}") from None
    if not is_tar:
        try:
            text = path.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise FleetError(f"{path}: cannot read: {exc}") from None
        return parse_lines(task, text, str(path)), None
    with tarfile.open(path, "r:*") as tar:
        try:
            _safe_extract(tar, scratch)
        except (tarfile.TarError, OSError) as exc:
            raise FleetError(f"{path}: cannot unpack: {exc}") from None
    ex = scratch / EXAMPLES_FILE
    rows = (
        parse_lines(task, ex.read_text("utf-8"), f"{path}:{EXAMPLES_FILE}") if ex.exists() else []
    )
    bundles = [p for p in (scratch / BUNDLE_DIR).glob("*") if p.is_dir()]
    if len(bundles) > 1:
        raise FleetError(f"{path}: more than one bundle in the archive")
    return rows, (bundles[0] if bundles else None)


def _safe_extract(tar: tarfile.TarFile, dest: Path) -> None:
    """Only regular files and directories, inside ``dest`` (tarfile's ``data`` filter where
    this Python has it, the same checks by hand where it does not)."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    root = dest.resolve()
    for m in tar.getmembers():
        target = (dest / m.name).resolve()
        if not (m.isfile() or m.isdir()) or not target.is_relative_to(root):
            raise tarfile.TarError(f"refusing archive member {m.name!r}")
    tar.extractall(dest)  # every member checked above


def judge_import(settings: Settings, task: str, candidate: Path) -> dict[str, Any]:
    """Judge an imported bundle like a refit candidate; publish it when no worse.
    Returns the record appended to the task's rounds log."""
    from edgeagent.backends.onnx import Head
    from edgeagent.learning.config import LearnConfig

    cfg: TaskConfig = settings.tasks[task]
    configured = Path(getattr(cfg.backend, "bundle", ""))
    vdir = versions_dir(settings.state_dir(), task)
    record: dict[str, Any] = {"event": "import", "bundle": candidate.name, "at": time.time()}
    try:
        mine = read_manifest(configured, verify=False)
        theirs = read_manifest(candidate, kind="classifier", verify=True)
    except BundleError as exc:
        return {**record, "result": REJECTED, "why": f"unusable bundle: {exc}"}
    if base_fingerprint(theirs) != base_fingerprint(mine):
        return {
            **record,
            "result": REJECTED,
            "why": "learned from a different configured bundle (base fingerprint "
            f"{base_fingerprint(theirs)[:12]} vs {base_fingerprint(mine)[:12]})",
        }
    if any(v.name == candidate.name for v in versions(vdir)):
        return {**record, "result": REJECTED, "why": "this version is already here"}
    serving = serving_bundle(configured, vdir)
    job = _judge_job(settings, task, serving)
    evaluation, reasons = _judge(
        job, LearnConfig.model_validate(job["learn"]), Head.from_bundle(candidate)
    )
    record["evaluation"] = evaluation
    record["serving"] = serving.name
    if reasons:
        return {**record, "result": REJECTED, "why": "; ".join(reasons)}
    vdir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=vdir))
    try:
        shutil.copytree(candidate, staging, dirs_exist_ok=True)
        staging.chmod(0o755)
        staging.rename(vdir / candidate.name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    point_latest(vdir, vdir / candidate.name)
    return {**record, "result": PROMOTED, "why": "no worse on every evaluation set"}


def _judge_job(settings: Settings, task: str, serving: Path) -> dict[str, Any]:
    from edgeagent.learning.examples import HOLDOUT
    from edgeagent.store import Store

    cfg = settings.tasks[task]
    store = Store(settings.state_dir() / "edgeagent.db", synchronous=settings.store.synchronous)
    try:
        rows = store.learn_examples(task)
    finally:
        store.close()
    kept, _ = learnable(task, rows, cfg.learn, set(cfg.labels) or None)
    b = cfg.backend
    return {
        "task": task,
        "serving_bundle": str(serving),
        "versions_dir": str(versions_dir(settings.state_dir(), task)),
        "holdout": [
            {"text": e.text, "label": e.label, "audit": e.audit} for e in kept if e.split == HOLDOUT
        ],
        "audit_rate": cfg.audit_rate,
        "learn": cfg.learn.model_dump(mode="json"),
        "threshold": cfg.threshold,
        "oos_distance": getattr(b, "oos_distance", True),
        "use_bundle_threshold": getattr(b, "use_bundle_threshold", True),
        "max_length": getattr(b, "max_length", 128),
    }


def _judge(job: dict[str, Any], cfg: Any, cand: Any) -> tuple[dict[str, Any], list[str]]:
    import numpy as np

    from edgeagent.backends.onnx import Head
    from edgeagent.learning.refit import bundle_options, encoder_of, judge, traffic_weights
    from edgeagent.learning.refit_data import load_refit_data

    serving = Path(job["serving_bundle"])
    manifest = read_manifest(serving, kind="classifier")
    head = Head.from_bundle(serving)
    texts = [e["text"] for e in job["holdout"]]
    emb = (
        encoder_of(serving, manifest, job).embed_many(texts)
        if texts
        else np.zeros((0, head.dim), dtype=np.float32)
    )
    hold = (
        emb,
        [e["label"] for e in job["holdout"]],
        traffic_weights(
            [bool(e.get("audit")) for e in job["holdout"]], float(job.get("audit_rate") or 0)
        ),
    )
    data = load_refit_data(serving)
    opts = bundle_options(manifest, head, job)
    evaluation, reasons, _ = judge(job, cfg, manifest, head, data, hold, opts, cand)
    return evaluation, reasons
