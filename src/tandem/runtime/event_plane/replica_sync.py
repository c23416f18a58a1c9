"""Router replicas share their load bookings over core NATS (``tandem.{ns}.router.bookings``).

Every router following NATS workers sees the same KV events, but each books only the requests
it routes itself (``ActiveLoad``): with two replicas, each sees about half of every worker's
load and keeps sending conversations to workers the other replica already filled. So each
router also publishes its bookings (``add`` at routing, ``prefill_done`` at the first token,
``free`` at the end) and applies the other routers' bookings to its own ``ActiveLoad``, under
ids prefixed with the booking router's id, as Dynamo's router replica sync does.

Delivery is at most once: a lost ``free`` leaves a booking that ``ActiveLoad`` expires on its
own (``expiry_s``); a lost ``add`` just makes that request invisible. Messages are msgpack
arrays decoded into a typed struct; anything else is counted in ``malformed`` and dropped.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Protocol

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from tandem.runtime.background import spawn
from tandem.runtime.event_plane import nats_layout
from tandem.runtime.event_plane.nats_router_plane import NatsRouterPlane

logger = logging.getLogger(__name__)

OPS = ("add", "prefill_done", "free")


class BookingSink(Protocol):
    """Where another router's bookings land: the router's ``ActiveLoad``."""

    def add_request(
        self, request_id: str, worker_id: str, seq_hashes: list[int], num_prompt_tokens: int, num_cached_tokens: int = 0
    ) -> None: ...

    def mark_prefill_done(self, request_id: str) -> None: ...

    def free(self, request_id: str) -> None: ...


class Booking(msgspec.Struct, array_like=True, frozen=True):
    router: str
    op: str
    request_id: str
    worker_id: str = ""
    seq_hashes: list[int] = []
    prompt_tokens: int = 0
    cached_tokens: int = 0


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Booking)


def bookings_subject(namespace: str) -> str:
    return f"tandem.{namespace}.router.bookings"


class ReplicaSync:
    def __init__(self, plane: NatsRouterPlane, namespace: str, load: Callable[[], BookingSink]) -> None:
        self.plane, self.subject, self._load = plane, bookings_subject(namespace), load
        self.router_id = secrets.token_hex(6)
        self.applied = 0
        """Other routers' bookings applied here."""
        self.malformed = 0
        self._nc: NatsClient | None = None
        self._sub: Subscription | None = None

    async def start(self) -> None:
        nc = await self.plane.connection()
        self._sub = await nc.subscribe(self.subject, cb=self._on_message)
        await nats_layout.confirm_subscriptions(nc)  # bookings from now on arrive
        self._nc = nc
        logger.info("router %s shares its load bookings on %s", self.router_id, self.subject)

    async def stop(self) -> None:
        sub, self._sub, self._nc = self._sub, None, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # closing anyway
                logger.debug("unsubscribing %s: %r", self.subject, exc)

    # --- this router's bookings ---

    def add(
        self, request_id: str, worker_id: str, seq_hashes: list[int], prompt_tokens: int, cached_tokens: int
    ) -> None:
        self._send(Booking(self.router_id, "add", request_id, worker_id, seq_hashes, prompt_tokens, cached_tokens))

    def prefill_done(self, request_id: str) -> None:
        self._send(Booking(self.router_id, "prefill_done", request_id))

    def free(self, request_id: str) -> None:
        self._send(Booking(self.router_id, "free", request_id))

    def _send(self, booking: Booking) -> None:
        if self._nc is None or not self._nc.is_connected:
            return  # not connected (yet): the others miss this one, as if it were lost
        spawn(self._publish(_encoder.encode(booking)))

    async def _publish(self, data: bytes) -> None:
        nc = self._nc
        if nc is None:  # stopped since _send
            logger.debug("booking not shared: stopped")
            return
        try:
            await nc.publish(self.subject, data)
        except Exception as exc:  # best effort, like the delivery
            logger.debug("booking not shared: %r", exc)

    # --- the other routers' bookings ---

    async def _on_message(self, msg: Msg) -> None:
        try:
            booking = _decoder.decode(msg.data)
        except msgspec.DecodeError:
            self.malformed += 1
            return
        if booking.op not in OPS or not booking.router:
            self.malformed += 1
            return
        if booking.router == self.router_id:
            return
        load, request_id = self._load(), f"{booking.router}/{booking.request_id}"
        if booking.op == "add":
            load.add_request(
                request_id, booking.worker_id, booking.seq_hashes, booking.prompt_tokens, booking.cached_tokens
            )
        elif booking.op == "prefill_done":
            load.mark_prefill_done(request_id)
        else:
            load.free(request_id)
        self.applied += 1
