"""`tandem bench report --output DIR`: the comparison table and the plots, as ``report.md`` beside the PNGs."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tandem.bench.plots import make_plots
from tandem.bench.tables import load_runs, markdown_table, run_labels


def write_report(run_dirs: Iterable[str | os.PathLike[str]], out_dir: str | os.PathLike[str]) -> list[Path]:
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
        lines.append(f"- **{label}**: `{run.path}`, {s.workload} against {s.url} ({s.model}), {s.load}")
    lines += ["", "## Plots", ""]
    for p in plots:
        lines.append(f"![{p.stem}]({p.name})")
        lines.append("")
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return [report, *plots]
