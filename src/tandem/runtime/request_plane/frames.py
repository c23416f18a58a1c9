"""Request-plane wire format: length-prefixed msgpack frames.

On the TCP stream each frame is ``[u32 big-endian body length][msgpack body]``. The body is one of
the structs below, encoded as a msgpack array whose first element is the struct's tag (a msgspec
``array_like`` tagged union), e.g. ``["data", 7, {"token_ids": [42]}]``. Payloads are plain
msgpack data (dict, list, str, int, float, bool, None, bytes); nothing is ever unpickled.

Streams (``stream_id`` chosen by the client, unique per connection):

    client → server   Request, then optionally Cancel
    server → client   zero or more Data, then exactly one End or Error
    either way        Ping; the peer answers Pong with the same nonce
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

from tandem.runtime.request_plane.config import DEFAULT_MAX_FRAME_SIZE, RequestPlaneError

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size


class FrameError(RequestPlaneError):
    """Bytes on the wire (or a payload to send) violate the frame format."""


class FrameTooLargeError(FrameError):
    """A frame body exceeds the configured maximum size."""


class Request(msgspec.Struct, tag="req", array_like=True):
    """Open stream ``stream_id`` by calling ``endpoint`` with ``payload``."""

    stream_id: int
    endpoint: str
    payload: Any = None


class Data(msgspec.Struct, tag="data", array_like=True):
    """One response item of a stream."""

    stream_id: int
    payload: Any = None


class End(msgspec.Struct, tag="end", array_like=True):
    """The stream finished normally; no more frames follow for it."""

    stream_id: int


class Error(msgspec.Struct, tag="err", array_like=True):
    """The stream failed; no more frames follow for it."""

    stream_id: int
    code: str
    message: str
    exc_type: str = ""


class Cancel(msgspec.Struct, tag="cancel", array_like=True):
    """The client abandons the stream; the server cancels its handler."""

    stream_id: int


class Ping(msgspec.Struct, tag="ping", array_like=True):
    """Keepalive / round-trip probe."""

    nonce: int


class Pong(msgspec.Struct, tag="pong", array_like=True):
    """Answer to `Ping` with the same nonce."""

    nonce: int


Frame = Request | Data | End | Error | Cancel | Ping | Pong


class FrameEncoder:
    """Encodes frames into length-prefixed bytes, enforcing the maximum frame size."""

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._encoder = msgspec.msgpack.Encoder()

    def encode(self, frame: Frame) -> bytearray:
        """Header + body of one frame. Raises `FrameError` for unencodable or oversized payloads."""
        buf = bytearray(HEADER_SIZE)
        try:
            self._encoder.encode_into(frame, buf, HEADER_SIZE)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise FrameError(f"cannot encode {type(frame).__name__} frame: {exc}") from None
        body_size = len(buf) - HEADER_SIZE
        if body_size > self.max_frame_size:
            raise FrameTooLargeError(
                f"{type(frame).__name__} frame of {body_size} bytes exceeds the maximum frame "
                f"size of {self.max_frame_size} bytes"
            )
        HEADER.pack_into(buf, 0, body_size)
        return buf


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, get back every complete frame.

    Any violation raises `FrameError` (and only that). The byte stream cannot be resynchronized
    after an error, so the caller closes the connection; the decoder stays failed.
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._decoder = msgspec.msgpack.Decoder(Frame)
        self._buffer = bytearray()
        self._failed: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded (a partial frame)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        """Append ``data`` and decode all complete frames in order."""
        if self._failed is not None:
            raise self._failed
        buf = self._buffer
        buf += data
        frames: list[Frame] = []
        pos = 0
        try:
            # Walk header → body → header ...; stop at the first incomplete frame.
            with memoryview(buf) as view:
                while len(buf) - pos >= HEADER_SIZE:
                    (body_size,) = HEADER.unpack_from(view, pos)
                    if body_size > self.max_frame_size:
                        raise FrameTooLargeError(
                            f"peer announced a frame of {body_size} bytes; the maximum is {self.max_frame_size}"
                        )
                    end = pos + HEADER_SIZE + body_size
                    if end > len(buf):
                        break
                    frames.append(self._decode_body(view[pos + HEADER_SIZE : end]))
                    pos = end
        except FrameError as exc:
            self._failed = exc
            raise
        del buf[:pos]
        return frames

    def _decode_body(self, body: memoryview) -> Frame:
        try:
            return self._decoder.decode(body)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise FrameError(f"malformed frame ({len(body)} bytes): {exc}") from None
