"""`tandem bench report`: compare saved runs side by side and draw their plots.

``compare_table`` puts one column per run; ``make_plots`` draws ``latency_cdf.png``,
``throughput_vs_rate.png`` and ``ttft_over_time.png``; ``write_report`` writes both as
``report.md`` next to the plots. Plotting uses matplotlib's Agg renderer (no display needed).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console
from rich.table import Table

from tandem.bench.records import Percentiles, RequestRecord, RunSummary
from tandem.bench.run_files import load_run

if TYPE_CHECKING:
    from matplotlib.axes import Axes

LATENCY_CDF = "latency_cdf.png"
THROUGHPUT_VS_RATE = "throughput_vs_rate.png"
TTFT_OVER_TIME = "ttft_over_time.png"

CDF_MAX_POINTS = 5000
"""A CDF with more samples than this is drawn through this many evenly spaced order statistics."""

Series = dict[str, dict[str, tuple[list[float], list[float]]]]
"""Per panel (axes title) of one figure: series label -> (xs, ys) as drawn."""


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
        labels = [
            f"{label} #{i + 1}" if labels.count(label) > 1 else label
            for i, label in enumerate(labels)
        ]
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


_ROWS: list[tuple[str, object]] = [
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
    rows = [[label, *(fn(s) for s in summaries)] for label, fn in _ROWS]  # type: ignore[operator]
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


def print_report(
    run_dirs: Iterable[str | os.PathLike[str]], console: Console | None = None
) -> list[Run]:
    """Load the runs and print the comparison table; returns the loaded runs."""
    console = console or Console()
    runs = load_runs(run_dirs)
    console.print(compare_table(runs))
    return runs


# ---------------------------------------------------------------------------------------------
# Plots


class PlotFiles(list[Path]):
    """The PNG paths ``make_plots`` wrote, with ``series``: figure file name -> panel title ->
    series label -> (xs, ys), read back from the drawn artists."""

    series: dict[str, Series]

    def __init__(self, paths: Iterable[Path] = (), series: dict[str, Series] | None = None):
        super().__init__(paths)
        self.series = series or {}


def _cdf_points(values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    xs = np.sort(np.asarray(values, dtype=float))
    n = xs.size
    ys = np.arange(1, n + 1, dtype=float) / n
    if n > CDF_MAX_POINTS:
        idx = np.unique(np.linspace(0, n - 1, CDF_MAX_POINTS).round().astype(int))
        xs, ys = xs[idx], ys[idx]
    return xs, ys


def rolling_median(values: Sequence[float], window: int) -> np.ndarray:
    """Centered rolling median; the window shrinks at the ends (same length as ``values``)."""
    arr = np.asarray(values, dtype=float)
    n = arr.size
    if n == 0 or window <= 1:
        return arr.copy()
    half = window // 2
    out = np.empty(n, dtype=float)
    if n > 2 * half:
        windows = np.lib.stride_tricks.sliding_window_view(arr, 2 * half + 1)
        out[half : n - half] = np.median(windows, axis=1)
        edges = [*range(half), *range(n - half, n)]
    else:
        edges = list(range(n))
    for i in edges:
        out[i] = np.median(arr[max(0, i - half) : i + half + 1])
    return out


def _median_window(n: int) -> int:
    return max(5, min(101, n // 10)) | 1


def _no_data(ax: Axes, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def _axes_series(ax: Axes) -> dict[str, tuple[list[float], list[float]]]:
    """The labelled lines and scatters of ``ax``, as drawn."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for line in ax.get_lines():
        label = line.get_label()
        if label.startswith("_"):
            continue
        xs = np.asarray(line.get_xdata(), dtype=float)
        ys = np.asarray(line.get_ydata(), dtype=float)
        out[label] = (xs.tolist(), ys.tolist())
    for coll in ax.collections:
        label = coll.get_label()
        if label.startswith("_"):
            continue
        offsets = np.asarray(coll.get_offsets(), dtype=float).reshape(-1, 2)
        out[label] = (offsets[:, 0].tolist(), offsets[:, 1].tolist())
    return out


def _figure_series(fig) -> Series:
    return {ax.get_title(): _axes_series(ax) for ax in fig.axes}


def _latency_cdf(runs: Sequence[Run], labels: list[str]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.5), layout="constrained")
    axes = fig.subplots(1, 3)
    panels = [
        ("TTFT (ms)", lambda recs: [r.ttft_s * 1000.0 for r in recs if r.ttft_s is not None]),
        ("ITL (ms)", lambda recs: [g * 1000.0 for r in recs for g in r.itl_s]),
        ("E2E (ms)", lambda recs: [r.e2e_s * 1000.0 for r in recs if r.e2e_s is not None]),
    ]
    for ax, (title, values_of) in zip(axes, panels, strict=True):
        ax.set_title(title)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if title != "ITL (ms)" else "fraction of gaps")
        drawn = False
        for run, label in zip(runs, labels, strict=True):
            values = values_of([r for r in run.records if r.ok])
            if not values:
                continue
            xs, ys = _cdf_points(values)
            ax.plot(xs, ys, drawstyle="steps-post", label=label)
            drawn = True
        if drawn:
            ax.set_ylim(0, 1.02)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
        else:
            _no_data(ax)
    fig.suptitle("Latency CDFs (ok requests)")
    return fig


def _sweep_x(summaries: list[RunSummary]) -> tuple[str, list[float | None]]:
    """The x axis of a throughput plot: target rate when any run has one, else concurrency."""
    if any(s.target_rate is not None for s in summaries):
        return "target rate (req/s)", [s.target_rate for s in summaries]
    return "concurrency", [
        float(s.concurrency) if s.concurrency is not None else None for s in summaries
    ]


