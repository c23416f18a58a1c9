"""What the KV-aware policies know: which worker caches which blocks, and how busy each is.

``indexer`` (blocks per worker, from KV events), ``approx_index`` (from the router's own
decisions, without events), ``active_load`` (the prefill tokens and decode blocks the router
booked on each worker), ``cost`` (the routing cost and the softmax choice), and the followers
that keep the indexer current per worker: ``follower_core`` with its ZMQ and NATS transports.
"""
