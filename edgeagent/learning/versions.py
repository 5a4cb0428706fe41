"""Learned bundle versions of a task: ``<state_dir>/learn/<task>/bundles/<UTC>-<fp8>``.

``latest`` (a symlink, swapped atomically) names the version the daemon serves; without it
the task serves the bundle its config names (the *base*).  A learned version records the
fingerprint of the base it was learned from (``manifest["learned"]["base_fingerprint"]``):
when the operator points the task at another bundle, older learned versions no longer apply
and the configured bundle is served again (learning then starts from it).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from edgeagent.bundle import BundleError, read_manifest

LATEST = "latest"
_VERIFIED: dict[Path, tuple[tuple[tuple[str, int, int], ...], dict[str, Any]]] = {}
"""Manifests of learned versions whose files were hashed, by the files' (name, size,
mtime) when hashed: a version is immutable once published, so the daemon hashes it once
(in a worker thread, :meth:`~edgeagent.learning.learner.Learner`) and a reload on the
event loop only stats it.  Any change to a file (a damaged version) hashes it again."""


def task_dir(state_dir: Path, task: str) -> Path:
    """Where a task's learning state lives (rounds log, job files, versions)."""
    return state_dir / "learn" / task


def versions_dir(state_dir: Path, task: str) -> Path:
    return task_dir(state_dir, task) / "bundles"


def versions(vdir: Path) -> list[Path]:
    """Published versions, oldest first (names start with their UTC time)."""
    if not vdir.is_dir():
        return []
    return sorted(
        p for p in vdir.iterdir() if p.is_dir() and not p.is_symlink() and p.name[0] != "."
    )


def current(vdir: Path) -> Path | None:
    """The version ``latest`` points at, or None (serve the configured bundle)."""
    link = vdir / LATEST
    if not link.is_symlink():
        return None
    target = (vdir / link.readlink()).resolve()
    return target if target.is_dir() else None


def base_fingerprint(manifest: dict[str, Any]) -> str:
    """The fingerprint of the configured bundle a manifest descends from (itself if none)."""
    learned = manifest.get("learned") or {}
    return str(learned.get("base_fingerprint") or manifest["fingerprint"])


def serving_bundle(configured: Path, vdir: Path) -> Path:
    """The bundle to serve: the current learned version when it descends from the
    configured bundle, else the configured bundle itself."""
    cur = current(vdir)
    if cur is None:
        return configured
    try:
        base = read_manifest(configured, verify=False)
    except BundleError:
        return configured  # the loader reports a broken configured bundle precisely
    try:
        # Every file hashed: a damaged learned version must not keep the daemon from
        # starting; the configured bundle is served instead.
        mine = verified_manifest(cur)
    except (BundleError, OSError):
        return configured
    return cur if base_fingerprint(mine) == base["fingerprint"] else configured


def verified_manifest(bundle: Path) -> dict[str, Any]:
    """``read_manifest(bundle, verify=True)``, hashing the files only when they changed
    since the last verification (see :data:`_VERIFIED`).  Raises ``BundleError``."""
    signature = tuple(
        (f.name, st.st_size, st.st_mtime_ns)
        for f in sorted(bundle.iterdir())
        if f.is_file() and not f.is_symlink()
        for st in (f.stat(),)
    )
    hit = _VERIFIED.get(bundle)
    if hit is not None and hit[0] == signature:
        return hit[1]
    manifest = read_manifest(bundle, verify=True)
    if len(_VERIFIED) > 64:
        _VERIFIED.clear()
    _VERIFIED[bundle] = (signature, manifest)
    return manifest


def point_latest(vdir: Path, target: Path | None) -> None:
    """Point ``latest`` at ``target`` atomically (None: remove it, serve the base)."""
    link = vdir / LATEST
    if target is None:
        link.unlink(missing_ok=True)
        return
    tmp = vdir / ".latest-tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.name)
    tmp.replace(link)


def rollback(vdir: Path) -> tuple[Path | None, Path | None]:
    """Go back one version: ``(from, to)``; ``to`` None means the configured bundle.
    Raises ``LookupError`` when already serving the configured bundle."""
    cur = current(vdir)
    if cur is None:
        raise LookupError("already serving the configured bundle (no learned version)")
    older = [v for v in versions(vdir) if v.name < cur.name]
    target = older[-1] if older else None
    point_latest(vdir, target)
    return cur, target


def prune(vdir: Path, keep: int) -> list[Path]:
    """Delete the oldest versions beyond ``keep`` (never the current one); returns them."""
    cur = current(vdir)
    gone: list[Path] = []
    vs = [v for v in versions(vdir) if v != cur]
    excess = len(vs) + (1 if cur else 0) - keep
    for v in vs[: max(0, excess)]:
        shutil.rmtree(v, ignore_errors=True)
        gone.append(v)
    return gone
