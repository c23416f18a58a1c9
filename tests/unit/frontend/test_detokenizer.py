"""IncrementalDetokenizer on the real SmolLM2 tokenizer (byte-level BPE: multi-byte characters span tokens)."""

from __future__ import annotations

import pytest

from tandem.frontend.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer

TEXTS = [
    "Hello, world! The capital of France is Paris.",
    "  leading spaces, tabs\tand\nnew lines\n\n",
    "Crème brûlée, naïve façade, Ångström, ß, Straße, señor",
    "I ❤️ 🦀 emojis 👩‍👩‍👧 and flags 🇫🇷🇯🇵",
    "日本語のテキストと中文文本，한국어 텍스트",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math: ∀x ∈ ℝ, x² ≥ 0 — “quotes” …",
    "code: def f(x):\n    return x ** 2  # ok",
    "a",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from tandem.model_cache import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct").hf_dir)


def stream(detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1) -> list[str]:
    pieces = [detok.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return pieces + [detok.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_matches_full_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = stream(detok, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert detok.text == text
    assert not any(REPLACEMENT_CHAR in piece for piece in pieces)


def test_multibyte_characters_really_span_tokens(tokenizer):
    # Guard the test's premise: some tokens decode to U+FFFD on their own.
    ids = tokenizer.encode("🦀 日本語")
    assert any(REPLACEMENT_CHAR in tokenizer.decode([i]) for i in ids)
    pieces = stream(IncrementalDetokenizer(tokenizer), ids)
    assert "".join(pieces) == "🦀 日本語"
    assert pieces[-1] == ""  # nothing held back at the end of valid text


@pytest.mark.parametrize("chunk", [2, 3, 7])
def test_chunks_of_several_tokens(tokenizer, chunk):
    text = "".join(TEXTS)
    ids = tokenizer.encode(text)
    pieces = stream(IncrementalDetokenizer(tokenizer), ids, chunk)
    assert "".join(pieces) == text
    assert not any(REPLACEMENT_CHAR in piece for piece in pieces)


def test_with_chat_prompt_and_eos(tokenizer):
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hi in Japanese"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    answer = "こんにちは! That is «hello» 👋"
    output = tokenizer.encode(answer) + [tokenizer.eos_token_id]
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids=prompt)
    pieces = stream(detok, output)
    assert "".join(pieces) == answer  # the EOS special token is skipped
    assert not any(REPLACEMENT_CHAR in piece for piece in pieces)
    full = tokenizer.decode(prompt + output, skip_special_tokens=True)
    assert full == tokenizer.decode(prompt, skip_special_tokens=True) + answer


def test_keeps_special_tokens_when_asked(tokenizer):
    ids = tokenizer.encode("done") + [tokenizer.eos_token_id]
    pieces = stream(IncrementalDetokenizer(tokenizer, skip_special_tokens=False), ids)
    assert "".join(pieces) == tokenizer.decode(ids) == "done" + tokenizer.eos_token


def test_incomplete_character_is_held_back_until_flush(tokenizer):
    ids = tokenizer.encode("ok 🦀")
    detok = IncrementalDetokenizer(tokenizer)
    held = ids[:-1]  # the crab's last byte is missing
    text = "".join(detok.push([i]) for i in held)
    assert text == "ok"
    tail = detok.flush()  # the stream ended mid-character: what is left comes out, U+FFFD and all
    assert tail.endswith(REPLACEMENT_CHAR) and (text + tail) == tokenizer.decode(held)
    assert detok.flush() == ""


def test_window_stays_short(tokenizer):
    # O(window) per token: the decoded window never grows with the output length.
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. 🦊 " * 40)
    detok = IncrementalDetokenizer(tokenizer)
    longest = 0
    for i in ids:
        detok.push([i])
        longest = max(longest, len(detok._window))
    assert len(ids) > 400 and longest <= 8


def test_any_text_streams_exactly(tokenizer):
    from hypothesis import HealthCheck, assume, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.text(max_size=40), st.integers(1, 4))
    def check(text: str, chunk: int) -> None:
        ids = tokenizer.encode(text)
        assume(tokenizer.decode(ids) == text)  # valid text: some unassigned code points do not round-trip
        assume(REPLACEMENT_CHAR not in text)  # a literal U+FFFD in the input may of course come out
        pieces = stream(IncrementalDetokenizer(tokenizer), ids, chunk)
        assert "".join(pieces) == text
        assert not any(REPLACEMENT_CHAR in piece for piece in pieces)

    check()
