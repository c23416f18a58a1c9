"""Load shapes: fixed concurrency, request rate (Poisson or constant), a trace's own schedule,
and multi-turn users, each bounded by a request count and a duration.

When a bound is reached the runner stops issuing, lets requests in flight finish for up to
``grace_s``, then cancels the rest (recorded as ``cancelled``): no request is left hanging and
every request sent has a record. Warm-up requests go first and are not recorded.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from tandem.bench.client import BenchClient, Outcome
from tandem.bench.records import RequestRecord
from tandem.bench.workloads.request import BenchRequest


@dataclass
class LoadConfig:
    concurrency: int | None = None
    """Closed loop: this many requests in flight at all times."""
    rate: float | None = None
    """Open loop: requests per second."""
    rate_mode: str = "poisson"
    """``poisson`` (exponential gaps) or ``constant`` (1/rate apart)."""
    max_concurrency: int | None = None
    """Rate mode: cap on requests in flight (None: no cap)."""
    fixed_schedule: bool = False
    """Send each request at its own ``timestamp_s`` (trace replay)."""
    num_requests: int | None = None
    """Stop issuing after this many (None: when the workload runs out)."""
    duration_s: float | None = None
    """Stop issuing after this many seconds."""
    warmup_requests: int = 0
    """Sent first, one at a time, and not recorded."""
    grace_s: float = 30.0
    """After a bound is reached, how long requests in flight may take before they are cancelled."""
    seed: int = 0

    def __post_init__(self) -> None:
        shapes = sum(
            x is not None and x is not False for x in (self.concurrency, self.rate, self.fixed_schedule or None)
        )
        if shapes > 1:
            raise ValueError("choose one load shape: concurrency, rate, or a fixed schedule")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"rate must be positive, got {self.rate}")
        if self.rate_mode not in ("poisson", "constant"):
            raise ValueError(f"rate_mode must be poisson or constant, got {self.rate_mode!r}")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests must be at least 1, got {self.num_requests}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"duration_s must be positive, got {self.duration_s}")

    def describe(self) -> str:
        if self.fixed_schedule:
            return "trace schedule"
        if self.rate is not None:
            return f"rate={self.rate:g}/s {self.rate_mode}"
        return f"concurrency={self.concurrency or 1}"


class Session(Protocol):
    """A simulated multi-turn user (see workload_multi_turn.UserSession)."""

    def first_request(self) -> BenchRequest: ...

    def next_request(self, answer_token_ids: list[int]) -> BenchRequest | None: ...


class ProgressSink(Protocol):
    def update(self, records: list[RequestRecord], elapsed_s: float) -> None: ...


@dataclass
class RunResult:
    records: list[RequestRecord]
    started_at: float
    """Unix time of the start (after warm-up)."""
    duration_s: float
    cpu_percent: float = 0.0
    """CPU this process used during the run (warm-up excluded), percent of one core."""


@dataclass
class _State:
    start: float = 0.0
    issued: int = 0
    records: list[RequestRecord] = field(default_factory=list)
    tasks: set[asyncio.Task[object]] = field(default_factory=set)
    """Requests, client loops and user slots still running."""


class Runner:
    def __init__(self, client: BenchClient, load: LoadConfig, progress: ProgressSink | None = None) -> None:
        self.client, self.load, self.progress = client, load, progress
        self._rng = random.Random(load.seed)
        self._s = _State()

    # --- bounds -----------------------------------------------------------------------------

    def _may_issue(self) -> bool:
        load, s = self.load, self._s
        if load.num_requests is not None and s.issued >= load.num_requests:
            return False
        return load.duration_s is None or time.perf_counter() - s.start < load.duration_s

    def _remaining_s(self) -> float | None:
        if self.load.duration_s is None:
            return None
        return max(0.0, self.load.duration_s - (time.perf_counter() - self._s.start))

    # --- one request --------------------------------------------------------------------------

    async def _send(self, request: BenchRequest) -> Outcome:
        index = self._s.issued
        self._s.issued += 1
        start = time.perf_counter()
        try:
            outcome = await self.client.send(request)
        except asyncio.CancelledError:
            outcome = Outcome(ok=False, start=start, error="cancelled", error_detail="stopped at the end of the run")
        self._s.records.append(_record(index, start - self._s.start, request, outcome))
        if self.progress is not None:
            self.progress.update(self._s.records, time.perf_counter() - self._s.start)
        return outcome

    def _spawn(self, request: BenchRequest) -> asyncio.Task[Outcome]:
        task = asyncio.ensure_future(self._send(request))
        self._s.tasks.add(task)
        task.add_done_callback(self._s.tasks.discard)
        return task

    async def _warm_up(self, warmup: list[BenchRequest]) -> None:
        for request in warmup[: self.load.warmup_requests]:
            await self.client.send(request)

    def _begin(self) -> float:
        self._s = _State(start=time.perf_counter())
        self._cpu0 = _cpu_seconds()
        return time.time()

    async def _finish(self, started_at: float) -> RunResult:
        """Wait for requests in flight (up to grace_s), cancel the rest."""
        pending = set(self._s.tasks)
        if pending:
            _, late = await asyncio.wait(pending, timeout=self.load.grace_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.gather(*late, return_exceptions=True)
        duration = time.perf_counter() - self._s.start
        records = sorted(self._s.records, key=lambda r: r.index)
        cpu = 100.0 * (_cpu_seconds() - self._cpu0) / max(duration, 1e-9)
        return RunResult(records, started_at, duration, cpu)

    # --- load shapes ----------------------------------------------------------------------------

    async def run(self, requests: Iterable[BenchRequest], warmup: list[BenchRequest] | None = None) -> RunResult:
        """Run the workload's requests (in order, possibly endless) under the configured load shape."""
        await self._warm_up(warmup or [])
        started_at = self._begin()
        feed: Iterator[BenchRequest] = iter(requests)
        if self.load.fixed_schedule or self.load.rate is not None:
            await self._open_loop(feed)
        else:
            await self._closed_loop(feed, self.load.concurrency or 1)
        return await self._finish(started_at)

    async def _closed_loop(self, feed: Iterator[BenchRequest], concurrency: int) -> None:
        async def client_loop() -> None:
            while self._may_issue():
                request = next(feed, None)
                if request is None:
                    return
                await self._send(request)

        loops = [asyncio.ensure_future(client_loop()) for _ in range(concurrency)]
        self._s.tasks.update(loops)
        remaining = self._remaining_s()
        # Stop at the duration even if requests are still running (they then get grace_s).
        await asyncio.wait(loops, timeout=remaining)

    async def _open_loop(self, feed: Iterator[BenchRequest]) -> None:
        limit = asyncio.Semaphore(self.load.max_concurrency) if self.load.max_concurrency else None
        due = 0.0
        for request in feed:
            if not self._may_issue():
                break
            due = self._next_due(due, request)
            delay = self._s.start + due - time.perf_counter()
            if delay > 0:
                remaining = self._remaining_s()
                if remaining is not None and delay >= remaining:
                    break
                await asyncio.sleep(delay)
            if limit is not None:
                await limit.acquire()
                self._spawn(request).add_done_callback(lambda _: limit.release())
            else:
                self._spawn(request)

    def _next_due(self, due: float, request: BenchRequest) -> float:
        if self.load.fixed_schedule:
            return request.timestamp_s or 0.0
        assert self.load.rate is not None
        gap = self._rng.expovariate(self.load.rate) if self.load.rate_mode == "poisson" else 1.0 / self.load.rate
        return due + gap

    async def run_sessions(
        self,
        new_session: Callable[[int], Session],
        num_users: int,
        user_gap_s: float,
        answer_tokens: Callable[[Outcome, BenchRequest], list[int]],
        warmup: list[BenchRequest] | None = None,
    ) -> RunResult:
        """Multi-turn: ``num_users`` users at a time, each sending its next turn ``user_gap_s``
        after the previous one (or when its answer is back, if later); a user who finished its
        rounds is replaced by a new one. User starts are staggered across one gap."""
        await self._warm_up(warmup or [])
        started_at = self._begin()
        next_user = iter(range(1 << 62))

        async def user_slot(slot: int) -> None:
            await asyncio.sleep(slot * user_gap_s / num_users)
            while self._may_issue():
                session = new_session(next(next_user))
                request: BenchRequest | None = session.first_request()
                while request is not None and self._may_issue():
                    sent = time.perf_counter()
                    outcome = await self._send(request)
                    if not outcome.ok:
                        break
                    request = session.next_request(answer_tokens(outcome, request))
                    await asyncio.sleep(max(0.0, sent + user_gap_s - time.perf_counter()))

        slots = [asyncio.ensure_future(user_slot(i)) for i in range(num_users)]
        self._s.tasks.update(slots)
        await asyncio.wait(slots, timeout=self._remaining_s())
        return await self._finish(started_at)


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _record(index: int, start_s: float, request: BenchRequest, outcome: Outcome) -> RequestRecord:
    return RequestRecord(
        index=index,
        start_s=start_s,
        ok=outcome.ok,
        ttft_s=outcome.ttft_s,
        e2e_s=outcome.e2e_s,
        itl_s=outcome.itl_s,
        input_tokens=outcome.input_tokens or request.input_tokens,
        output_tokens=outcome.output_tokens or 0,
        cached_tokens=outcome.cached_tokens,
        error=outcome.error,
        error_detail=outcome.error_detail,
        session_id=request.session_id,
        turn=request.turn,
    )


class LiveStats:
    """Running figures for the progress bar: TTFT p50 of the latest requests, throughput, errors."""

    def __init__(self, window: int = 200) -> None:
        self._ttft: deque[float] = deque(maxlen=window)
        self._seen = 0
        self.output_tokens = 0
        self.errors = 0

    def line(self, records: list[RequestRecord], elapsed_s: float) -> str:
        for record in records[self._seen :]:
            if record.ok and record.ttft_s is not None:
                self._ttft.append(record.ttft_s)
                self.output_tokens += record.output_tokens
            elif not record.ok:
                self.errors += 1
        self._seen = len(records)
        ttft = f"{statistics.median(self._ttft) * 1e3:.0f} ms" if self._ttft else "-"
        rate = self.output_tokens / elapsed_s if elapsed_s > 0 else 0.0
        return f"TTFT p50 {ttft} · {rate:,.0f} out tok/s · errors {self.errors}"


def describe_settings(obj: Any) -> dict[str, Any]:
    """A dataclass config as a JSON-friendly dict (for summary.settings)."""
    return {k: v for k, v in vars(obj).items() if isinstance(v, (int, float, str, bool, type(None), list, dict))}
