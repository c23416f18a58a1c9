"""vLLM as an engine of ``tandem worker``: `VllmEngine` hosts vLLM's ``AsyncLLM`` in the worker's
process and serves it through the same interface as the builtin `AsyncEngine`.

* `config`: Tandem's engine flags and ``--vllm-arg KEY=VALUE`` mapped onto vLLM's engine args;
* `engine`: the engine itself (requests, aborts, health, shutdown);
* `stats`: a vLLM stat logger turned into Tandem's `EngineStats`;
* `kv_relay`: vLLM's KV event stream relayed into a Tandem publisher (ZMQ or NATS).

vLLM is imported only when an engine starts, so Tandem runs without it installed.
"""
