"""A run directory on disk, and the summary computed from a run's request records.

``write_run`` writes ``requests.jsonl``, ``requests.csv`` and then ``summary.json`` (each through a
temporary file and a rename, so a directory with a ``summary.json`` is complete); ``load_run``
reads one back and says clearly what is wrong with a missing or corrupt one. ``summarize`` turns
records into a :class:`RunSummary`: percentiles, throughputs, totals, errors by kind, goodput.
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from tandem.bench.records import Percentiles, RequestRecord, RunSummary

SUMMARY_FILE = "summary.json"
REQUESTS_JSONL = "requests.jsonl"
REQUESTS_CSV = "requests.csv"

CSV_COLUMNS = (
    "index",
    "start_s",
    "ok",
    "ttft_s",
    "e2e_s",
    "itl_mean_s",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "error",
    "session_id",
    "turn",
)

SLO_KEYS = ("ttft_ms", "itl_ms", "e2e_ms")
"""``ttft_ms``: time to first token; ``itl_ms``: the request's mean inter-token latency;
``e2e_ms``: end-to-end latency. A request meets the SLOs when it is ok and at or under each."""

_encoder = msgspec.json.Encoder()
_record_decoder = msgspec.json.Decoder(RequestRecord)
_summary_decoder = msgspec.json.Decoder(RunSummary)


class RunFileError(ValueError):
    """A run directory is missing, incomplete or holds a file that does not decode."""


# ---------------------------------------------------------------------------------------------
# Writing and reading run directories


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _mean_itl(record: RequestRecord) -> float | None:
    return sum(record.itl_s) / len(record.itl_s) if record.itl_s else None


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def records_csv(records: Iterable[RequestRecord]) -> str:
    """The records as CSV text with the flat :data:`CSV_COLUMNS` (empty cell for None)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in records:
        row = (
            r.index,
            r.start_s,
            r.ok,
            r.ttft_s,
            r.e2e_s,
            _mean_itl(r),
            r.input_tokens,
            r.output_tokens,
            r.cached_tokens,
            r.error,
            r.session_id,
            r.turn,
        )
        writer.writerow([_csv_cell(v) for v in row])
    return out.getvalue()


def write_run(directory: str | os.PathLike[str], summary: RunSummary, records: Sequence[RequestRecord]) -> Path:
    """Write a run directory (created if needed) and return its path.

    ``requests.jsonl`` holds one :class:`RequestRecord` per line, ``requests.csv`` the same flat,
    ``summary.json`` the summary, indented. The summary is written last.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    buf = bytearray()
    for r in records:
        _encoder.encode_into(r, buf, len(buf))
        buf.extend(b"\n")
    _write_atomic(path / REQUESTS_JSONL, bytes(buf))
    _write_atomic(path / REQUESTS_CSV, records_csv(records).encode())
    pretty = msgspec.json.format(_encoder.encode(summary), indent=2)
    _write_atomic(path / SUMMARY_FILE, pretty + b"\n")
    return path


def load_summary(directory: str | os.PathLike[str]) -> RunSummary:
    """Read only ``summary.json`` of a run directory (or the file itself)."""
    path = _run_dir(directory)
    file = path / SUMMARY_FILE
    if not file.is_file():
        raise RunFileError(f"{path}: no {SUMMARY_FILE} (not a finished `tandem bench run` directory)")
    try:
        return _summary_decoder.decode(file.read_bytes())
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise RunFileError(f"{file}: corrupt run summary: {e}") from e


def load_run(directory: str | os.PathLike[str]) -> tuple[RunSummary, list[RequestRecord]]:
    """Read a run directory back: its summary and its request records, in file order.

    ``directory`` may also be the path of its ``summary.json``. Raises :class:`RunFileError`
    when the directory or a file is missing or a file does not decode (with the line number).
    """
    path = _run_dir(directory)
    summary = load_summary(path)
    file = path / REQUESTS_JSONL
    if not file.is_file():
        raise RunFileError(f"{path}: no {REQUESTS_JSONL} (incomplete run directory)")
    records: list[RequestRecord] = []
    with file.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(_record_decoder.decode(line))
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                raise RunFileError(f"{file}:{lineno}: corrupt request record: {e}") from e
    return summary, records


def _run_dir(directory: str | os.PathLike[str]) -> Path:
    path = Path(directory)
    if path.is_file() and path.name == SUMMARY_FILE:
        path = path.parent
    if not path.exists():
        raise RunFileError(f"{path}: no such run directory")
    if not path.is_dir():
        raise RunFileError(f"{path}: not a run directory")
    return path


# ---------------------------------------------------------------------------------------------
# Summarizing


def percentiles(values: Iterable[float]) -> Percentiles | None:
    """mean/p50/p90/p99/min/max of ``values`` (numpy's linear interpolation); None when empty."""
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float)
    if arr.size == 0:
        return None
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return Percentiles(
        mean=float(arr.mean()),
        p50=float(p50),
        p90=float(p90),
        p99=float(p99),
        min=float(arr.min()),
        max=float(arr.max()),
    )


