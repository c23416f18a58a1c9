"""The worker card: what a worker registers in discovery (DESIGN §4 "Worker card").

A card says what a worker serves (model, tokenizer, chat template, context length), how its KV
cache is shaped (block size, total blocks), which part it plays (``agg``, ``prefill``,
``decode``), where to reach it (request plane, KV events, metrics) and which engine runs it.
The lease (TTL, expiry) is not part of the card: discovery attaches and refreshes it.

Cards travel as JSON (discovery files, etcd values) or msgpack (request/event planes). Decoding
validates types and values and raises :class:`WorkerCardError` on anything malformed; nothing
is ever unpickled. Unknown fields are ignored so that an older reader accepts a card written by
a newer worker.
"""

from __future__ import annotations

import re
import time
from typing import Literal, TypedDict, get_args

import msgspec

Role = Literal["agg", "prefill", "decode"]
"""Which part a worker plays: aggregated (prefill + decode), prefill only, decode only."""

EngineKind = Literal["builtin", "mocker", "vllm"]
"""Which engine implementation runs inside the worker."""

ROLES: tuple[str, ...] = get_args(Role)
ENGINE_KINDS: tuple[str, ...] = get_args(EngineKind)

# host:port, where host is a name, an IPv4 address or a bracketed IPv6 address.
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")


class WorkerCardError(ValueError):
    """A worker card is malformed: bad JSON/msgpack, a missing field or an invalid value."""


class WorkerCardDict(TypedDict):
    """A card as plain builtins (:meth:`WorkerCard.to_dict`): one key per field of :class:`WorkerCard`."""

    worker_id: str
    model: str
    tokenizer: str
    chat_template: str
    context_length: int
    block_size: int
    total_kv_blocks: int
    role: Role
    request_plane_address: str
    kv_events_address: str | None
    kv_events_subject: str | None
    kv_replay_address: str | None
    serves_kv_dump: bool
    metrics_address: str | None
    engine: EngineKind
    kv_node_tier: str | None
    started_at: float


