"""Request plane: streams of msgpack items between the frontend and workers over TCP.

Public API (import from here)::

    server = RequestPlaneServer("127.0.0.1", 0)
    server.register("generate", handler)      # async def handler(payload, ctx): yield item ...
    await server.start(); server.address      # "127.0.0.1:PORT"
    await server.stop(drain_timeout=10)       # or step by step: start_draining(), wait_drained(t),
                                              # end_streams("unavailable", msg), close()

    client = RequestPlaneClient()
    async for item in client.stream(address, "generate", payload): ...
    result = await client.call(address, "embed", payload)
    await client.close()

Connections with open streams are kept alive by pings from both ends (`tandem.runtime.request_plane.keepalive`).
Wire format: `tandem.runtime.request_plane.frames`. Errors: `WorkerUnavailableError` (the worker cannot be
reached or went away; retry elsewhere), `RemoteError` (the handler failed; ``.code`` is
``bad_request``, ``not_found``, ``internal`` or one a handler chose by raising `EndpointError`).
"""

from tandem.runtime.request_plane.client import FROM_CONFIG, RequestPlaneClient
from tandem.runtime.request_plane.config import (
    DEFAULT_MAX_FRAME_SIZE,
    EndpointError,
    RemoteError,
    RequestPlaneConfig,
    RequestPlaneError,
    WorkerUnavailableError,
    format_address,
    parse_address,
)
from tandem.runtime.request_plane.frames import FrameError, FrameTooLargeError
from tandem.runtime.request_plane.server import Handler, RequestContext, RequestPlaneServer

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "FROM_CONFIG",
    "EndpointError",
    "FrameError",
    "FrameTooLargeError",
    "Handler",
    "RemoteError",
    "RequestContext",
    "RequestPlaneClient",
    "RequestPlaneConfig",
    "RequestPlaneError",
    "RequestPlaneServer",
    "WorkerUnavailableError",
    "format_address",
    "parse_address",
]
