"""``edgeagent cloud``: argument parsing and exit codes only."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgeagent.exitcodes import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_USAGE


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``cloud`` subcommand (heavy imports happen in the handler)."""
    p = sub.add_parser(
        "cloud",
        help="run the reference cloud agent (answers escalations with an OpenAI-compatible model)",
    )
    p.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help="config file (default: $EDGEAGENT_CLOUD_CONFIG, else /etc/edgeagent/cloud.toml)",
    )
    p.add_argument(
        "--check", action="store_true", help="validate the config and exit (78 if invalid)"
    )
    p.set_defaults(func=_cmd_cloud)

    st = sub.add_parser(
        "cloud-standin",
        help="serve a deterministic OpenAI-compatible stand-in LLM (keyword rules, NOT a model; "
        "for the demo and tests)",
    )
    st.add_argument(
        "--listen", default="127.0.0.1:8089", help="host:port (default: %(default)s; port 0: any)"
    )
    st.set_defaults(func=_cmd_standin)


def _cmd_cloud(args: argparse.Namespace) -> int:
    from edgeagent import logs
    from edgeagent.cloud.config import load_cloud_settings
    from edgeagent.config import ConfigError

    try:
        settings, path = load_cloud_settings(args.config)
        settings.api_key()  # fail now on an unreadable key file, not at the first request
    except ConfigError as exc:
        print(f"edgeagent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        print(f"{path}: OK (model {settings.llm.model} at {settings.llm.base_url})")
        return EXIT_OK
    logs.configure(settings.log.level, settings.log.format)
    from edgeagent.cloud import agent

    return agent.run(settings)


def _cmd_standin(args: argparse.Namespace) -> int:
    from edgeagent.cloud import standin

    host, _, port = str(args.listen).rpartition(":")
    if not host or not port.isdigit():
        print(f"edgeagent: --listen {args.listen}: expected host:port", file=sys.stderr)
        return EXIT_USAGE
    try:
        server = standin.serve(host.strip("[]"), int(port))
    except OSError as exc:
        print(f"edgeagent: --listen {args.listen}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    bound_port = int(server.server_address[1])
    print(
        f"stand-in LLM (deterministic keyword rules, not a model) on http://{host}:{bound_port}/v1",
        flush=True,
    )
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    server.shutdown()
    return EXIT_OK
