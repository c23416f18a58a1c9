"""The `tandem` command: one entry point, a subcommand per job.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``, which registers
its arguments and sets ``func`` (called with the parsed args; its return value is the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tandem import __version__

# Subcommand modules, imported lazily so `tandem --help` does not load torch.
SUBCOMMANDS = {
    "models": "tandem.cli.models_cmd",
    "chat": "tandem.cli.chat_cmd",
    "worker": "tandem.cli.worker_cmd",
    "frontend": "tandem.cli.frontend_cmd",
    "serve": "tandem.cli.serve_cmd",
    "bench": "tandem.cli.bench_cmd",
    "router": "tandem.cli.router_cmd",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Tandem LLM serving")
    parser.add_argument("--version", action="version", version=f"tandem {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMANDS.values():
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        sys.exit(2)
    sys.exit(args.func(args) or 0)
