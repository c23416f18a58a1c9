"""tandem.bench.run_files, tables, plots and report: summaries, run directories, table, plots."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from tandem.bench.plots import LATENCY_CDF, THROUGHPUT_VS_RATE, TTFT_OVER_TIME, make_plots, rolling_median
from tandem.bench.records import RequestRecord, RunSummary
from tandem.bench.report import write_report
from tandem.bench.run_files import (
    CSV_COLUMNS,
    RunFileError,
    load_run,
    meets_slo,
    parse_slo,
    percentiles,
    summarize,
    write_run,
)
from tandem.bench.tables import Run, compare_table, load_runs, markdown_table, print_report, run_labels

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
N_OK = 11


def make_records(n_ok: int = N_OK, *, ttft_offset_ms: float = 0.0) -> list[RequestRecord]:
    """``n_ok`` ok requests with ttft = 100, 110, ... ms (0.1..0.2 s for 11), e2e = ttft + 500 ms,
    itl gaps [20, 30] ms for even i and [40, 60] ms for odd i; then two failures."""
    records = []
    for i in range(n_ok):
        ttft = (100.0 + 10.0 * i + ttft_offset_ms) / 1000.0
        itl = [0.020, 0.030] if i % 2 == 0 else [0.040, 0.060]
        records.append(
            RequestRecord(
                index=i,
                start_s=0.5 * i,
                ok=True,
                ttft_s=ttft,
                e2e_s=ttft + 0.5,
                itl_s=itl,
                input_tokens=100,
                output_tokens=3,
                cached_tokens=50 if i % 2 == 0 else 0,
                session_id=f"user-{i % 3}",
                turn=i // 3,
            )
        )
    records.append(RequestRecord(index=n_ok, start_s=0.5 * n_ok, ok=False, error="timeout", input_tokens=100))
    records.append(
        RequestRecord(
            index=n_ok + 1,
            start_s=0.5 * n_ok + 0.1,
            ok=False,
            error="http_5xx",
            error_detail="503 no workers",
        )
    )
    return records


def make_summary(records, *, name="run-a", duration_s=10.0, **kw) -> RunSummary:
    return summarize(
        records,
        name=name,
        url=kw.pop("url", "http://127.0.0.1:8000/v1"),
        model="smollm2-135m-instruct",
        workload="random",
        load=kw.pop("load", "concurrency=4"),
        settings={"input_len": 100, "output_len": 3},
        started_at=1_700_000_000.0,
        duration_s=duration_s,
        **kw,
    )


# ---------------------------------------------------------------------------------------------
# summarize


def test_percentiles_hand_values():
    records = make_records()
    s = make_summary(records)
    # TTFT 100, 110, ..., 200 ms: linear interpolation over 11 evenly spaced values.
    assert s.ttft_ms is not None
    assert s.ttft_ms.mean == pytest.approx(150.0)
    assert s.ttft_ms.p50 == pytest.approx(150.0)
    assert s.ttft_ms.p90 == pytest.approx(190.0)
    assert s.ttft_ms.p99 == pytest.approx(199.0)
    assert s.ttft_ms.min == pytest.approx(100.0)
    assert s.ttft_ms.max == pytest.approx(200.0)
    assert s.e2e_ms is not None
    assert s.e2e_ms.p50 == pytest.approx(650.0)
    assert s.e2e_ms.p99 == pytest.approx(699.0)

    ttfts = np.array([r.ttft_s * 1000 for r in records if r.ok])
    for q, attr in ((50, "p50"), (90, "p90"), (99, "p99")):
        assert getattr(s.ttft_ms, attr) == pytest.approx(float(np.percentile(ttfts, q)))


def test_itl_percentiles_over_all_gaps_of_ok_requests():
    records = make_records()
    s = make_summary(records)
    gaps = np.array([g * 1000 for r in records if r.ok for g in r.itl_s])
    assert gaps.size == 2 * N_OK
    assert s.itl_ms is not None
    assert s.itl_ms.mean == pytest.approx(float(gaps.mean()))
    assert s.itl_ms.p50 == pytest.approx(float(np.percentile(gaps, 50)))
    assert s.itl_ms.p90 == pytest.approx(float(np.percentile(gaps, 90)))
    assert s.itl_ms.p99 == pytest.approx(float(np.percentile(gaps, 99)))
    assert (s.itl_ms.min, s.itl_ms.max) == pytest.approx((20.0, 60.0))
    # 6 even requests give [20, 30], 5 odd give [40, 60]: sorted 20x6, 30x6, 40x5, 60x5.
    assert s.itl_ms.p50 == pytest.approx(30.0)


def test_totals_throughputs_and_errors():
    records = make_records()
    s = make_summary(records, duration_s=10.0)
    assert s.requests_sent == N_OK + 2
    assert s.requests_ok == N_OK
    assert s.errors == {"timeout": 1, "http_5xx": 1}
    assert s.request_throughput == pytest.approx(N_OK / 10.0)
    assert s.total_output_tokens == 3 * N_OK
    assert s.output_token_throughput == pytest.approx(3 * N_OK / 10.0)
    assert s.total_input_tokens == 100 * N_OK  # ok requests only
    assert s.input_token_throughput == pytest.approx(100 * N_OK / 10.0)
    assert s.total_cached_tokens == 50 * 6
    assert s.output_tokens_per_request is not None
    assert s.output_tokens_per_request.p50 == 3.0
    assert s.goodput is None and s.slo is None


def test_goodput_counts_only_requests_meeting_every_slo():
    records = make_records()
    # TTFT <= 155 ms: i = 0..5 (6 requests). Mean ITL <= 30 ms: even i (25 ms), not odd (50 ms).
    s = make_summary(records, duration_s=4.0, slo={"ttft_ms": 155})
    assert s.goodput == pytest.approx(6 / 4.0)
    s = make_summary(records, duration_s=4.0, slo={"ttft_ms": 155, "itl_ms": 30})
    assert s.goodput == pytest.approx(3 / 4.0)  # i = 0, 2, 4
    assert s.slo == {"ttft_ms": 155.0, "itl_ms": 30.0}
    # E2E <= 625 ms: i = 0, 1, 2 (600, 610, 620 ms).
    s = make_summary(records, duration_s=4.0, slo={"e2e_ms": 625})
    assert s.goodput == pytest.approx(3 / 4.0)
    # Failed requests never count, even with a generous SLO.
    s = make_summary(records, duration_s=1.0, slo={"ttft_ms": 1e9, "itl_ms": 1e9, "e2e_ms": 1e9})
    assert s.goodput == pytest.approx(N_OK)


def test_meets_slo_edge_cases():
    one_token = RequestRecord(index=0, start_s=0, ok=True, ttft_s=0.1, e2e_s=0.1, itl_s=[])
    assert meets_slo(one_token, {"itl_ms": 1.0})  # no gaps: nothing to violate
    no_ttft = RequestRecord(index=0, start_s=0, ok=True, e2e_s=0.1)
    assert not meets_slo(no_ttft, {"ttft_ms": 1000})
    failed = RequestRecord(index=0, start_s=0, ok=False, ttft_s=0.01, error="stream")
    assert not meets_slo(failed, {"ttft_ms": 1000})


def test_slo_validation_and_parse():
    assert parse_slo("ttft_ms=500, itl_ms=50") == {"ttft_ms": 500.0, "itl_ms": 50.0}
    with pytest.raises(ValueError, match="unknown SLO"):
        make_summary(make_records(), slo={"tpot_ms": 5})
    for bad in ("ttft_ms", "ttft_ms=abc", "", "ttft_ms=-1"):
        with pytest.raises(ValueError):
            parse_slo(bad)


def test_no_ok_requests_gives_none_percentiles():
    records = [RequestRecord(index=i, start_s=i, ok=False, error="connection") for i in range(3)]
    s = make_summary(records, slo={"ttft_ms": 100})
    assert s.ttft_ms is None and s.itl_ms is None and s.e2e_ms is None
    assert s.output_tokens_per_request is None
    assert s.requests_ok == 0 and s.errors == {"connection": 3}
    assert s.request_throughput == 0.0 and s.goodput == 0.0
    # Zero duration does not divide by zero.
    assert make_summary(make_records(), duration_s=0.0).request_throughput == 0.0
    assert percentiles([]) is None


# ---------------------------------------------------------------------------------------------
# Run directories


def test_write_load_round_trip(tmp_path: Path):
    records = make_records()
    summary = make_summary(records, slo={"ttft_ms": 155}, target_rate=2.0, client_cpu_percent=12.5)
    run_dir = write_run(tmp_path / "nested" / "run-a", summary, records)
    assert {p.name for p in run_dir.iterdir()} == {"summary.json", "requests.jsonl", "requests.csv"}
    assert (run_dir / "summary.json").read_text().count("\n") > 10  # indented
    loaded_summary, loaded_records = load_run(run_dir)
    assert loaded_summary == summary
    assert loaded_records == records
    # The summary.json path works too.
    assert load_run(run_dir / "summary.json")[0] == summary

    rows = list(csv.DictReader(io.StringIO((run_dir / "requests.csv").read_text())))
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    assert len(rows) == len(records)
    assert float(rows[1]["ttft_s"]) == records[1].ttft_s
    assert float(rows[1]["itl_mean_s"]) == pytest.approx(0.05)
    assert rows[1]["ok"] == "True" and rows[1]["session_id"] == "user-1" and rows[1]["turn"] == "0"
    assert rows[-1]["ok"] == "False" and rows[-1]["error"] == "http_5xx"
    assert rows[-1]["ttft_s"] == "" and rows[-1]["itl_mean_s"] == "" and rows[-1]["turn"] == ""


def test_load_run_errors(tmp_path: Path):
    with pytest.raises(RunFileError, match="no such run directory"):
        load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFileError, match="no summary.json"):
        load_run(tmp_path / "empty")

    records = make_records()
    run_dir = write_run(tmp_path / "run", make_summary(records), records)
    (run_dir / "summary.json").write_text('{"name": "x", "truncated')
    with pytest.raises(RunFileError, match="corrupt run summary"):
        load_run(run_dir)
    (run_dir / "summary.json").write_text('{"name": "x"}')  # valid JSON, wrong shape
    with pytest.raises(RunFileError, match="corrupt run summary"):
        load_run(run_dir)
    assert issubclass(RunFileError, ValueError)

    run_dir = write_run(tmp_path / "run2", make_summary(records), records)
    lines = (run_dir / "requests.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-5]
    (run_dir / "requests.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(RunFileError, match=r"requests\.jsonl:3: corrupt request record"):
        load_run(run_dir)
    (run_dir / "requests.jsonl").unlink()
    with pytest.raises(RunFileError, match="no requests.jsonl"):
        load_run(run_dir)


# ---------------------------------------------------------------------------------------------
# Report: table and plots


@pytest.fixture
def sweep_dirs(tmp_path: Path) -> list[Path]:
    """Three saved runs of a rate sweep, written out of rate order."""
    dirs = []
    for rate, offset in ((4.0, 80.0), (1.0, 0.0), (2.0, 30.0)):
        records = make_records(ttft_offset_ms=offset)
        summary = make_summary(
            records,
            name=f"rate-{rate:g}",
            load=f"rate={rate}/s poisson",
            duration_s=10.0 / rate,
            slo={"ttft_ms": 155},
            target_rate=rate,
        )
        dirs.append(write_run(tmp_path / "runs" / f"rate-{rate:g}", summary, records))
    return dirs


def _render(table) -> str:
    console = Console(file=io.StringIO(), width=250, color_system=None)
    console.print(table)
    return console.file.getvalue()


def test_compare_table_one_column_per_run(sweep_dirs):
    runs = load_runs(sweep_dirs)
    table = compare_table(runs)
    headers = [str(c.header) for c in table.columns]
    assert headers == ["metric", "rate-4", "rate-1", "rate-2"]
    text = _render(table)
    for needle in ("rate-4", "rate-1", "rate-2", "TTFT p50 (ms)", "goodput", "11/13", "client CPU"):
        assert needle in text
    # The TTFT p50 row holds each run's p50 (150 ms + offset).
    metric_col = list(table.columns[0].cells)
    row = metric_col.index("TTFT p50 (ms)")
    assert [list(c.cells)[row] for c in table.columns[1:]] == ["230.0", "150.0", "180.0"]
    errors_row = metric_col.index("errors")
    assert list(table.columns[1].cells)[errors_row] == "http_5xx 1, timeout 1"
    # Summaries alone are enough for the table.
    assert len(compare_table([r.summary for r in runs]).columns) == 4

    console = Console(file=io.StringIO(), width=250, color_system=None)
    printed = print_report(sweep_dirs, console)
    assert len(printed) == 3 and "rate-1" in console.file.getvalue()


def test_duplicate_run_names_get_unique_labels(tmp_path):
    records = make_records()
    a = write_run(tmp_path / "a", make_summary(records, name="same"), records)
    b = write_run(tmp_path / "b", make_summary(records, name="same"), records)
    runs = load_runs([a, b])
    assert run_labels(runs) == ["same (a)", "same (b)"]
    assert run_labels([r.summary for r in runs]) == ["same #1", "same #2"]


def test_make_plots_writes_pngs_with_expected_series(sweep_dirs, tmp_path):
    runs = load_runs(sweep_dirs)
    plots = make_plots(runs, tmp_path / "plots")
    assert [p.name for p in plots] == [LATENCY_CDF, THROUGHPUT_VS_RATE, TTFT_OVER_TIME]
    for p in plots:
        data = p.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)

    cdf = plots.series[LATENCY_CDF]
    assert set(cdf) == {"TTFT (ms)", "ITL (ms)", "E2E (ms)"}
    for run in runs:
        name = run.summary.name
        ok = [r for r in run.records if r.ok]
        xs, ys = cdf["TTFT (ms)"][name]
        assert xs == pytest.approx(sorted(r.ttft_s * 1000 for r in ok))
        assert ys == pytest.approx([(i + 1) / len(ok) for i in range(len(ok))])
        xs, _ = cdf["ITL (ms)"][name]
        assert xs == pytest.approx(sorted(g * 1000 for r in ok for g in r.itl_s))
        xs, _ = cdf["E2E (ms)"][name]
        assert xs == pytest.approx(sorted(r.e2e_s * 1000 for r in ok))

    tput = plots.series[THROUGHPUT_VS_RATE]
    by_rate = sorted(runs, key=lambda r: r.summary.target_rate)
    xs, ys = tput["output tok/s"]["runs"]
    assert xs == [1.0, 2.0, 4.0]
    assert ys == pytest.approx([r.summary.output_token_throughput for r in by_rate])
    xs, ys = tput["req/s"]["runs goodput"]
    assert xs == [1.0, 2.0, 4.0]
    # ttft <= 155 ms: 6 requests at offset 0, 3 at +30 ms, none at +80 ms.
    assert ys == pytest.approx([6 / 10.0, 3 / 5.0, 0.0])
    xs, ys = tput["req/s"]["runs ok req/s"]
    assert ys == pytest.approx([r.summary.request_throughput for r in by_rate])

    over_time = plots.series[TTFT_OVER_TIME]["TTFT over time"]
    for run in runs:
        name = run.summary.name
        ok = [r for r in run.records if r.ok]
        xs, ys = over_time[name]
        assert xs == pytest.approx([r.start_s for r in ok])
        assert ys == pytest.approx([r.ttft_s * 1000 for r in ok])
        mxs, mys = over_time[f"{name} (rolling median)"]
        assert mxs == pytest.approx(xs) and len(mys) == len(ys)


def test_throughput_plot_falls_back_to_concurrency(tmp_path):
    runs = []
    for conc in (16, 4, 8):
        records = make_records()
        summary = make_summary(records, name=f"c{conc}", concurrency=conc, duration_s=conc / 4)
        runs.append(Run(summary, records))
    plots = make_plots(runs, tmp_path)
    xs, ys = plots.series[THROUGHPUT_VS_RATE]["output tok/s"]["runs"]
    assert xs == [4.0, 8.0, 16.0]
    assert ys == pytest.approx([3 * N_OK / (c / 4) for c in (4, 8, 16)])
    assert "runs goodput" not in plots.series[THROUGHPUT_VS_RATE]["req/s"]  # no SLO


def test_make_plots_with_a_run_without_ok_requests(tmp_path):
    failed = [RequestRecord(index=0, start_s=0.0, ok=False, error="connection")]
    runs = [Run(make_summary(failed, name="down"), failed)]
    plots = make_plots(runs, tmp_path)
    assert all(p.read_bytes().startswith(PNG_SIGNATURE) for p in plots)
    assert plots.series[LATENCY_CDF]["TTFT (ms)"] == {}


def test_rolling_median():
    assert rolling_median([1, 100, 2, 3, 4], 3).tolist() == [50.5, 2.0, 3.0, 3.0, 3.5]
    assert rolling_median([5.0, 1.0], 1).tolist() == [5.0, 1.0]
    assert rolling_median([], 5).tolist() == []


def test_write_report(sweep_dirs, tmp_path):
    paths = write_report(sweep_dirs, tmp_path / "report")
    assert [p.name for p in paths] == ["report.md", LATENCY_CDF, THROUGHPUT_VS_RATE, TTFT_OVER_TIME]
    assert all(p.parent == tmp_path / "report" and p.stat().st_size > 0 for p in paths)
    md = paths[0].read_text()
    assert "| metric | rate-4 | rate-1 | rate-2 |" in md
    assert f"![latency_cdf]({LATENCY_CDF})" in md
    assert markdown_table(load_runs(sweep_dirs)) in md
