"""Virtual-time simulation of a deployment of mocker workers (agg, or prefill + decode).

Why: disaggregation sweeps need 8 workers at Dynamo's timing model, thousands of
3,000-token requests and many request rates. Served in real time on a 2-core machine the
frontend, the client and 8 workers would compete for the CPU and their overhead would blur
50 ms ITL targets. Here the same ``MockerEngine`` cores (real scheduler, block pool, prefix
cache, preemption, KV events) run with ``speedup_ratio=0`` and a discrete-event clock instead of
``sleep``: a step starts when its worker is idle and has work, its outputs appear
``modeled_step_ms`` later, and requests that arrive meanwhile join the next step, as in the
served engine loop. The frontend's flow is replayed on top:

* **agg**: a request goes to one agg worker and runs there whole.
* **disagg** (``router/dispatch/prefill_router.py``): the prompt runs with ``max_tokens=1`` on a prefill worker;
  its token is the first token; the prompt's blocks are exported at once; a decode worker is
  chosen, waits ``transfer_ms`` for the blocks it lacks (the mocker's bandwidth model), imports
  them and runs prompt + first token for the remaining tokens. Prompts of at most
  ``max_local_prefill_length`` tokens, or arriving while every prefill worker already has
  ``max_prefill_queue_size`` prefill halves in flight, run whole on a decode worker.

Routing uses the real policies: ``RoundRobinPolicy``, or the real ``KvRouter`` (its indexer
fed with each worker's KV events after every step, its active-load bookkeeping fed with the
first-token and finish hooks the frontend calls), choosing among the workers of the right role.
Not modeled: the frontend's and request plane's own latency (sub-millisecond next to the
modeled steps) and the tokenizer.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from tandem.engine.mocker import MockerConfig, MockerEngine
from tandem.engine.outputs import RequestOutput
from tandem.protocols.kv_export import KVBlockExport
from tandem.protocols.sampling_params import SamplingParams
from tandem.protocols.worker_card import Role, WorkerCard
from tandem.router.dispatch.prefill_router import DisaggConfig, local_prefill_reason
from tandem.router.policies.round_robin import RoundRobinPolicy
from tandem.router.policy import RoutingPolicy

if TYPE_CHECKING:
    from tandem.router.policies.kv import KvRouter

Router = Literal["round-robin", "kv"]


@dataclass
class SimRequest:
    request_id: str
    prompt: list[int]
    max_tokens: int
    arrival_ms: float


@dataclass
class SimResult:
    """What a client would have seen of one request (times in modeled ms)."""

    request_id: str
    arrival_ms: float
    token_ms: list[float] = field(default_factory=list)
    """Time of every output token."""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens the first engine found in its prefix cache."""
    path: str = "agg"
    """agg | disaggregated | local_short | local_busy | decode_only (no prefill workers)."""
    imported_blocks: int = 0

    @property
    def ttft_ms(self) -> float:
        return self.token_ms[0] - self.arrival_ms

    @property
    def itl_ms(self) -> list[float]:
        return [b - a for a, b in zip(self.token_ms, self.token_ms[1:])]


@dataclass
class SimConfig:
    num_agg: int = 0
    num_prefill: int = 0
    num_decode: int = 0
    router: Router = "round-robin"
    mocker: MockerConfig = field(default_factory=lambda: MockerConfig(speedup_ratio=0.0))
    """Every worker's engine (``speedup_ratio`` is forced to 0: time is virtual)."""
    max_local_prefill_length: int = 64
    max_prefill_queue_size: int = 8
    kv_router: dict[str, Any] = field(default_factory=dict)
    """``KvRouterConfig`` fields for ``router="kv"``."""

    def __post_init__(self) -> None:
        if self.num_agg and (self.num_prefill or self.num_decode):
            raise ValueError("simulate agg workers or prefill + decode workers, not both")
        if not self.num_agg and not self.num_decode:
            raise ValueError("need agg workers, or decode workers (with or without prefill workers)")


