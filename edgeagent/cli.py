"""Command line: argument parsing and exit codes only."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from edgeagent import __version__

EXIT_CONFIG = 78


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgeagent",
        description="Answer MQTT text jobs with small local models; escalate the rest.",
    )
    p.add_argument("--version", action="version", version=f"edgeagent {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon")
    _config_arg(run)
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser("check-config", help="validate a config file (exit 78 if invalid)")
    _config_arg(check)
    check.add_argument("--load", action="store_true", help="also load every task's model")
    check.set_defaults(func=_cmd_check)

    submit = sub.add_parser("submit", help="publish jobs and print their results (JSON lines)")
    _config_arg(submit)
    submit.add_argument("task", help="task name")
    src = submit.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", help="a job input (repeatable)")
    src.add_argument(
        "--file",
        type=Path,
        help="JSON lines file: job objects ({'input': ...}) or strings; '-' for stdin",
    )
    submit.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for results")
    submit.add_argument("--device", help="target device id (default: the config's device_id)")
    submit.add_argument("--fleet", action="store_true", help="publish to the fleet topic")
    submit.add_argument("--escalate", choices=["auto", "never", "always"], default=None)
    submit.add_argument("--deadline-ms", type=int, default=None)
    submit.add_argument("--v311", action="store_true", help="use MQTT 3.1.1 (reply_to field)")
    submit.set_defaults(func=_cmd_submit)

    replay = sub.add_parser(
        "replay", help="replay recorded jobs through a running daemon and report quality"
    )
    _config_arg(replay)
    replay.add_argument("task", help="task name")
    replay.add_argument("file", type=Path, help="JSON lines: jobs, optionally with 'label'/'gold'")
    replay.add_argument("--timeout", type=float, default=120.0, help="seconds to wait")
    replay.add_argument("--device", help="target device id (default: the config's device_id)")
    replay.add_argument("--results", action="store_true", help="also print each result (stderr)")
    replay.add_argument(
        "--oos-label",
        default=None,
        help="gold label meaning out of scope, besides 'oos' and 'out_of_scope' (declining "
        "to answer such a job counts as right)",
    )
    replay.set_defaults(func=_cmd_replay)

    ex = sub.add_parser(
        "examples", help="export labelled examples learned from the cloud (JSON lines)"
    )
    _config_arg(ex)
    ex.add_argument("--task", help="only this task")
    ex.set_defaults(func=_cmd_examples)

    ver = sub.add_parser("version", help="print the version")
    ver.set_defaults(func=_cmd_version)

    ref = sub.add_parser("config-reference", help="print the config reference (Markdown)")
    ref.add_argument("--update", type=Path, metavar="README", help="rewrite its reference section")
    ref.set_defaults(func=_cmd_reference)

    _register_optional(sub)
    return p


def _register_optional(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Model tools live in optional modules; their heavy imports happen in their handlers."""
    for module_name in ("edgeagent.modeltools.cli", "edgeagent.cloud.cli"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        module.register(sub)


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help="config file (default: $EDGEAGENT_CONFIG, else /etc/edgeagent/edgeagent.toml)",
    )


def _load(args: argparse.Namespace) -> tuple[object, Path] | int:
    from edgeagent.config import ConfigError, load_settings

    try:
        return load_settings(args.config)
    except ConfigError as exc:
        print(f"edgeagent: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _cmd_run(args: argparse.Namespace) -> int:
    from edgeagent import daemon, logs
    from edgeagent.config import Settings

    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    settings, path = loaded
    assert isinstance(settings, Settings)
    logs.configure(settings.log.level, settings.log.format)
    return daemon.run(settings, path)


def _cmd_check(args: argparse.Namespace) -> int:
    from edgeagent.config import Settings

    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    settings, path = loaded
    assert isinstance(settings, Settings)
    if args.load:
        from edgeagent.backends import BackendError, create

        for name, task in settings.tasks.items():
            try:
                backend = create(name, task)
                backend.load()
                backend.close()
            except BackendError as exc:
                print(
                    f"edgeagent: invalid configuration ({path}):\n  tasks.{name}: {exc}",
                    file=sys.stderr,
                )
                return EXIT_CONFIG
    print(f"{path}: OK ({len(settings.tasks)} task(s): {', '.join(sorted(settings.tasks))})")
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from edgeagent import submit
    from edgeagent.config import Settings

    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    settings, _ = loaded
    assert isinstance(settings, Settings)
    return submit.main(settings, args)


def _cmd_replay(args: argparse.Namespace) -> int:
    from edgeagent import replay
    from edgeagent.config import Settings

    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    settings, _ = loaded
    assert isinstance(settings, Settings)
    return replay.main(settings, args)


def _cmd_examples(args: argparse.Namespace) -> int:
    import json

    from edgeagent.config import Settings
    from edgeagent.store import Store, StoreError

    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    settings, _ = loaded
    assert isinstance(settings, Settings)
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
        for row in store.examples(args.task):
            print(json.dumps(row, ensure_ascii=False))
    finally:
        store.close()
    return 0


def _cmd_version(args: argparse.Namespace) -> int:
    print(f"edgeagent {__version__}")
    return 0


def _cmd_reference(args: argparse.Namespace) -> int:
    from edgeagent.config import reference_markdown, update_reference

    if args.update:
        update_reference(args.update)
        print(f"updated {args.update}")
    else:
        print(reference_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
