"""The contracts every part of Tandem agrees on, importable with nothing else from Tandem.

* ``block_hash``: how prompt tokens become block hashes (the router's and the engines' shared key);
* ``kv_events``: KV cache events in vLLM's wire format, and their ZMQ frame layout;
* ``worker_card``: what a worker registers in discovery;
* ``endpoints``: the worker's request-plane endpoints, a typed payload for each;
* ``sampling_params``: how a request asks to be sampled;
* ``kv_export``: a run of KV blocks as it travels between prefill and decode workers.
"""
