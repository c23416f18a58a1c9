"""`tandem bench report` tables: saved runs side by side, one column per run (terminal and markdown)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tandem.bench.records import Percentiles, RequestRecord, RunSummary
from tandem.bench.run_files import load_run


@dataclass
class Run:
    """A saved run: its summary, its request records and where it was read from."""

    summary: RunSummary
    records: list[RequestRecord] = field(default_factory=list)
    path: Path | None = None


def load_runs(run_dirs: Iterable[str | os.PathLike[str]]) -> list[Run]:
    """Load run directories (raises :class:`~tandem.bench.run_files.RunFileError`)."""
    runs = []
    for d in run_dirs:
        summary, records = load_run(d)
        runs.append(Run(summary, records, Path(d)))
    return runs


def run_labels(runs: Sequence[Run | RunSummary]) -> list[str]:
    """Each run's name, made unique (``name (dir)`` or ``name #i``) when names repeat."""
    names = [_summary(r).name for r in runs]
    labels = []
    for i, (run, name) in enumerate(zip(runs, names, strict=True)):
        if names.count(name) == 1:
            labels.append(name)
            continue
        path = run.path if isinstance(run, Run) else None
        label = f"{name} ({path.name})" if path is not None else f"{name} #{i + 1}"
        labels.append(label)
    # Directories with the same basename: fall back to positions.
    if len(set(labels)) != len(labels):
        labels = [f"{label} #{i + 1}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]
    return labels


def _summary(run: Run | RunSummary) -> RunSummary:
    return run.summary if isinstance(run, Run) else run


# ---------------------------------------------------------------------------------------------
# The comparison table


def _num(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _pct(p: Percentiles | None, attr: str) -> str:
    return "—" if p is None else _num(getattr(p, attr), 1)


def _errors(errors: dict[str, int]) -> str:
    if not errors:
        return "0"
    items = sorted(errors.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{kind} {n}" for kind, n in items)


def _cached_share(s: RunSummary) -> str:
    if s.total_input_tokens <= 0:
        return "—"
    return f"{100.0 * s.total_cached_tokens / s.total_input_tokens:.1f}%"


def _goodput(s: RunSummary) -> str:
    return "—" if s.goodput is None else _num(s.goodput, 2)


def _slo(s: RunSummary) -> str:
    if not s.slo:
        return "—"
    return ", ".join(f"{k}≤{v:g}" for k, v in s.slo.items())


_ROWS: list[tuple[str, Callable[[RunSummary], str]]] = [
    ("load", lambda s: s.load),
    ("requests ok/sent", lambda s: f"{s.requests_ok}/{s.requests_sent}"),
    ("errors", lambda s: _errors(s.errors)),
    ("duration (s)", lambda s: _num(s.duration_s, 1)),
    ("req/s", lambda s: _num(s.request_throughput, 2)),
    ("out tok/s", lambda s: _num(s.output_token_throughput, 1)),
    ("TTFT p50 (ms)", lambda s: _pct(s.ttft_ms, "p50")),
    ("TTFT p90 (ms)", lambda s: _pct(s.ttft_ms, "p90")),
    ("TTFT p99 (ms)", lambda s: _pct(s.ttft_ms, "p99")),
    ("ITL p50 (ms)", lambda s: _pct(s.itl_ms, "p50")),
    ("ITL p99 (ms)", lambda s: _pct(s.itl_ms, "p99")),
    ("E2E p50 (ms)", lambda s: _pct(s.e2e_ms, "p50")),
    ("E2E p99 (ms)", lambda s: _pct(s.e2e_ms, "p99")),
    ("goodput (req/s)", _goodput),
    ("SLO", _slo),
    ("cached tokens", _cached_share),
    ("client CPU", lambda s: f"{s.client_cpu_percent:.0f}%"),
]


def table_rows(runs: Sequence[Run | RunSummary]) -> tuple[list[str], list[list[str]]]:
    """The comparison as plain strings: header (``metric`` then one label per run), and rows."""
    summaries = [_summary(r) for r in runs]
    header = ["metric", *run_labels(runs)]
    rows = [[label, *(fn(s) for s in summaries)] for label, fn in _ROWS]
    return header, rows


def compare_table(runs: Sequence[Run | RunSummary]) -> Table:
    """A rich table with a metric column and one column per run (headed by its name)."""
    header, rows = table_rows(runs)
    table = Table(title="tandem bench report", show_lines=False)
    table.add_column(header[0], style="bold")
    for label in header[1:]:
        table.add_column(label, justify="right")
    for row in rows:
        table.add_row(*row)
    return table


def markdown_table(runs: Sequence[Run | RunSummary]) -> str:
    """The comparison table as GitHub markdown."""
    header, rows = table_rows(runs)

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    out = [line(header), "|" + "---|" + "---:|" * (len(header) - 1)]
    out.extend(line(r) for r in rows)
    return "\n".join(out) + "\n"


def print_report(run_dirs: Iterable[str | os.PathLike[str]], console: Console | None = None) -> list[Run]:
    """Load the runs and print the comparison table; returns the loaded runs."""
    console = console or Console()
    runs = load_runs(run_dirs)
    console.print(compare_table(runs))
    return runs
