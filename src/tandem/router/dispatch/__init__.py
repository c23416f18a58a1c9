"""Request dispatch: where each request runs, and what happens when its worker goes away.

The frontend hands a tokenized request to a :class:`~tandem.router.dispatch.migration.MigratingClient`,
which wraps the prefill router (``prefill_router``: conditional disaggregation), which wraps the
worker client (``worker_client``: the routing policy's choice, the request plane stream, retries
on another worker before the first token). Failures are :mod:`tandem.router.errors`; the frontend
maps them to HTTP statuses.
"""
