"""Routing and dispatch: which worker serves a request, and how the request gets there.

``policy`` (the interface) and ``registry`` (``--router`` names) with one module per policy in
``policies/``; ``kv/`` (the KV index, load bookings, cost); ``worker_pool`` (live workers from
discovery); ``dispatch/`` (worker client, prefill router, migration); ``errors`` (what dispatch
raises); ``router_service`` (the standalone ``tandem router`` process).
"""
