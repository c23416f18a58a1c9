"""`tandem bench report` plots: latency CDFs, throughput against rate, TTFT over time.

``make_plots`` draws ``latency_cdf.png``, ``throughput_vs_rate.png`` and ``ttft_over_time.png``
with matplotlib's Agg renderer (no display needed), and reads back what it drew (for tests).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tandem.bench.records import RequestRecord, RunSummary
from tandem.bench.tables import Run, run_labels

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

LATENCY_CDF = "latency_cdf.png"
THROUGHPUT_VS_RATE = "throughput_vs_rate.png"
TTFT_OVER_TIME = "ttft_over_time.png"

CDF_MAX_POINTS = 5000
"""A CDF with more samples than this is drawn through this many evenly spaced order statistics."""

Series = dict[str, dict[str, tuple[list[float], list[float]]]]
"""Per panel (axes title) of one figure: series label -> (xs, ys) as drawn."""


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
        if not isinstance(label, str) or label.startswith("_"):  # unlabelled
            continue
        xs = np.asarray(line.get_xdata(), dtype=float)
        ys = np.asarray(line.get_ydata(), dtype=float)
        out[label] = (xs.tolist(), ys.tolist())
    for coll in ax.collections:
        label = coll.get_label()
        if not isinstance(label, str) or label.startswith("_"):  # unlabelled
            continue
        offsets = np.asarray(coll.get_offsets(), dtype=float).reshape(-1, 2)
        out[label] = (offsets[:, 0].tolist(), offsets[:, 1].tolist())
    return out


def _figure_series(fig: Figure) -> Series:
    return {ax.get_title(): _axes_series(ax) for ax in fig.axes}


def _latency_cdf(runs: Sequence[Run], labels: list[str]) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.5), layout="constrained")
    axes = fig.subplots(1, 3)
    panels: list[tuple[str, Callable[[list[RequestRecord]], list[float]]]] = [
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
    return "concurrency", [float(s.concurrency) if s.concurrency is not None else None for s in summaries]


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


def _throughput_vs_rate(runs: Sequence[Run]) -> Figure:
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
        ax_req.plot(xs, [summaries[i].request_throughput for _, i in points], "o--", label=f"{group} ok req/s")
        good = [(x, summaries[i].goodput) for x, i in points if summaries[i].goodput is not None]
        if good:
            any_goodput = True
            ax_req.plot([x for x, _ in good], [g for _, g in good], "s-", label=f"{group} goodput")
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


def _ttft_over_time(runs: Sequence[Run], labels: list[str]) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.set_title("TTFT over time")
    ax.set_xlabel("request start (s since run start)")
    ax.set_ylabel("TTFT (ms)")
    drawn = False
    for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
        pts = sorted((r.start_s, r.ttft_s * 1000.0) for r in run.records if r.ok and r.ttft_s is not None)
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
