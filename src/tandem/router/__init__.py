"""Routing: which worker serves a request (round-robin, random; the KV-aware policy comes next)."""
