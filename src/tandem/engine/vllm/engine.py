"""`VllmEngine`: vLLM's ``AsyncLLM`` behind the interface `WorkerService` serves (the builtin
`AsyncEngine`'s: ``generate``, ``stats``, ``shutdown``, ``wait_stopped``, ``failure``, the
card's figures and prompt validation).

``AsyncLLM`` runs its engine core in a child process; this object lives on the worker's asyncio
loop. Prompts go in as token ids (the frontend tokenizes), with ``detokenize=False`` (the
frontend detokenizes) and ``output_kind=DELTA``. Every request asks vLLM to report the KV blocks
it reuses as well as those it stores (``kv_cache_report_mode: full``), so a router that lost this
worker's entries gets them back as requests run.

Engine death (vLLM's ``EngineDeadError``, or its output handler ending) fails in-flight streams
with `EngineDeadError`, sets `failure` and ends `wait_stopped`, as the builtin engine does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future
from typing import Any

from tandem.engine.async_engine import EngineDeadError
from tandem.engine.outputs import RequestOutput, TokenLogprob
from tandem.engine.served_engine import check_prompt
from tandem.engine.vllm.config import VllmEngineConfig
from tandem.engine.vllm.kv_relay import KvEventSink, VllmKvEventRelay, free_tcp_port
from tandem.engine.vllm.parent_watch import watch_this_process
from tandem.engine.vllm.stats import VllmStatsCollector
from tandem.protocols.endpoints import EngineStats
from tandem.protocols.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

HEALTH_POLL_S = 0.5
"""How often the engine core's liveness is checked (vLLM notices a dead core process itself)."""
KV_EVENTS_TOPIC = "kv-events"
DEFAULT_ENV = {"VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}
"""Set unless the environment says otherwise: no phoning home, no hub lookups."""


class VllmEngine:
    """Create with `VllmEngine.start` (on the asyncio loop that will serve it)."""

    def __init__(
        self,
        llm: Any,
        collector: VllmStatsCollector,
        kv_endpoints: tuple[str, str] | None,
    ) -> None:
        self.llm = llm
        vllm_config = llm.vllm_config
        self.block_size: int = vllm_config.cache_config.block_size
        self.num_kv_blocks: int = vllm_config.cache_config.num_gpu_blocks or 0
        self.max_model_len: int = vllm_config.model_config.max_model_len
        self.vocab_size: int = vllm_config.model_config.get_vocab_size()
        self.collector = collector
        collector.num_total_blocks = self.num_kv_blocks
        self.kv_endpoints = kv_endpoints
        """(events, replay) endpoints vLLM's publisher uses; None when KV events are off."""
        self.relay: VllmKvEventRelay | None = None
        self.failure: BaseException | None = None
        self._exit: Future[BaseException | None] = Future()
        self._stopped = False
        self._loop = asyncio.get_running_loop()
        self._monitor = self._loop.create_task(self._watch(), name="vllm engine watch")

    @classmethod
    async def start(cls, config: VllmEngineConfig, *, kv_events_host: str | None = "127.0.0.1") -> VllmEngine:
        """Start vLLM (loads the model; tens of seconds). With ``kv_events_host``, vLLM's KV event
        publisher is turned on, its endpoints on that host (see `attach_kv_sink`)."""
        for name, value in DEFAULT_ENV.items():
            os.environ.setdefault(name, value)
        from vllm.config import KVEventsConfig, KVTransferConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = config.engine_kwargs()
        _default_cpu_kv_cache(kwargs)
        # Given as JSON (--vllm-arg, a graph's vllm: mapping, Tandem's disaggregation roles).
        for name, config_class in (("kv_transfer_config", KVTransferConfig), ("kv_events_config", KVEventsConfig)):
            if isinstance(kwargs.get(name), dict):
                kwargs[name] = config_class(**kwargs[name])
        kv_endpoints = None
        if kv_events_host is not None and "kv_events_config" not in kwargs:
            kv_endpoints = (
                f"tcp://{kv_events_host}:{free_tcp_port(kv_events_host)}",
                f"tcp://{kv_events_host}:{free_tcp_port(kv_events_host)}",
            )
            kwargs["kv_events_config"] = KVEventsConfig(
                enable_kv_cache_events=True,
                publisher="zmq",
                endpoint=kv_endpoints[0],
                replay_endpoint=kv_endpoints[1],
                topic=KV_EVENTS_TOPIC,
            )
        collector = VllmStatsCollector()
        watch_this_process()  # the engine core dies with this process (parent_watch.py)
        started = time.monotonic()
        vllm_config = AsyncEngineArgs(**kwargs).create_engine_config()
        llm = AsyncLLM.from_vllm_config(vllm_config, stat_loggers=[collector.logger_factory()])
        logger.info(
            "vLLM engine ready in %.1fs: %d KV blocks of %d tokens",
            time.monotonic() - started,
            vllm_config.cache_config.num_gpu_blocks or 0,
            vllm_config.cache_config.block_size,
        )
        return cls(llm, collector, kv_endpoints)

    def attach_kv_sink(self, sink: KvEventSink) -> None:
        """Relay vLLM's KV events to ``sink(seq, batch)`` (a Tandem publisher's ``publish``).
        Call after `start`."""
        if self.kv_endpoints is None:
            raise RuntimeError("this vLLM engine was started without KV events")
        self.relay = VllmKvEventRelay(*self.kv_endpoints, sink)

    # --- what WorkerService uses ---

    @property
    def is_running(self) -> bool:
        return not self._stopped and not self.llm.errored

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        check_prompt(prompt_token_ids, self.vocab_size, self.max_model_len)

    def stats(self) -> EngineStats:
        return self.collector.snapshot()

    @property
    def kv_blocks_loaded(self) -> int:
        """Blocks Tandem's KV connector pulled into this engine's cache since start (decode side)."""
        return self.collector.connector_totals.get("blocks_loaded", 0)

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        cache_salt: str | None = None,
        on_finish: Callable[[Any], Any] | None = None,
        prompt_validated: bool = False,
        kv_transfer_params: dict[str, Any] | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream a request's outputs; leaving the iterator early aborts it in vLLM.
        ``kv_transfer_params`` go to vLLM's KV connector (disaggregation); what the connector
        answers comes back on the final output."""
        if on_finish is not None:
            raise ValueError("the vllm engine takes no on_finish hook")
        if not self.is_running:
            raise self._dead_error()
        if not prompt_validated:
            self.validate_prompt(prompt_token_ids)
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError
        from vllm.v1.engine.exceptions import EngineGenerateError

        request_id = request_id or f"vllm-{time.monotonic_ns()}"
        prompt = TokensPrompt(prompt_token_ids=prompt_token_ids)
        if cache_salt is not None:
            prompt["cache_salt"] = cache_salt
        num_output = 0
        finished = False
        stream = self.llm.generate(prompt, to_vllm_params(params, kv_transfer_params), request_id)
        try:
            async for out in stream:
                completion = out.outputs[0]
                new_ids = list(completion.token_ids)
                num_output += len(new_ids)
                finished = out.finished
                yield RequestOutput(
                    request_id=request_id,
                    new_token_ids=new_ids,
                    finished=finished,
                    finish_reason=completion.finish_reason if finished else None,
                    num_prompt_tokens=len(prompt_token_ids),
                    num_cached_tokens=out.num_cached_tokens or 0,
                    num_output_tokens=num_output,
                    logprobs=(
                        logprobs_from_vllm(new_ids, completion.logprobs, params.logprobs)
                        if params.logprobs is not None
                        else None
                    ),
                    stop_token_id=_stop_token_id(completion, new_ids) if finished else None,
                    kv_transfer_params=out.kv_transfer_params if finished else None,
                )
                if finished:
                    return
        except VllmEngineDeadError as exc:
            self._fail(exc)
            raise self._dead_error() from None
        except EngineGenerateError as exc:  # vLLM refused the request's inputs
            raise ValueError(str(exc.__cause__ or exc)) from None
        finally:
            await stream.aclose()  # vLLM aborts the request when its generator is closed early
            if not finished and self.is_running:
                await self.llm.abort(request_id)

    def shutdown(self, timeout: float = 10.0, wait: bool = True) -> None:
        """Stop vLLM (its engine core process too) and the KV relay. Safe to call from any thread."""
        if self._stopped:
            return
        self._stopped = True
        if self.relay is not None:
            self.relay.close()
        self._stop_output_handler()
        try:
            self.llm.shutdown()
        except Exception as exc:  # a dead core: nothing left to stop
            logger.warning("vLLM shutdown: %r", exc)
        # Dropped now, while the interpreter is whole: AsyncLLM.__del__ shuts down again, which
        # fails noisily during interpreter teardown.
        self.llm = _StoppedLlm()
        if not self._exit.done():
            self._exit.set_result(self.failure)

    async def wait_stopped(self) -> BaseException | None:
        """Wait until the engine stops: None after `shutdown`, else what killed it."""
        return await asyncio.shield(asyncio.wrap_future(self._exit))

    # --- internals ---

    def _stop_output_handler(self) -> None:
        """Cancel AsyncLLM's output handler before its engine core stops: else the handler sees
        the core go away and logs a dead engine (with a traceback) on every clean shutdown."""
        handler = getattr(self.llm, "output_handler", None)
        if handler is None or handler.done():
            return
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            handler.cancel()
            return
        cancelled = threading.Event()

        def cancel() -> None:
            handler.add_done_callback(lambda _: cancelled.set())
            handler.cancel()

        try:
            self._loop.call_soon_threadsafe(cancel)
        except RuntimeError:  # the loop is closed: nothing runs the handler any more
            return
        cancelled.wait(timeout=5)

    async def _watch(self) -> None:
        while not self._stopped:
            if self.llm.errored:
                self._fail(RuntimeError("vLLM engine core died"))
                return
            await asyncio.sleep(HEALTH_POLL_S)

    def _fail(self, exc: BaseException) -> None:
        if self.failure is None and not self._stopped:
            self.failure = exc
            logger.error("vLLM engine failed: %r", exc)
        if not self._exit.done():
            self._exit.set_result(self.failure)

    def _dead_error(self) -> EngineDeadError:
        if self.failure is None:
            return EngineDeadError("engine is stopped")
        return EngineDeadError(f"engine failed: {self.failure}")


CPU_KV_CACHE_GIB = 1.0
"""vLLM's CPU build: the KV cache size when nothing else sets it (Tandem's builtin default)."""


def _default_cpu_kv_cache(kwargs: dict[str, Any]) -> None:
    """On vLLM's CPU build with no KV budget given (``--kv-cache-gib``, ``gpu_memory_utilization``,
    ``VLLM_CPU_KVCACHE_SPACE``), use `CPU_KV_CACHE_GIB`: vLLM's own default there reserves 92% of
    the machine's memory, so a second worker (or anything else) cannot start."""
    if "kv_cache_memory_bytes" in kwargs or "gpu_memory_utilization" in kwargs:
        return
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        kwargs["kv_cache_memory_bytes"] = int(CPU_KV_CACHE_GIB * (1 << 30))


