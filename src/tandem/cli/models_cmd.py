"""``tandem models``: pull, list and remove models in the local cache."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``models pull|list|rm``."""
    parser = subparsers.add_parser("models", help="manage the local model cache")
    actions = parser.add_subparsers(dest="models_command", metavar="ACTION")

    pull = actions.add_parser("pull", help="download and convert a known model into the cache")
    pull.add_argument("name", help="registry name, e.g. smollm2-135m-instruct")
    pull.add_argument("--force", action="store_true", help="re-download and re-convert even if cached")
    pull.set_defaults(func=_pull)

    listing = actions.add_parser("list", help="show cached and known models")
    listing.set_defaults(func=_list)

    remove = actions.add_parser("rm", help="delete a model from the cache")
    remove.add_argument("name")
    remove.set_defaults(func=_remove)

    parser.set_defaults(func=lambda args: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _human_size(num_bytes: int) -> str:
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _pull(args: argparse.Namespace) -> int:
    from tandem.model_cache import pull
    from tandem.model_cache.errors import ModelLoadError

    try:
        path = pull(args.name, force=args.force)  # a pull prints its own summary (size, time)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.name}: {path}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tandem.model_cache import REGISTRY, cache_dir, list_models

    table = Table(title=f"models in {cache_dir()}")
    for column in ("name", "size on disk", "path"):
        table.add_column(column)
    cached = {model.name: model for model in list_models()}
    for model in cached.values():
        table.add_row(model.name, _human_size(model.size_bytes), str(model.path))
    for name, entry in sorted(REGISTRY.items()):
        if name not in cached:
            table.add_row(
                name, "[dim]not pulled[/dim]", f"[dim]tandem models pull {name} (~{entry.approx_size_mb} MB)[/dim]"
            )
    Console().print(table)
    return 0


def _remove(args: argparse.Namespace) -> int:
    from tandem.model_cache import remove
    from tandem.model_cache.errors import ModelLoadError

    try:
        path = remove(args.name)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"removed {path}")
    return 0
