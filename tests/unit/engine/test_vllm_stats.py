"""vLLM's stats in Tandem's terms: `VllmStatsCollector.record` on scheduler and iteration stats
shaped like vLLM's (``SchedulerStats``, ``IterationStats``; fakes, then vLLM's own classes), the
`EngineStats` snapshot (free blocks from the KV usage, hit rate from hits / queries, counters
that accumulate), and the ``StatLoggerBase`` subclass vLLM instantiates."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from tandem.engine.vllm.stats import VllmStatsCollector
from tandem.protocols.endpoints import EngineStats


def _scheduler(
    running: int = 0,
    waiting: int = 0,
    skipped: int = 0,
    usage: float = 0.0,
    queries: int | None = None,
    hits: int = 0,
    connector: dict[str, Any] | None = None,
) -> SimpleNamespace:
    prefix = None if queries is None else SimpleNamespace(requests=1, queries=queries, hits=hits, reset=False)
    return SimpleNamespace(
        num_running_reqs=running,
        num_waiting_reqs=waiting,
        num_skipped_waiting_reqs=skipped,
        kv_cache_usage=usage,
        prefix_cache_stats=prefix,
        kv_connector_stats=connector,
    )


def _iteration(
    generated: int = 0, preempted: int = 0, prompt: int = 0, cached: int = 0, external: int = 0
) -> SimpleNamespace:
    return SimpleNamespace(
        num_generation_tokens=generated,
        num_preempted_reqs=preempted,
        prompt_token_stats=SimpleNamespace(total=prompt, cached_tokens=cached, external_kv_transfer=external),
    )


def test_a_fresh_collector_reports_an_idle_engine() -> None:
    assert VllmStatsCollector(num_total_blocks=100).snapshot() == EngineStats(
        num_running=0,
        num_waiting=0,
        kv_usage=0.0,
        num_total_blocks=100,
        num_free_blocks=100,
        prefix_cache_hit_rate=0.0,
        num_preemptions=0,
        prompt_tokens_total=0,
        cached_prompt_tokens_total=0,
        generation_tokens_total=0,
        steps_total=0,
    )


def test_load_is_the_latest_step_and_counters_accumulate() -> None:
    collector = VllmStatsCollector(num_total_blocks=200)
    collector.record(
        _scheduler(running=3, waiting=2, skipped=1, usage=0.5, queries=64, hits=16), _iteration(1, 0, 40, 16)
    )
    collector.record(_scheduler(running=2, waiting=0, usage=0.25, queries=32, hits=32), _iteration(5, 2, 10, 0, 8))
    stats = collector.snapshot()
    assert (stats.num_running, stats.num_waiting) == (2, 0)  # the latest step's, not summed
    assert stats.kv_usage == 0.25
    assert (stats.num_total_blocks, stats.num_free_blocks) == (200, 150)
    assert stats.prefix_cache_hit_rate == pytest.approx(48 / 96)
    assert stats.num_preemptions == 2
    assert stats.generation_tokens_total == 6
    assert stats.prompt_tokens_total == 50 and stats.cached_prompt_tokens_total == 16
    assert stats.steps_total == 2


def test_waiting_counts_the_skipped_waiting_requests_too() -> None:
    collector = VllmStatsCollector()
    collector.record(_scheduler(waiting=2, skipped=3), None)
    assert collector.snapshot().num_waiting == 5


def test_free_blocks_are_rounded_from_the_usage_and_never_negative() -> None:
    collector = VllmStatsCollector(num_total_blocks=10)
    collector.record(_scheduler(usage=0.33), None)
    assert collector.snapshot().num_free_blocks == 7
    collector.record(_scheduler(usage=0.36), None)
    assert collector.snapshot().num_free_blocks == 6
    collector.record(_scheduler(usage=1.2), None)  # above 1 (rounding on vLLM's side): clamps to 0
    assert collector.snapshot().num_free_blocks == 0
    unsized = VllmStatsCollector()  # before the card knows the pool size
    unsized.record(_scheduler(usage=0.5), None)
    assert (unsized.snapshot().num_total_blocks, unsized.snapshot().num_free_blocks) == (0, 0)


def test_steps_without_prefix_stats_or_queries_keep_the_hit_rate() -> None:
    collector = VllmStatsCollector(num_total_blocks=4)
    collector.record(_scheduler(queries=None), None)
    assert collector.snapshot().prefix_cache_hit_rate == 0.0  # no queries yet: 0, not a division error
    collector.record(_scheduler(queries=10, hits=5), None)
    collector.record(_scheduler(queries=None), None)
    collector.record(_scheduler(queries=0, hits=0), None)
    assert collector.snapshot().prefix_cache_hit_rate == 0.5
    assert collector.snapshot().steps_total == 4


def test_scheduler_and_iteration_stats_may_come_alone() -> None:
    collector = VllmStatsCollector(num_total_blocks=8)
    collector.record(None, _iteration(generated=3, prompt=7))
    stats = collector.snapshot()
    assert stats.steps_total == 0 and stats.generation_tokens_total == 3 and stats.prompt_tokens_total == 7
    collector.record(_scheduler(running=1, usage=0.5), None)
    stats = collector.snapshot()
    assert stats.steps_total == 1 and stats.num_running == 1 and stats.generation_tokens_total == 3
    collector.record(None, None)
    assert collector.snapshot() == stats


def test_kv_connector_counters_are_summed_since_start() -> None:
    collector = VllmStatsCollector()
    assert collector.connector_totals == {}
    collector.record(_scheduler(connector={"blocks_loaded": 3, "load_failures": 0, "blocks_held": 0}), None)
    collector.record(_scheduler(connector=None), None)
    collector.record(_scheduler(connector={"blocks_loaded": 2, "load_failures": 1, "note": "text", "hist": [1]}), None)
    assert collector.connector_totals == {"blocks_loaded": 5, "load_failures": 1, "blocks_held": 0}


def test_vllms_own_stats_classes_are_read() -> None:
    pytest.importorskip("vllm")
    from vllm.v1.metrics.stats import IterationStats, PrefixCacheStats, SchedulerStats

    scheduler = SchedulerStats(
        num_running_reqs=4,
        num_waiting_reqs=1,
        num_skipped_waiting_reqs=2,
        kv_cache_usage=0.75,
        prefix_cache_stats=PrefixCacheStats(requests=2, queries=100, hits=25),
    )
    make_iteration: Any = IterationStats  # vLLM's __init__ is untyped
    iteration = make_iteration()
    iteration.num_generation_tokens = 9
    iteration.num_preempted_reqs = 1
    iteration.prompt_token_stats.total = 30
    iteration.prompt_token_stats.cached_tokens = 20
    iteration.prompt_token_stats.external_kv_transfer = 16
    collector = VllmStatsCollector(num_total_blocks=40)
    collector.record(scheduler, iteration)
    stats = collector.snapshot()
    assert (stats.num_running, stats.num_waiting, stats.num_free_blocks) == (4, 3, 10)
    assert stats.prefix_cache_hit_rate == 0.25 and stats.num_preemptions == 1
    assert (stats.prompt_tokens_total, stats.cached_prompt_tokens_total, stats.generation_tokens_total) == (30, 20, 9)


def test_logger_factory_makes_a_vllm_stat_logger_that_records_into_the_collector() -> None:
    pytest.importorskip("vllm")
    from vllm.v1.metrics.loggers import StatLoggerBase

    collector = VllmStatsCollector(num_total_blocks=16)
    made = collector.logger_factory()
    assert isinstance(made, type) and issubclass(made, StatLoggerBase)
    logger_class: Any = made  # called with fakes below, as vLLM would with its own objects
    # vLLM instantiates each factory with (vllm_config, engine_index) and calls these.
    stat_logger = logger_class(SimpleNamespace(), 0)
    stat_logger.log_engine_initialized()
    stat_logger.record(_scheduler(running=2, usage=0.5, queries=8, hits=2), _iteration(generated=1, prompt=4))
    stat_logger.record(
        scheduler_stats=_scheduler(running=1, usage=0.25), iteration_stats=None, mm_cache_stats=None, engine_idx=0
    )
    stat_logger.log()  # the base class's no-op
    stats = collector.snapshot()
    assert stats.steps_total == 2 and stats.num_running == 1 and stats.num_free_blocks == 12
    assert stats.prefix_cache_hit_rate == 0.25 and stats.generation_tokens_total == 1 and stats.prompt_tokens_total == 4
    # Every instance (one per engine) lands in the same collector.
    logger_class(SimpleNamespace(), engine_index=1).record(_scheduler(running=7), None)
    assert collector.snapshot().num_running == 7 and collector.snapshot().steps_total == 3
