"""Prompt preparation: long prompts are tokenized off the event loop; deltas merge losslessly."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from tandem.engine.outputs import RequestOutput, TokenLogprob
from tandem.frontend.openai_requests import ChatCompletionRequest, CompletionRequest
from tandem.frontend.preprocess import INLINE_TOKENIZE_CHARS, Tokenizers, prepare_prompt
from tandem.protocols.endpoints import GenerateDelta, TokenLogprobPayload


@pytest.fixture(scope="module")
def tokenizer():
    from tandem.models.tokenizer import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def _long_text(tokenizer, words: int) -> str:
    rng = random.Random(0)
    vocab = [w for w in (tokenizer.decode([i]).strip() for i in range(1000, 5000)) if w.isalpha()]
    return " ".join(rng.choice(vocab) for _ in range(words))


def test_long_prompt_tokenization_does_not_stall_the_event_loop(tokenizer):
    text = _long_text(tokenizer, 40_000)  # ~250 k characters: a few hundred ms to tokenize
    request = CompletionRequest(model="m", prompt=text)

    async def run() -> tuple[float, float, list[int]]:
        tokenizers = Tokenizers()
        gaps: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:  # stands in for another stream's chunks
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        task = asyncio.create_task(ticker())
        start = time.perf_counter()
        prepared = await prepare_prompt(tokenizers, tokenizer, request)
        took = time.perf_counter() - start
        stop.set()
        await task
        tokenizers.shutdown()
        return took, max(gaps), prepared.token_ids

    took, worst_gap, ids = asyncio.run(run())
    assert ids == tokenizer.encode(text)
    # The loop kept ticking while the prompt was tokenized: its worst stall is a small part of it.
    assert took > 0.05
    assert worst_gap < took / 3, (worst_gap, took)


def test_short_prompts_and_chat_give_the_template_tokens(tokenizer):
    async def run():
        tokenizers = Tokenizers()
        chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "Hi there"}])
        short = await prepare_prompt(tokenizers, tokenizer, chat)
        long_chat = ChatCompletionRequest(
            model="m", messages=[{"role": "user", "content": "word " * INLINE_TOKENIZE_CHARS}]
        )
        long = await prepare_prompt(tokenizers, tokenizer, long_chat)
        tokenizers.shutdown()
        return short, long

    short, long = asyncio.run(run())
    for prepared, content in ((short, "Hi there"), (long, "word " * INLINE_TOKENIZE_CHARS)):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        assert prepared.text == text
        assert prepared.token_ids == tokenizer.encode(text, add_special_tokens=False)


def test_request_output_merge_keeps_every_token_and_the_latest_counters():
    a = RequestOutput(
        "r",
        [1, 2],
        num_prompt_tokens=5,
        num_cached_tokens=0,
        num_output_tokens=2,
        logprobs=[TokenLogprob(1, -0.1), TokenLogprob(2, -0.2)],
    )
    b = RequestOutput(
        "r",
        [3],
        finished=True,
        finish_reason="stop",
        num_prompt_tokens=5,
        num_cached_tokens=0,
        num_output_tokens=3,
        logprobs=[TokenLogprob(3, -0.3)],
        stop_token_id=3,
    )
    merged = a.merge(b)
    assert merged.new_token_ids == [1, 2, 3]
    assert [lp.token_id for lp in merged.logprobs] == [1, 2, 3]
    assert (merged.finished, merged.finish_reason, merged.num_output_tokens, merged.stop_token_id) == (
        True,
        "stop",
        3,
        3,
    )


def test_generate_delta_merge():
    a = GenerateDelta([7], num_prompt_tokens=4, num_cached_tokens=0, num_output_tokens=1)
    b = GenerateDelta(
        [8, 9],
        num_prompt_tokens=4,
        num_output_tokens=3,
        finish_reason="length",
        logprobs=[TokenLogprobPayload(8, -1.0), TokenLogprobPayload(9, -2.0)],
    )
    merged = a.merge(b)
    assert merged.token_ids == [7, 8, 9]
    assert merged.num_output_tokens == 3 and merged.finish_reason == "length"
    assert [lp.token_id for lp in merged.logprobs] == [8, 9]
