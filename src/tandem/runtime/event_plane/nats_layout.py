"""The NATS event plane's names and shared plumbing: subjects, the KV stream, headers, connecting.

Layout (``{ns}`` is the namespace, ``{token}`` one publisher's subject token):

* ``tandem.{ns}.kv.{token}``: a worker's KV event batches (the msgpack ``KVEventBatch`` of the
  ZMQ plane), captured by the JetStream stream ``TANDEM_KV_{ns}`` (subjects ``tandem.{ns}.kv.>``),
  so a router replica that restarts or falls behind reads them again from the stream;
* ``tandem.{ns}.load.{token}``: the worker's load metrics (msgpack ``EngineStats`` plus
  ``worker_id`` and ``ts``), core NATS: only the latest matters, nothing is stored.

Every KV message carries the headers ``Tandem-Seq`` (the worker's batch sequence number, as on
the ZMQ plane), ``Tandem-Worker`` (its worker id) and ``Nats-Msg-Id`` (``{token}:{seq}``, so
JetStream drops a batch the publisher re-sends after a lost acknowledgement).

A token is the worker id made subject-safe plus a random suffix: two incarnations of a worker
with the same id (a container whose pid is always 1) never share a history.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from dataclasses import dataclass

import nats
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError

from tandem.runtime.backoff import Backoff

logger = logging.getLogger(__name__)

SEQ_HEADER = "Tandem-Seq"
WORKER_HEADER = "Tandem-Worker"
MSG_ID_HEADER = "Nats-Msg-Id"

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_KV_SUBJECT = re.compile(r"^tandem\.([A-Za-z0-9_-]+)\.kv\.([A-Za-z0-9_-]+)$")


@dataclass(frozen=True)
class StreamLimits:
    """Retention of the KV stream (limits-based: the oldest batches go first)."""

    max_age_s: float = 3600.0
    """Batches older than this are dropped (default 1 h). A router that was away longer, or that
    finds a worker's history no longer starting at seq 0, takes a dump instead."""
    max_msgs_per_subject: int = 100_000
    """Batches kept per worker (default 100,000); older ones are dropped first."""


def subject_token(worker_id: str) -> str:
    """A fresh subject token for ``worker_id``: its subject-safe form plus a random suffix."""
    safe = _UNSAFE.sub("_", worker_id)[:64] or "worker"
    return f"{safe}-{secrets.token_hex(4)}"


def kv_subject(namespace: str, token: str) -> str:
    return f"tandem.{namespace}.kv.{token}"


def load_subject(namespace: str, token: str) -> str:
    return f"tandem.{namespace}.load.{token}"


def load_wildcard(namespace: str) -> str:
    return f"tandem.{namespace}.load.*"


def stream_name(namespace: str) -> str:
    return f"TANDEM_KV_{namespace}"


def parse_kv_subject(subject: str) -> tuple[str, str]:
    """(namespace, token) of a KV subject; ValueError if it is not one."""
    match = _KV_SUBJECT.match(subject)
    if match is None:
        raise ValueError(f"not a Tandem KV subject ('tandem.<namespace>.kv.<token>'): {subject!r}")
    return match.group(1), match.group(2)


def servers(url: str) -> list[str]:
    """``nats://a:4222,nats://b:4222`` → the list nats-py takes."""
    return [u.strip() for u in url.split(",") if u.strip()]


async def connect(url: str, name: str, *, connect_timeout_s: float = 2.0) -> NatsClient:
    """One connection attempt; once connected, nats-py reconnects on its own, forever."""

    async def on_error(exc: Exception) -> None:
        logger.debug("nats (%s): %r", name, exc)

    return await nats.connect(
        servers(url),
        name=name,
        connect_timeout=connect_timeout_s,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        allow_reconnect=True,
        error_cb=on_error,
    )


async def connect_with_retry(url: str, name: str, *, max_backoff_s: float = 5.0) -> NatsClient:
    """Connect, retrying with capped exponential backoff until it works (or the task is cancelled)."""
    backoff = Backoff(0.2, max_backoff_s)
    while True:
        try:
            return await connect(url, name)
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            delay = backoff.next()
            logger.warning("nats %s unreachable (%s); retrying in %.1fs", url, exc, delay)
            await asyncio.sleep(delay)


async def confirm_subscriptions(nc: NatsClient) -> None:
    """Return once the server has every subscription made so far on ``nc``. nats-py writes a
    flush's PING straight to the socket, possibly ahead of a SUB still queued for its flusher
    task, so one round trip proves nothing; during it the flusher writes the SUB, so the second
    round trip does."""
    await nc.flush()
    await nc.flush()


async def ensure_stream(js: JetStreamContext, namespace: str, limits: StreamLimits) -> str:
    """Create the namespace's KV stream unless it exists; tolerates a concurrent creator and an
    existing stream with other limits (the first creator's limits stay). Returns its name."""
    name = stream_name(namespace)
    try:
        await js.stream_info(name)
        return name
    except NotFoundError:
        pass
    config = StreamConfig(
        name=name,
        subjects=[f"tandem.{namespace}.kv.>"],
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        storage=StorageType.FILE,
        max_age=limits.max_age_s,
        max_msgs_per_subject=limits.max_msgs_per_subject,
    )
    try:
        await js.add_stream(config)
        logger.info(
            "created JetStream stream %s (max age %.0fs, %d batches per worker)",
            name,
            limits.max_age_s,
            limits.max_msgs_per_subject,
        )
    except BadRequestError as exc:  # someone else created it meanwhile, maybe with other limits
        await js.stream_info(name)  # raises if it still does not exist
        logger.info("JetStream stream %s already exists (%s)", name, exc.description)
    return name
