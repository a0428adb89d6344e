"""`policy-agent` entrypoint: argv -> subcommand. Configures logging once.

Each subcommand lives in policy_agent/commands/<name>.py and exposes
``register(subparsers)`` which adds its parser and sets ``func(args) -> int``.
Modules are imported only when listed here, so a missing optional piece does
not break the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from policy_agent import logs

COMMANDS = ("render", "run", "status", "dump", "explain", "flows", "cleanup", "lab", "demo")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="policy-agent", description="Kubernetes NetworkPolicy node agent")
    p.add_argument("--log-format", choices=("console", "json"), default="console", help="log output format")
    p.add_argument("--log-level", default="info", help="debug, info, warning, error")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"policy_agent.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"policy_agent.commands.{name}":
                continue  # not built yet
            raise
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(args.log_format, args.log_level)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
