"""tandem.bench.simulate: the virtual-time replay gives the mocker's modeled times exactly."""

from __future__ import annotations

import pytest

from tandem.bench.simulate import SimConfig, SimRequest, Simulation, poisson_arrivals
from tandem.engine.mocker import MockerConfig

PROMPT = list(range(100, 200))  # 6 full blocks + 4 tokens


def _mocker() -> MockerConfig:
    return MockerConfig(speedup_ratio=0.0, num_kv_blocks=256)


def test_agg_request_takes_one_prefill_step_then_decode_steps():
    config = _mocker()
    [result] = Simulation(SimConfig(num_agg=1, mocker=config)).run([SimRequest("a", PROMPT, 3, 10.0)])
    assert result.path == "agg" and len(result.token_ms) == 3
    assert result.ttft_ms == pytest.approx(config.prefill_ms(100))
    # Each decode step's time depends on the pool usage (7 blocks of 256 referenced).
    assert result.itl_ms == [pytest.approx(config.decode_ms(7 / 256))] * 2


def test_disagg_request_prefills_transfers_then_decodes_on_another_worker():
    config = _mocker()
    sim = Simulation(SimConfig(num_prefill=1, num_decode=1, mocker=config))
    [result] = sim.run([SimRequest("d", PROMPT, 3, 0.0)])
    assert result.path == "disaggregated" and result.imported_blocks == 6
    assert result.ttft_ms == pytest.approx(config.prefill_ms(100))
    # The decode worker waits for the 6 pulled blocks, then computes the 4 leftover prompt tokens
    # and the first token (5 uncached tokens) in one prefill step, which emits token 2.
    assert result.itl_ms[0] == pytest.approx(config.transfer_ms(96) + config.prefill_ms(5))
    decode = sim.workers["decode-0"].core
    assert decode.stats().prompt_tokens_total == 101 and decode.stats().generation_tokens_total == 2


def test_short_prompts_and_a_full_prefill_queue_run_on_the_decode_worker():
    config = SimConfig(
        num_prefill=1, num_decode=1, mocker=_mocker(), max_local_prefill_length=64, max_prefill_queue_size=1
    )
    requests = [
        SimRequest("short", PROMPT[:40], 2, 0.0),
        SimRequest("first", PROMPT, 2, 0.0),
        SimRequest("busy", PROMPT[::-1], 2, 0.0),
    ]
    paths = {r.request_id: r.path for r in Simulation(config).run(requests)}
    assert paths == {"short": "local_short", "first": "disaggregated", "busy": "local_busy"}


def test_kv_router_sends_a_repeated_prefix_back_to_its_prefill_worker():
    config = SimConfig(num_prefill=2, num_decode=2, router="kv", mocker=_mocker())
    requests = [SimRequest("one", PROMPT, 2, 0.0), SimRequest("two", PROMPT + [7] * 20, 2, 500.0)]
    first, second = Simulation(config).run(requests)
    assert first.cached_tokens == 0 and second.cached_tokens == 96  # the 6 blocks hit on one prefill worker


def test_round_robin_spreads_and_all_requests_finish():
    arrivals = poisson_arrivals(50.0, 40, seed=1)
    assert arrivals == sorted(arrivals) and len(arrivals) == 40
    sim = Simulation(SimConfig(num_agg=4, mocker=_mocker()))
    results = sim.run([SimRequest(f"r{i}", [i + 10] * 50, 5, t) for i, t in enumerate(arrivals)])
    assert all(len(r.token_ms) == 5 for r in results)
    assert [w.core.stats().generation_tokens_total for w in sim.workers.values()] == [50] * 4


def test_config_rejects_mixed_or_empty_deployments():
    with pytest.raises(ValueError):
        SimConfig(num_agg=2, num_decode=1)
    with pytest.raises(ValueError):
        SimConfig(num_prefill=2)
