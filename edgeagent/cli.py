"""Command line: argument parsing and exit codes only."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from edgeagent import __version__
from edgeagent.exitcodes import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # A core command (`run` above all) parses without importing the optional tool modules,
    # so the daemon's process never loads build-time code (tests/test_layering.py).
    parser = build_parser(tools=False)
    if not argv or argv[0] not in _commands(parser):
        parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    return int(args.func(args))


def build_parser(*, tools: bool = True) -> argparse.ArgumentParser:
    """The ``edgeagent`` parser; ``tools=False`` leaves out the commands of the optional
    modules (model tools, cloud agent)."""
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
    check.add_argument(
        "--no-load",
        action="store_true",
        help="only validate the file: do not check that model files exist, match their "
        "manifests and load",
    )
    check.add_argument("--load", action="store_true", help=argparse.SUPPRESS)  # the default
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
    submit.add_argument(
        "--await-superseding",
        action="store_true",
        help="a provisional result counts only once the result that supersedes it arrived",
    )
    submit.add_argument(
        "--offline-ok",
        action="store_true",
        help="publish even when the device's retained status says it is not online (the "
        "broker holds the jobs for its session); default: exit 4 at once",
    )
    submit.set_defaults(func=_cmd_submit)

    status = sub.add_parser(
        "status", help="print the retained status and stats of a device or the fleet (a table)"
    )
    _config_arg(status)
    who = status.add_mutually_exclusive_group()
    who.add_argument("--device", help="device id (default: the config's device_id)")
    who.add_argument("--fleet", action="store_true", help="every device under the topic prefix")
    status.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
    status.set_defaults(func=_cmd_status)

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
    ex.add_argument(
        "--bio",
        action="store_true",
        help="extract tasks: {tokens, tags} lines that `edgeagent train` accepts for a tagger",
    )
    ex.set_defaults(func=_cmd_examples)

    res = sub.add_parser(
        "results",
        help="show what the state file holds for a job: state, result, refused publishes",
    )
    _config_arg(res)
    res.add_argument("job_id", help="the job's id (as in its result)")
    res.add_argument("--json", action="store_true", help="print one JSON object")
    res.set_defaults(func=_cmd_results)
    learn = sub.add_parser("learn", help="on-device learning from the cloud agent")
    lsub = learn.add_subparsers(dest="learn_command", metavar="ACTION", required=True)
    lst = lsub.add_parser("status", help="rounds, holdout before/after, versions, examples")
    _config_arg(lst)
    lst.add_argument("task", help="task name")
    lst.add_argument("--json", action="store_true", help="machine-readable")
    lst.set_defaults(func=_cmd_learn)
    lrb = lsub.add_parser("rollback", help="serve the previous learned version of a task")
    _config_arg(lrb)
    lrb.add_argument("task", help="task name")
    lrb.set_defaults(func=_cmd_learn)
    lim = lsub.add_parser(
        "import",
        help="add examples (and a bundle) exported on another device; a bundle is served "
        "only if no worse here",
    )
    _config_arg(lim)
    lim.add_argument("task", help="task name")
    lim.add_argument(
        "file",
        type=Path,
        help="`learn export` output, `edgeagent examples` output or text+label JSON lines",
    )
    lim.set_defaults(func=_cmd_learn)
    lex = lsub.add_parser(
        "export", help="write what this device learned, for `learn import` on another"
    )
    _config_arg(lex)
    lex.add_argument("task", help="task name")
    lex.add_argument("file", type=Path, help="output: JSON lines, or an archive with --bundle")
    lex.add_argument(
        "--bundle",
        action="store_true",
        help="also the learned version this device serves (a .tar.gz archive)",
    )
    lex.set_defaults(func=_cmd_learn)

    ver = sub.add_parser("version", help="print the version")
    ver.set_defaults(func=_cmd_version)

    ref = sub.add_parser("config-reference", help="print the config reference (Markdown)")
    ref.add_argument("--update", type=Path, metavar="README", help="rewrite its reference section")
    ref.set_defaults(func=_cmd_reference)

    if tools:
        _register_optional(sub)
    return p


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    """The sub-command names ``parser`` knows."""
    return {
        name
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    }


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
    if not args.no_load:
        failed = _check_models(settings, path)
        if failed:
            return failed
    loaded_note = "" if args.no_load else "; models load"
    print(
        f"{path}: OK ({len(settings.tasks)} task(s): {', '.join(sorted(settings.tasks))}"
        f"{loaded_note})"
    )
    return EXIT_OK


def _check_models(settings: object, path: Path) -> int:
    """Every task's model exists, matches its manifest (sha256) and loads; 0 or 78."""
    from edgeagent.backends import BackendError, create
    from edgeagent.config import Settings, missing_model_hint

    assert isinstance(settings, Settings)
    problems: list[str] = []
    for name, task in settings.tasks.items():
        hint = missing_model_hint(name, task)
        if hint is not None:
            problems.append(f"tasks.{name}: {hint}")
            continue
        try:
            backend = create(name, task)
            backend.load()
            backend.close()
        except BackendError as exc:
            problems.append(f"tasks.{name}: {exc}")
        except ImportError as exc:
            problems.append(f"tasks.{name}: backend runtime not installed: {exc}")
    if problems:
        lines = "\n".join(f"  {p}" for p in problems)
        print(f"edgeagent: configuration {path} is valid, but:\n{lines}", file=sys.stderr)
        print("  (--no-load checks the file alone)", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


def _cmd_submit(args: argparse.Namespace) -> int:
    from edgeagent import submit
    from edgeagent.config import Settings

    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    settings, _ = loaded
    assert isinstance(settings, Settings)
    return submit.main(settings, args)


def _cmd_status(args: argparse.Namespace) -> int:
    from edgeagent import status
    from edgeagent.config import Settings

    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    settings, _ = loaded
    assert isinstance(settings, Settings)
    return status.main(settings, args)


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
        return EXIT_FAILURE
    try:
        store = Store(path, synchronous=settings.store.synchronous)
    except StoreError as exc:
        print(f"edgeagent: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    skipped = 0
    try:
        for row in store.examples(args.task):
            if args.bio:
                from edgeagent.learning.bio import to_bio

                bio = (
                    to_bio(row["input"], row["cloud_output"])
                    if isinstance(row["input"], str)
                    else None
                )
                if bio is None:
                    skipped += 1
                    continue
                row = bio
            print(json.dumps(row, ensure_ascii=False))
    finally:
        store.close()
    if skipped:
        print(
            f"edgeagent: {skipped} answers could not be aligned to the input words (skipped)",
            file=sys.stderr,
        )
    return EXIT_OK


def _cmd_results(args: argparse.Namespace) -> int:
    from edgeagent import jobinfo
    from edgeagent.config import Settings

    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    settings, _ = loaded
    assert isinstance(settings, Settings)
    return jobinfo.main(settings.state_dir() / "edgeagent.db", args.job_id, as_json=args.json)


def _cmd_learn(args: argparse.Namespace) -> int:
    from edgeagent.config import Settings
    from edgeagent.learning import cli as learn_cli

    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    settings, _ = loaded
    assert isinstance(settings, Settings)
    if args.learn_command == "rollback":
        return learn_cli.do_rollback(settings, args.task)
    if args.learn_command == "import":
        return learn_cli.do_import(settings, args.task, args.file)
    if args.learn_command == "export":
        return learn_cli.do_export(settings, args.task, args.file, args.bundle)
    return learn_cli.status(settings, args.task, args.json)


def _cmd_version(args: argparse.Namespace) -> int:
    print(f"edgeagent {__version__}")
    return EXIT_OK


def _cmd_reference(args: argparse.Namespace) -> int:
    from edgeagent.config_reference import reference_markdown, update_reference

    if args.update:
        update_reference(args.update)
        print(f"updated {args.update}")
    else:
        print(reference_markdown())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
