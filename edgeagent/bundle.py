"""Model bundles on disk: ``manifest.json`` plus the files it lists, each with its sha256.

A bundle is a directory.  ``manifest.json`` names every other file in it with its size
and sha256; :func:`read_manifest` refuses a bundle whose files are missing or differ.
Three kinds exist: ``encoder`` (``edgeagent models build``: INT8 ONNX sentence encoder +
tokenizer), ``classifier`` (``edgeagent train`` on ``{"text","label"}`` examples: an encoder
plus a head, labels and calibration) and ``tagger`` (``edgeagent train`` on
``{"tokens","tags"}`` examples: a fine-tuned INT8 token-classification model, its BIO tags
and calibration).  Standard library only: the daemon imports this at load time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT = "edgeagent-bundle/1"
KINDS = ("encoder", "classifier", "tagger")


class BundleError(Exception):
    """The bundle directory is missing, incomplete, corrupt or of the wrong kind."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entries(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"sha256", "bytes"}}`` for the named files of ``directory``."""
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(names):
        path = directory / name
        out[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return out


def fingerprint(manifest: dict[str, Any]) -> str:
    """Hex digest that changes whenever any bundle file (weights, head, labels, calibration)
    changes: the sha256 of the canonical JSON of the kind and the file hashes."""
    files = {name: entry["sha256"] for name, entry in sorted(manifest["files"].items())}
    canon = json.dumps({"kind": manifest["kind"], "files": files}, sort_keys=True)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def write_manifest(directory: Path, manifest: dict[str, Any], files: list[str]) -> dict[str, Any]:
    """Hash ``files`` (relative to ``directory``) into ``manifest["files"]`` and write
    ``manifest.json`` atomically.  Returns the manifest as written."""
    if manifest.get("kind") not in KINDS:
        raise ValueError(f"manifest kind must be one of {KINDS}")
    full = dict(manifest)
    full["format"] = FORMAT
    full["files"] = file_entries(directory, files)
    full["fingerprint"] = fingerprint(full)
    text = json.dumps(full, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".manifest.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, directory / MANIFEST)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return full


def read_manifest(
    directory: Path, *, kind: str | None = None, verify: bool = True
) -> dict[str, Any]:
    """Read and check a bundle's manifest.

    Checks the format tag, the kind (if given), that every listed file exists, and (with
    ``verify``) its size and sha256.  Raises :class:`BundleError` naming the offending file.
    """
    path = directory / MANIFEST
    if not directory.is_dir():
        raise BundleError(f"bundle directory not found: {directory}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path}: missing (not a model bundle?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable manifest: {exc}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: manifest is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("kind") not in KINDS:
        raise BundleError(f"{path}: kind is {manifest.get('kind')!r}, expected one of {KINDS}")
    if kind is not None and manifest["kind"] != kind:
        raise BundleError(f"{path}: a {manifest['kind']} bundle, expected a {kind} bundle")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{path}: 'files' must be a non-empty object")
    for name, entry in files.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise BundleError(f"{path}: files.{name} lacks a sha256")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"{path}: files.{name}: must be a plain relative path")
        file = directory / name
        if not file.is_file():
            raise BundleError(f"{file}: listed in the manifest but missing")
        if verify:
            size = file.stat().st_size
            if entry.get("bytes") is not None and size != entry["bytes"]:
                raise BundleError(f"{file}: {size} bytes, manifest says {entry['bytes']}")
            actual = sha256_file(file)
            if actual != entry["sha256"]:
                raise BundleError(
                    f"{file}: sha256 mismatch (file {actual[:12]}…, manifest "
                    f"{entry['sha256'][:12]}…): the bundle was modified or is corrupt"
                )
    computed = fingerprint(manifest)
    if manifest.get("fingerprint") not in (None, computed):
        raise BundleError(f"{path}: fingerprint does not match the listed file hashes")
    manifest["fingerprint"] = computed
    return manifest


def publish_bundle(
    staging: Path, task_dir: Path, manifest: dict[str, Any], files: list[str], log: Any
) -> Path:
    """Hash ``files`` into the staging directory's manifest, move it to
    ``task_dir/<UTC time>-<fingerprint>`` and point ``task_dir/latest`` at it.  The staging
    directory is removed on failure.  Returns the bundle directory."""
    try:
        written = write_manifest(staging, manifest, files)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        final = task_dir / f"{stamp}-{written['fingerprint'][:8]}"
        final.parent.mkdir(parents=True, exist_ok=True)
        staging.chmod(0o755)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _point_latest(final)
    log(f"wrote {final} (fingerprint {written['fingerprint'][:12]}); {final.parent}/latest -> it")
    return final


def _point_latest(bundle: Path) -> None:
    """``TASK/latest`` -> the newest bundle, swapped atomically (a config can name it; a
    SIGHUP then loads the new model; the cache fingerprint changes with the files)."""
    link = bundle.parent / "latest"
    tmp = bundle.parent / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(bundle.name)
    tmp.replace(link)
