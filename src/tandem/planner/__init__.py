"""The planner: watches load and latency and scales prefill and decode workers."""