def _sweep_groups(summaries: list[RunSummary]) -> list[tuple[str, list[int]]]:
    """Runs of one sweep share url, model and workload; each group is one line."""
    keys: dict[tuple[str, str, str], list[int]] = {}
    for i, s in enumerate(summaries):
        keys.setdefault((s.url, s.model, s.workload), []).append(i)
    if len(keys) == 1:
        return [("runs", next(iter(keys.values())))]
    urls = {k[0] for k in keys}
    workloads = {k[2] for k in keys}
    groups = []
    for (url, model, workload), idx in keys.items():
        parts = []
        if len(urls) > 1:
            parts.append(url)
        if len(workloads) > 1:
            parts.append(workload)
        if not parts or len({k[1] for k in keys}) > 1:
            parts.append(model)
        groups.append((" ".join(parts), idx))
    return groups


def _throughput_vs_rate(runs: Sequence[Run]):
    from matplotlib.figure import Figure

    summaries = [r.summary for r in runs]
    xlabel, xs_all = _sweep_x(summaries)
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax_tok, ax_req = fig.subplots(1, 2)
    ax_tok.set_title("output tok/s")
    ax_req.set_title("req/s")
    any_goodput = False
    drawn = False
    for group, idx in _sweep_groups(summaries):
        points = sorted((xs_all[i], i) for i in idx if xs_all[i] is not None)
        if not points:
            continue
        xs = [x for x, _ in points]
        ax_tok.plot(xs, [summaries[i].output_token_throughput for _, i in points], "o-", label=group)
        ax_req.plot(
            xs, [summaries[i].request_throughput for _, i in points], "o--", label=f"{group} ok req/s"
        )
        good = [(x, summaries[i].goodput) for x, i in points if summaries[i].goodput is not None]
        if good:
            any_goodput = True
            ax_req.plot(
                [x for x, _ in good], [g for _, g in good], "s-", label=f"{group} goodput"
            )
        drawn = True
    for ax, ylabel in ((ax_tok, "output tokens/s"), (ax_req, "requests/s")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if drawn:
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
            ax.set_ylim(bottom=0)
        else:
            _no_data(ax, "no target rate or concurrency in these runs")
    if drawn and xlabel.startswith("target rate"):
        lo, hi = ax_req.get_xlim()
        ax_req.plot([0, hi], [0, hi], ":", color="gray", linewidth=1, label="_ideal")
        ax_req.set_xlim(lo, hi)
    title = "Throughput and goodput" if any_goodput else "Throughput (no SLO, no goodput)"
    fig.suptitle(f"{title} vs {xlabel.split(' (')[0]}")
    return fig


def _ttft_over_time(runs: Sequence[Run], labels: list[str]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.set_title("TTFT over time")
    ax.set_xlabel("request start (s since run start)")
    ax.set_ylabel("TTFT (ms)")
    drawn = False
    for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
        pts = sorted(
            (r.start_s, r.ttft_s * 1000.0) for r in run.records if r.ok and r.ttft_s is not None
        )
        if not pts:
            continue
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        color = f"C{i % 10}"
        ax.scatter(xs, ys, s=6, alpha=0.35, color=color, label=label)
        med = rolling_median(ys, _median_window(len(ys)))
        ax.plot(xs, med, color=color, linewidth=1.8, label=f"{label} (rolling median)")
        drawn = True
    if drawn:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", markerscale=2)
        ax.set_ylim(bottom=0)
    else:
        _no_data(ax)
    return fig


def make_plots(runs: Sequence[Run], out_dir: str | os.PathLike[str]) -> PlotFiles:
    """Draw the three PNGs into ``out_dir`` (created) and return their paths.

    The result is a list of paths (``latency_cdf.png``, ``throughput_vs_rate.png``,
    ``ttft_over_time.png``) whose ``series`` attribute holds what each figure drew, read from
    its artists: ``{file name: {panel title: {series label: (xs, ys)}}}``. Latency CDFs are of
    ok requests, x in ms, y the cumulative fraction; throughput points are sorted by target
    rate (or concurrency when no run has a rate), one line per url/model/workload.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = run_labels(runs)
    figures = [
        (LATENCY_CDF, _latency_cdf(runs, labels)),
        (THROUGHPUT_VS_RATE, _throughput_vs_rate(runs)),
        (TTFT_OVER_TIME, _ttft_over_time(runs, labels)),
    ]
    result = PlotFiles()
    for name, fig in figures:
        path = out / name
        fig.savefig(path, dpi=110)
        result.append(path)
        result.series[name] = _figure_series(fig)
    return result


def write_report(
    run_dirs: Iterable[str | os.PathLike[str]], out_dir: str | os.PathLike[str]
) -> list[Path]:
    """Write ``report.md`` (the table, the runs and the plots) and the PNGs into ``out_dir``.

    Returns ``[report.md, *pngs]``.
    """
    run_dirs = list(run_dirs)
    runs = load_runs(run_dirs)
    out = Path(out_dir)
    plots = make_plots(runs, out)
    lines = ["# tandem bench report", "", markdown_table(runs), "## Runs", ""]
    for run, label in zip(runs, run_labels(runs), strict=True):
        s = run.summary
        lines.append(
            f"- **{label}**: `{run.path}`, {s.workload} against {s.url} ({s.model}), {s.load}"
        )
    lines += ["", "## Plots", ""]
    for p in plots:
        lines.append(f"![{p.stem}]({p.name})")
        lines.append("")
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return [report, *plots]
