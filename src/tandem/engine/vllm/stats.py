"""vLLM's scheduler and iteration stats, accumulated into Tandem's `EngineStats`.

vLLM calls each stat logger's ``record(scheduler_stats, iteration_stats)`` once per engine step,
on the asyncio loop that runs ``AsyncLLM``'s output handler. `VllmStatsCollector.logger_factory`
makes the ``StatLoggerBase`` subclass vLLM instantiates; every record lands in the collector.
"""

from __future__ import annotations

from typing import Any

from tandem.protocols.endpoints import EngineStats


class VllmStatsCollector:
    """The latest load (running, waiting, KV usage) and counters since start."""

    def __init__(self, num_total_blocks: int = 0) -> None:
        self.num_total_blocks = num_total_blocks
        self.num_running = self.num_waiting = 0
        self.kv_usage = 0.0
        self.prefix_queries = self.prefix_hits = 0
        self.num_preemptions = 0
        self.prompt_tokens_total = self.cached_prompt_tokens_total = self.generation_tokens_total = 0
        self.steps_total = 0
        self.connector_totals: dict[str, int] = {}
        """A KV connector's counters summed since start (Tandem's: blocks_loaded, load_failures,
        blocks_held; see tandem.worker.vllm_kv_connector)."""

    def record(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        if scheduler_stats is not None:
            self.steps_total += 1
            self.num_running = scheduler_stats.num_running_reqs
            self.num_waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
            self.kv_usage = float(scheduler_stats.kv_cache_usage)
            prefix = scheduler_stats.prefix_cache_stats
            if prefix is not None:
                self.prefix_queries += prefix.queries
                self.prefix_hits += prefix.hits
            for name, value in (scheduler_stats.kv_connector_stats or {}).items():
                if isinstance(value, int | float):
                    self.connector_totals[name] = self.connector_totals.get(name, 0) + int(value)
        if iteration_stats is not None:
            self.num_preemptions += iteration_stats.num_preempted_reqs
            self.generation_tokens_total += iteration_stats.num_generation_tokens
            prompt = iteration_stats.prompt_token_stats
            self.prompt_tokens_total += prompt.total
            self.cached_prompt_tokens_total += prompt.cached_tokens

    def snapshot(self) -> EngineStats:
        used = round(self.kv_usage * self.num_total_blocks)
        return EngineStats(
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            kv_usage=self.kv_usage,
            num_total_blocks=self.num_total_blocks,
            num_free_blocks=max(0, self.num_total_blocks - used),
            # vLLM counts tokens where the builtin engine counts blocks; the ratio means the same.
            prefix_cache_hit_rate=self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0,
            num_preemptions=self.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            cached_prompt_tokens_total=self.cached_prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            steps_total=self.steps_total,
        )

    def logger_factory(self) -> Any:
        """A ``StatLoggerBase`` subclass whose instances record into this collector."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        collector = self

        class TandemStatLogger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(
                self,
                scheduler_stats: Any,
                iteration_stats: Any,
                mm_cache_stats: Any = None,
                engine_idx: int = 0,
            ) -> None:
                collector.record(scheduler_stats, iteration_stats)

            def log_engine_initialized(self) -> None:
                pass

        return TandemStatLogger