class _StoppedLlm:
    """Stands in for a shut-down AsyncLLM."""

    errored = True


def to_vllm_params(params: SamplingParams, kv_transfer_params: dict[str, Any] | None = None) -> Any:
    """Tandem's sampling parameters as vLLM's (token ids out, no detokenizing)."""
    extra_args: dict[str, Any] = {"kv_cache_report_mode": "full"}
    if kv_transfer_params is not None:
        extra_args["kv_transfer_params"] = kv_transfer_params
    from vllm.sampling_params import RequestOutputKind
    from vllm.sampling_params import SamplingParams as VllmSamplingParams

    return VllmSamplingParams(
        max_tokens=params.max_tokens,
        min_tokens=params.min_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=max(params.top_k, 0),
        min_p=params.min_p,
        seed=params.seed,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
        extra_args=extra_args,
    )


def logprobs_from_vllm(token_ids: list[int], positions: Any, num_top: int) -> list[TokenLogprob]:
    """vLLM's per-position {token id: Logprob} maps (the sampled token plus the top ``num_top``)
    → Tandem's TokenLogprob: the sampled token's logprob and the ``num_top`` best by logprob."""
    result = []
    for token_id, candidates in zip(token_ids, positions or []):
        chosen = candidates.get(token_id)
        ranked = sorted(((tid, lp.logprob) for tid, lp in candidates.items()), key=lambda item: -item[1])
        result.append(TokenLogprob(token_id, chosen.logprob if chosen is not None else float("nan"), ranked[:num_top]))
    return result


def _stop_token_id(completion: Any, new_ids: list[int]) -> int | None:
    """The token that ended the request when it stopped on EOS or a stop token id (it is the
    last token vLLM returned); None when it stopped for another reason."""
    if completion.finish_reason != "stop" or not new_ids:
        return None
    reason = completion.stop_reason
    if reason is None or isinstance(reason, int):  # None: EOS
        return new_ids[-1]
    return None
