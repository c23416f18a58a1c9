"""What a worker serves: the interface shared by the builtin `AsyncEngine` and `VllmEngine`."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import Any, Protocol

from tandem.engine.outputs import RequestOutput
from tandem.protocols.endpoints import EngineStats
from tandem.protocols.sampling_params import SamplingParams


class ServedEngine(Protocol):
    failure: BaseException | None
    """What killed the engine; None while it runs or after a clean shutdown."""

    @property
    def block_size(self) -> int: ...
    @property
    def num_kv_blocks(self) -> int: ...
    @property
    def max_model_len(self) -> int: ...
    @property
    def is_running(self) -> bool: ...

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        """Raise ValueError if the engine cannot take this prompt."""

    def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        cache_salt: str | None = None,
        on_finish: Callable[[Any], Any] | None = None,
        prompt_validated: bool = False,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream a request's outputs; leaving the iterator early aborts the request."""

    def stats(self) -> EngineStats: ...
    def shutdown(self, timeout: float = 10.0, wait: bool = True) -> None: ...
    async def wait_stopped(self) -> BaseException | None: ...


def check_prompt(prompt_token_ids: list[int], vocab_size: int, max_model_len: int) -> None:
    """The checks every engine makes of a prompt: not empty, known token ids, room to generate."""
    if not prompt_token_ids:
        raise ValueError("prompt must contain at least one token")
    if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
    if len(prompt_token_ids) >= max_model_len:
        raise ValueError(f"prompt has {len(prompt_token_ids)} tokens; this model's context is {max_model_len}")
