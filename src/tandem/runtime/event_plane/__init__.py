"""How KV events and load metrics travel from workers to routers.

``config`` (which plane: ``zmq`` or ``nats``), ``factory`` (a worker's publisher for it), the
ZMQ publisher with its replay socket (``zmq_publisher``), the NATS side (``nats_layout``: names
and plumbing; ``nats_publisher``; ``nats_router_plane``: a router's shared connection and the
workers' load), and ``replica_sync`` (router replicas sharing their bookings). The routers'
followers, which apply events to their index, live with the router (``tandem.router``).
"""
