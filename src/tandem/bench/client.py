"""Send one benchmark request to an OpenAI-compatible server and time it.

aiohttp, as vLLM's and SGLang's serving benchmarks use: one pooled session, streamed SSE read
line by line, each event decoded with msgspec (a few microseconds) so the client stays far
from being the bottleneck. Timing follows AIPerf / vLLM conventions: TTFT is the time to the
first event that carries content; inter-token latencies are the gaps between later content
events; token counts come from ``usage`` (``stream_options.include_usage``) when the server
sends it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec

from tandem.bench.workloads.request import BenchRequest


@dataclass
class ClientConfig:
    url: str = "http://127.0.0.1:8000"
    """Server base URL (with or without a trailing ``/v1``)."""
    model: str = "smollm2-135m-instruct"
    endpoint_type: str = "completions"
    """``completions`` (token-id or text prompts) or ``chat`` (messages)."""
    stream: bool = True
    ignore_eos: bool = True
    """Ask for exactly max_tokens (vLLM, SGLang and Tandem honour ``ignore_eos``)."""
    temperature: float = 0.0
    api_key: str = "EMPTY"
    timeout_s: float = 600.0
    """Whole-request timeout."""
    extra_body: dict[str, Any] = field(default_factory=dict)
    """Extra request fields, sent as given."""
    max_connections: int = 0
    """Connection pool limit (0: no limit)."""

    @property
    def base(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/v1") else url + "/v1"


@dataclass
class Outcome:
    ok: bool
    start: float
    """perf_counter() when the request was sent."""
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int = 0
    text: str = ""
    error: str | None = None
    error_detail: str | None = None


_decode = msgspec.json.Decoder().decode


class BenchClient:
    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> BenchClient:
        connector = aiohttp.TCPConnector(limit=self.config.max_connections, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
            headers={"Authorization": f"Bearer {self.config.api_key}"},
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def body(self, request: BenchRequest) -> tuple[str, dict[str, Any]]:
        cfg = self.config
        body: dict[str, Any] = {"model": cfg.model, "max_tokens": request.max_tokens, "temperature": cfg.temperature}
        if request.messages is not None:
            path, body["messages"] = "/chat/completions", request.messages
        else:
            path, body["prompt"] = "/completions", request.prompt
        if cfg.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        if cfg.ignore_eos:
            body["ignore_eos"] = True
        body.update(cfg.extra_body)
        return cfg.base + path, body

    async def send(self, request: BenchRequest) -> Outcome:
        """Send and time one request; never raises (failures come back as ``ok=False``)."""
        assert self._session is not None, "use `async with BenchClient(...)`"
        url, body = self.body(request)
        outcome = Outcome(ok=False, start=time.perf_counter())
        try:
            async with self._session.post(url, json=body) as response:
                if response.status != 200:
                    outcome.error = f"http_{response.status // 100}xx"
                    outcome.error_detail = f"{response.status}: {(await response.text())[:300]}"
                    return outcome
                if self.config.stream:
                    await self._read_stream(response, outcome)
                else:
                    self._read_whole(await response.read(), outcome)
        except asyncio.CancelledError:
            outcome.error = "cancelled"
            raise
        except TimeoutError:
            outcome.error, outcome.error_detail = "timeout", f"no complete answer within {self.config.timeout_s}s"
        except aiohttp.ClientError as exc:
            outcome.error, outcome.error_detail = "connection", str(exc)[:300]
        except (msgspec.DecodeError, KeyError, TypeError, ValueError) as exc:
            outcome.error, outcome.error_detail = "stream", f"malformed response: {exc}"[:300]
        return outcome

    async def _read_stream(self, response: aiohttp.ClientResponse, outcome: Outcome) -> None:
        last: float | None = None
        events = 0
        texts: list[str] = []
        async for line in response.content:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = _decode(data)
            if "error" in event:
                outcome.error, outcome.error_detail = "stream", str(event["error"])[:300]
                return
            if event.get("usage"):
                _read_usage(event["usage"], outcome)
            for choice in event.get("choices") or ():
                text = choice.get("text")
                if text is None:
                    text = (choice.get("delta") or {}).get("content")
                if not text:
                    continue
                now = time.perf_counter()
                if last is None:
                    outcome.ttft_s = now - outcome.start
                else:
                    outcome.itl_s.append(now - last)
                last = now
                events += 1
                texts.append(text)
        outcome.e2e_s = time.perf_counter() - outcome.start
        outcome.text = "".join(texts)
        if outcome.output_tokens is None:
            outcome.output_tokens = events
        if outcome.ttft_s is None and outcome.output_tokens:
            outcome.error, outcome.error_detail = "stream", "the stream ended without content"
            return
        outcome.ok = True

    def _read_whole(self, raw: bytes, outcome: Outcome) -> None:
        now = time.perf_counter()
        body = _decode(raw)
        choice = (body.get("choices") or [{}])[0]
        outcome.text = choice.get("text") or (choice.get("message") or {}).get("content") or ""
        outcome.ttft_s = outcome.e2e_s = now - outcome.start
        if body.get("usage"):
            _read_usage(body["usage"], outcome)
        outcome.ok = True


def _read_usage(usage: dict[str, Any], outcome: Outcome) -> None:
    outcome.input_tokens = usage.get("prompt_tokens")
    outcome.output_tokens = usage.get("completion_tokens")
    details = usage.get("prompt_tokens_details") or {}
    outcome.cached_tokens = details.get("cached_tokens") or 0