def check_slo(slo: Mapping[str, float]) -> dict[str, float]:
    """Validate SLO keys (:data:`SLO_KEYS`) and values; returns a plain ``dict`` of floats."""
    out: dict[str, float] = {}
    for key, value in slo.items():
        if key not in SLO_KEYS:
            raise ValueError(f"unknown SLO {key!r}: expected one of {', '.join(SLO_KEYS)}")
        value = float(value)
        if not value > 0:
            raise ValueError(f"SLO {key} must be > 0, got {value}")
        out[key] = value
    return out


def parse_slo(text: str) -> dict[str, float]:
    """Parse ``"ttft_ms=500,itl_ms=50"`` (the ``--slo`` option) into a checked dict."""
    pairs: dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"bad SLO {part!r}: expected KEY=VALUE, e.g. ttft_ms=500")
        try:
            pairs[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"bad SLO value in {part!r}: not a number") from None
    if not pairs:
        raise ValueError("empty SLO: expected e.g. ttft_ms=500,itl_ms=50")
    return check_slo(pairs)


def meets_slo(record: RequestRecord, slo: Mapping[str, float]) -> bool:
    """Whether an ok request is at or under every SLO. A request with no ITL gaps (one output
    token) meets ``itl_ms``; a missing TTFT or E2E fails its SLO."""
    if not record.ok:
        return False
    for key, limit in slo.items():
        if key == "ttft_ms":
            if record.ttft_s is None or record.ttft_s * 1000.0 > limit:
                return False
        elif key == "e2e_ms":
            if record.e2e_s is None or record.e2e_s * 1000.0 > limit:
                return False
        elif key == "itl_ms":
            itl = _mean_itl(record)
            if itl is not None and itl * 1000.0 > limit:
                return False
        else:
            raise ValueError(f"unknown SLO {key!r}: expected one of {', '.join(SLO_KEYS)}")
    return True


def summarize(
    records: Sequence[RequestRecord],
    *,
    name: str,
    url: str,
    model: str,
    workload: str,
    load: str,
    settings: dict[str, Any],
    started_at: float,
    duration_s: float,
    slo: Mapping[str, float] | None = None,
    client_cpu_percent: float = 0.0,
    target_rate: float | None = None,
    concurrency: int | None = None,
) -> RunSummary:
    """Summarize a run's records.

    Latency percentiles are in ms over ok requests (ITL over every gap of every ok request);
    throughputs and token totals count ok requests only, per second of ``duration_s`` (0 when
    the duration is not positive). Failed requests count in ``errors`` by kind (``unknown`` when
    a record has none). ``goodput`` (with ``slo``) is ok requests meeting every SLO per second.
    """
    ok = [r for r in records if r.ok]
    errors = Counter(r.error or "unknown" for r in records if not r.ok)
    per_s = (1.0 / duration_s) if duration_s > 0 else 0.0

    total_in = sum(r.input_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    total_cached = sum(r.cached_tokens for r in ok)

    slo_dict = check_slo(slo) if slo is not None else None
    goodput = None
    if slo_dict is not None:
        goodput = sum(1 for r in ok if meets_slo(r, slo_dict)) * per_s

    return RunSummary(
        name=name,
        url=url,
        model=model,
        workload=workload,
        load=load,
        settings=settings,
        started_at=started_at,
        duration_s=duration_s,
        requests_sent=len(records),
        requests_ok=len(ok),
        errors=dict(errors.most_common()),
        request_throughput=len(ok) * per_s,
        output_token_throughput=total_out * per_s,
        input_token_throughput=total_in * per_s,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        total_cached_tokens=total_cached,
        ttft_ms=percentiles(r.ttft_s * 1000.0 for r in ok if r.ttft_s is not None),
        itl_ms=percentiles(gap * 1000.0 for r in ok for gap in r.itl_s),
        e2e_ms=percentiles(r.e2e_s * 1000.0 for r in ok if r.e2e_s is not None),
        output_tokens_per_request=percentiles(float(r.output_tokens) for r in ok),
        goodput=goodput,
        slo=slo_dict,
        client_cpu_percent=client_cpu_percent,
        target_rate=target_rate,
        concurrency=concurrency,
    )
