"""What the KV-aware policies know: which worker caches which blocks, and how busy each is.

``indexer`` (blocks per worker, from KV events), ``approx_index`` (from the router's own
decisions, without events), ``active_load`` (the prefill tokens and decode blocks the router
booked on each worker), ``cost`` (DESIGN.md §4's cost and the softmax choice), and the followers
that keep the indexer current per worker: ``follower_core`` with its ZMQ and NATS transports.
"""