class _Worker:
    def __init__(self, index: int, role: Role, config: MockerConfig) -> None:
        self.card = WorkerCard(
            worker_id=f"{role}-{index}",
            model="sim",
            tokenizer="sim",
            chat_template="sim",
            context_length=config.max_model_len,
            block_size=config.block_size,
            total_kv_blocks=config.num_kv_blocks,
            role=role,
            request_plane_address=f"127.0.0.1:{index + 1}",
            engine="mocker",
        )
        self.core = MockerEngine(dataclasses.replace(config, speedup_ratio=0.0, seed=index))
        self.busy = False


class _StaticPool:
    """The one call ``KvRouter`` makes on a worker pool: the workers never change here."""

    def add_listener(
        self, on_added: Callable[[WorkerCard], None], on_removed: Callable[[WorkerCard], None]
    ) -> None:  # callbacks, never called
        return None


class Simulation:
    """Run requests through simulated workers; ``run`` returns one `SimResult` per request."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        roles: list[tuple[Role, int]] = (
            [("agg", config.num_agg)]
            if config.num_agg
            else [("prefill", config.num_prefill), ("decode", config.num_decode)]
        )
        self.workers = {
            w.card.worker_id: w for role, n in roles for w in (_Worker(i, role, config.mocker) for i in range(n))
        }
        self.kv: KvRouter | None = None
        """The policy when it is ``kv`` (its indexer is fed the workers' KV events)."""
        self.policy: RoutingPolicy
        if config.router == "kv":
            from tandem.router.policies.kv import KvRouter, KvRouterConfig
            from tandem.runtime.request_plane import RequestPlaneClient

            self.policy = self.kv = KvRouter(
                _StaticPool(),
                RequestPlaneClient(),  # never connects: simulated workers publish no KV events address
                KvRouterConfig(block_size=config.mocker.block_size, **{"seed": 0, **config.kv_router}),
            )
        else:
            self.policy = RoundRobinPolicy()
        self._events: list[tuple[float, int, str, Any]] = []
        self._seq = itertools.count()
        self.now = 0.0
        self.results: dict[str, SimResult] = {}
        self._pending: dict[str, tuple[SimRequest, str]] = {}  # engine request id → (request, half)
        self._prefills_in_flight = 0

    # --- the event loop ---

    def run(self, requests: Iterable[SimRequest], max_events: int = 50_000_000) -> list[SimResult]:
        requests = list(requests)
        for request in requests:
            self._push(request.arrival_ms, "arrival", request)
        for _ in range(max_events):
            if not self._events:
                break
            self.now, _, kind, payload = heapq.heappop(self._events)
            getattr(self, f"_on_{kind}")(payload)
        else:
            raise RuntimeError("simulation did not finish within max_events")
        if self._pending or any(w.core.has_unfinished_requests for w in self.workers.values()):
            raise RuntimeError("simulation ended with unfinished requests")
        return [self.results[r.request_id] for r in requests]

    def _push(self, at_ms: float, kind: str, payload: Any) -> None:
        heapq.heappush(self._events, (at_ms, next(self._seq), kind, payload))

    def _kick(self, worker: _Worker) -> None:
        """Start the worker's next step if it is idle and has something to schedule."""
        if worker.busy or not worker.core.has_unfinished_requests:
            return
        steps = worker.core.num_steps
        outputs = worker.core.step()
        if worker.core.num_steps == steps:
            return  # nothing schedulable (e.g. waiting for free blocks): idle until a request comes
        worker.busy = True
        self._push(self.now + worker.core.last_step_ms, "step_done", (worker, outputs))

    def _on_step_done(self, payload: tuple[_Worker, list[RequestOutput]]) -> None:
        worker, outputs = payload
        worker.busy = False
        if self.kv is not None:
            self.kv.indexer.apply_batch(worker.card.worker_id, worker.core.take_kv_events())
        for out in outputs:
            self._on_output(worker, out)
        self._kick(worker)

    # --- the frontend's flow ---

    def _candidates(self, roles: tuple[str, ...]) -> list[WorkerCard]:
        return [w.card for w in self.workers.values() if w.card.role in roles]

    def _route(self, roles: tuple[str, ...], prompt: list[int], engine_id: str) -> _Worker:
        """Pick a worker as ``WorkerClient.generate`` does: ``route`` books load-aware policies."""
        card = self.policy.route(self._candidates(roles), prompt, engine_id, None)
        return self.workers[card.worker_id]

    def _start(
        self, request: SimRequest, half: str, roles: tuple[str, ...], prompt: list[int], max_tokens: int, engine_id: str
    ) -> _Worker:
        worker = self._route(roles, prompt, engine_id)
        worker.core.add_request(engine_id, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        self._pending[engine_id] = (request, half)
        self._kick(worker)
        return worker

    def _on_arrival(self, request: SimRequest) -> None:
        result = self.results[request.request_id] = SimResult(
            request.request_id, request.arrival_ms, prompt_tokens=len(request.prompt)
        )
        if self.config.num_agg:
            self._start(request, "whole", ("agg",), request.prompt, request.max_tokens, request.request_id)
            return
        reason = local_prefill_reason(
            len(request.prompt),
            self.config.num_prefill,
            self._prefills_in_flight,
            DisaggConfig(
                max_local_prefill_length=self.config.max_local_prefill_length,
                max_prefill_queue_size=self.config.max_prefill_queue_size,
            ),
        )
        if reason is None:
            result.path = "disaggregated"
            self._prefills_in_flight += 1
            self._start(request, "prefill", ("prefill",), request.prompt, 1, f"{request.request_id}:prefill")
            return
        result.path = "decode_only" if reason == "no_prefill_workers" else reason
        self._start(request, "whole", ("decode",), request.prompt, request.max_tokens, request.request_id)

    def _on_output(self, worker: _Worker, out: RequestOutput) -> None:
        request, half = self._pending[out.request_id]
        result = self.results[request.request_id]
        if out.new_token_ids and out.num_output_tokens == len(out.new_token_ids):  # its first token
            self.policy.on_first_token(out.request_id)
            if half != "decode":
                result.cached_tokens = out.num_cached_tokens
        result.token_ms.extend([self.now] * len(out.new_token_ids))
        if not out.finished:
            return
        del self._pending[out.request_id]
        self.policy.on_finished(out.request_id)
        if half == "prefill":
            self._prefills_in_flight -= 1
            export = worker.core.export_kv(request.prompt)
            if request.max_tokens <= 1:
                return
            self._begin_decode(request, export, out.new_token_ids)

    def _begin_decode(self, request: SimRequest, export: KVBlockExport, first: list[int]) -> None:
        """Route the decode half, then let the pull of the blocks it lacks take its modeled time."""
        prompt = request.prompt + first
        worker = self._route(("decode",), prompt, request.request_id)
        have = worker.core.num_cached_prompt_blocks(request.prompt)
        missing = max(0, len(export.block_hashes) - have)
        delay = worker.core.config.transfer_ms(missing * worker.core.block_size)
        self._push(self.now + delay, "transfer_done", (request, worker, export, prompt))

    def _on_transfer_done(self, payload: tuple[SimRequest, _Worker, KVBlockExport, list[int]]) -> None:
        request, worker, export, prompt = payload
        try:
            self.results[request.request_id].imported_blocks = worker.core.import_kv(export)
        except ValueError:  # no room: the decode worker prefills the prompt itself, as served
            pass
        worker.core.add_request(
            request.request_id, prompt, SamplingParams(max_tokens=request.max_tokens - 1, ignore_eos=True)
        )
        self._pending[request.request_id] = (request, "decode")
        self._kick(worker)


def poisson_arrivals(rate_per_s: float, count: int, seed: int = 0) -> list[float]:
    """``count`` arrival times (ms) of a Poisson process of ``rate_per_s`` requests per second."""
    rng = random.Random(seed)
    t, times = 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate_per_s) * 1000.0
        times.append(t)
    return times
