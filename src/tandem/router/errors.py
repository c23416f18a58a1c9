"""Why the router could not place or finish a request; the frontend maps each to an HTTP status."""

from __future__ import annotations


class RouterError(Exception):
    """A request the router could not place or finish. ``code`` names the case for clients."""

    code = "router_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NoWorkerError(RouterError, LookupError):
    """No live worker serves the requested model (HTTP 503: retry later)."""

    code = "no_worker_available"

    def __init__(self, model: str, message: str | None = None) -> None:
        super().__init__(message or f"No worker is currently serving model '{model}'. Please retry later.")
        self.model = model


class WorkerRejectedError(RouterError):
    """The worker refused the request itself (HTTP 400): another worker would refuse it too."""

    code = "invalid_request"


class WorkerFailedError(RouterError):
    """The worker failed the request with an internal error (HTTP 500)."""

    code = "worker_failed"


class RequestLostError(RouterError):
    """The request's worker was lost mid-stream and the request could not move on (HTTP 502).

    ``code``: ``worker_lost`` or ``worker_stream_incomplete``."""

    def __init__(self, message: str, code: str = "worker_lost") -> None:
        super().__init__(message)
        self.code = code