class WorkerCard(msgspec.Struct, frozen=True, kw_only=True):
    """What one worker serves and where to reach it. Immutable; validated on creation and decode."""

    worker_id: str
    """Unique id of the worker process (discovery key); e.g. a uuid or ``host-pid``."""
    model: str
    """Served model name, as clients put it in ``"model"`` of an OpenAI request."""
    tokenizer: str
    """Where the tokenizer comes from: a local path or a model name."""
    chat_template: str
    """Where the chat template comes from: a path (jinja, tokenizer_config.json) or a model name."""
    context_length: int
    """Longest prompt + output the worker accepts, in tokens."""
    block_size: int
    """Tokens per KV block; the router hashes prompts with the same block size."""
    total_kv_blocks: int
    """Size of the worker's KV block pool (for load and cost estimates)."""
    role: Role = "agg"
    """``agg``, ``prefill`` or ``decode``."""
    request_plane_address: str
    """``host:port`` of the worker's request-plane server."""
    kv_events_address: str | None = None
    """Endpoint of the KV event publisher: ZMQ PUB (``tcp://127.0.0.1:5557``) or the NATS server(s)
    the worker publishes to (``nats://host:4222``, with ``kv_events_subject``); None when off."""
    kv_events_subject: str | None = None
    """NATS event plane: the JetStream subject of the worker's KV events
    (``tandem.<namespace>.kv.<token>``); None on the ZMQ plane."""
    kv_replay_address: str | None = None
    """Endpoint of the KV event replay service (vLLM's ROUTER protocol); None when off."""
    serves_kv_dump: bool = True
    """Whether the worker answers ``kv_dump`` (every block it holds). vLLM cannot: a router that
    loses a vLLM worker's events past what the replay reaches drops and rebuilds its entries."""
    metrics_address: str | None = None
    """Endpoint of the load-metrics publisher or ``/metrics`` page; None when off."""
    engine: EngineKind = "builtin"
    """``builtin``, ``mocker`` or ``vllm``."""
    kv_node_tier: str | None = None
    """The node-wide host KV tier this worker shares with the other workers of its machine
    (``<host>/<segment name>``); None when its host tier (if any) is private. The router counts a
    block that any of them reports in that tier (``medium`` CPU) as held by all of them."""
    started_at: float = msgspec.field(default_factory=time.time)
    """Wall-clock time (Unix seconds) when the worker started."""

    def __post_init__(self) -> None:
        # Runs on direct construction and on decode (msgspec wraps errors as ValidationError).
        for name in ("worker_id", "model", "tokenizer", "chat_template"):
            if not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string")
        for name in ("context_length", "block_size", "total_kv_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.engine not in ENGINE_KINDS:
            raise ValueError(f"engine must be one of {ENGINE_KINDS}, got {self.engine!r}")
        _check_host_port(self.request_plane_address)
        for name in ("kv_events_address", "kv_replay_address", "metrics_address", "kv_node_tier"):
            if getattr(self, name) == "":
                raise ValueError(f"{name} must be None or a non-empty string")
        _check_kv_subject(self.kv_events_address, self.kv_events_subject)

    def to_json(self) -> bytes:
        """Encode as UTF-8 JSON."""
        return _JSON_ENCODER.encode(self)

    def to_msgpack(self) -> bytes:
        """Encode as msgpack."""
        return _MSGPACK_ENCODER.encode(self)

    @classmethod
    def from_json(cls, data: bytes | str) -> WorkerCard:
        """Decode and validate a JSON card; raises :class:`WorkerCardError` if malformed."""
        try:
            return _JSON_DECODER.decode(data)
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
            raise WorkerCardError(f"malformed worker card (JSON): {exc}") from None

    @classmethod
    def from_msgpack(cls, data: bytes) -> WorkerCard:
        """Decode and validate a msgpack card; raises :class:`WorkerCardError` if malformed."""
        try:
            return _MSGPACK_DECODER.decode(data)
        except msgspec.DecodeError as exc:
            raise WorkerCardError(f"malformed worker card (msgpack): {exc}") from None

    def to_dict(self) -> WorkerCardDict:
        """Plain builtins (for embedding in other JSON documents)."""
        builtins: WorkerCardDict = msgspec.to_builtins(self)  # msgspec types its result as Any
        return builtins

    @classmethod
    def from_dict(cls, data: object) -> WorkerCard:
        """Validate plain builtins into a card; raises :class:`WorkerCardError` if malformed."""
        try:
            return msgspec.convert(data, cls)
        except msgspec.ValidationError as exc:
            raise WorkerCardError(f"malformed worker card: {exc}") from None


def _check_host_port(address: object) -> None:
    """Raise ValueError unless ``address`` is ``host:port`` with a port in 1..65535."""
    match = _HOST_PORT.match(address) if isinstance(address, str) else None
    if match is None or not 1 <= int(match.group(2)) <= 65535:
        raise ValueError(f"request_plane_address must be 'host:port', got {address!r}")


def _check_kv_subject(address: str | None, subject: str | None) -> None:
    """A NATS address needs a subject, a subject needs a NATS address, and the subject must be a
    literal NATS subject (dot-separated tokens, no wildcards or whitespace)."""
    nats_address = address is not None and address.startswith("nats://")
    if subject is None:
        if nats_address:
            raise ValueError("kv_events_address is a NATS server: kv_events_subject is required")
        return
    if not nats_address:
        raise ValueError(f"kv_events_subject needs a nats:// kv_events_address, got {address!r}")
    if _SUBJECT.match(subject) is None:
        raise ValueError(f"kv_events_subject must be a literal NATS subject, got {subject!r}")


if set(WorkerCardDict.__annotations__) != set(WorkerCard.__struct_fields__):  # keep the two in step
    raise TypeError("WorkerCardDict must have exactly the fields of WorkerCard")

_SUBJECT = re.compile(r"^[^.*>\s]+(\.[^.*>\s]+)*$")
_JSON_ENCODER = msgspec.json.Encoder()
_JSON_DECODER = msgspec.json.Decoder(WorkerCard)
_MSGPACK_ENCODER = msgspec.msgpack.Encoder()
_MSGPACK_DECODER = msgspec.msgpack.Decoder(WorkerCard)
