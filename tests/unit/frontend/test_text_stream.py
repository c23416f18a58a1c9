"""TextStream on the real SmolLM2 tokenizer: incremental text, stop strings across token boundaries."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tandem.frontend.text_stream import TextDelta, TextStream

REPLACEMENT_CHAR = "\ufffd"


@pytest.fixture(scope="module")
def tokenizer():
    from tandem.models.tokenizer import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def stream_through(
    stream: TextStream, ids: list[int], sizes: list[int] | None = None
) -> tuple[list[TextDelta], TextDelta]:
    """Push ``ids`` in chunks of ``sizes`` (cycled; default one token at a time), then finish."""
    sizes = sizes or [1]
    deltas, i, k = [], 0, 0
    while i < len(ids):
        size = max(1, sizes[k % len(sizes)])
        deltas.append(stream.push(ids[i : i + size]))
        i, k = i + size, k + 1
    return deltas, stream.finish()


def joined(deltas: list[TextDelta], tail: TextDelta) -> str:
    return "".join(d.text for d in deltas) + tail.text


TEXTS = [
    "Hello, world! The capital of France is Paris.",
    "  spaces,\ttabs\nand new lines\n\n",
    "Crème brûlée, naïve façade, Straße",
    "I ❤️ 🦀 emojis 👩‍👩‍👧 and flags 🇫🇷",
    "日本語のテキストと中文文本，한국어 텍스트",
    "code: def f(x):\n    return x ** 2",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_pushing_tokens_gives_the_full_decode(tokenizer, text, chunk):
    ids = tokenizer.encode(text, add_special_tokens=False)
    stream = TextStream(tokenizer)
    deltas, tail = stream_through(stream, ids, [chunk])
    assert joined(deltas, tail) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert stream.text == text and not stream.stopped and stream.stop_string is None
    assert not any(d.stopped for d in deltas) and not tail.stopped


def test_prompt_tokens_are_context_not_output(tokenizer):
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    answer = " Hello there, friend"
    ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    deltas, tail = stream_through(TextStream(tokenizer, prompt), ids)
    assert joined(deltas, tail) == answer  # leading space kept, EOS skipped


def test_multibyte_characters_never_emit_a_replacement_char(tokenizer):
    text = "🦀🦀 日本語 👩‍👩‍👧 ∀x∈ℝ 𝔘𝔫𝔦"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any(REPLACEMENT_CHAR in tokenizer.decode([i]) for i in ids)  # premise: characters span tokens
    for stop in ([], ["日本"], ["zzz-never"]):
        deltas, tail = stream_through(TextStream(tokenizer, stop=stop), ids)
        assert not any(REPLACEMENT_CHAR in d.text for d in deltas)
        expected = text if not stop or stop[0] not in text else text[: text.index(stop[0])]
        assert joined(deltas, tail) == expected


def test_stop_string_spanning_tokens_is_trimmed(tokenizer):
    text = "The answer is forty-two. After that, nothing."
    stop = "forty-two"
    ids = tokenizer.encode(text, add_special_tokens=False)
    # Premise: the stop string is not one token (it spans a boundary).
    assert not any(tokenizer.decode([i]) == stop for i in ids)
    stream = TextStream(tokenizer, stop=[stop])
    deltas = []
    for token in ids:
        deltas.append(stream.push([token]))
        if deltas[-1].stopped:
            break
    assert deltas[-1].stopped and sum(d.stopped for d in deltas) == 1
    assert "".join(d.text for d in deltas) == "The answer is "
    assert stream.stop_string == stop and stream.text == "The answer is "
    # Nothing after the stop is ever emitted, whatever comes next.
    assert stream.push(tokenizer.encode(" more", add_special_tokens=False)) == TextDelta("", True)
    assert stream.finish() == TextDelta("", True)
    assert stream.text == "The answer is "


def test_partial_stop_is_held_back_then_released_on_finish(tokenizer):
    text = "Hello wor"
    ids = tokenizer.encode(text, add_special_tokens=False)
    stream = TextStream(tokenizer, stop=["world!"])
    deltas, tail = stream_through(stream, ids)
    pushed = "".join(d.text for d in deltas)
    assert len(pushed) <= len(text) - (len("world!") - 1)  # the tail could still start a stop
    assert text.startswith(pushed) and tail.text == text[len(pushed) :]
    assert not tail.stopped and stream.text == text


def test_held_back_text_is_released_once_the_stop_can_no_longer_match(tokenizer):
    ids = tokenizer.encode("abc and more words here", add_special_tokens=False)
    stream = TextStream(tokenizer, stop=["abcX"])
    deltas, tail = stream_through(stream, ids)
    assert joined(deltas, tail) == "abc and more words here"
    assert "".join(d.text for d in deltas).startswith("abc")  # released before finish()


def test_stop_string_at_the_very_start(tokenizer):
    ids = tokenizer.encode("Hello there", add_special_tokens=False)
    stream = TextStream(tokenizer, stop=["Hello"])
    deltas, tail = stream_through(stream, ids)
    assert joined(deltas, tail) == "" and stream.stopped and stream.stop_string == "Hello"
    first_stop = next(i for i, d in enumerate(deltas) if d.stopped)
    assert all(d == TextDelta("", True) for d in deltas[first_stop:])


def test_stop_string_at_the_very_end_finishes_in_finish(tokenizer):
    ids = tokenizer.encode("count to three", add_special_tokens=False)
    stream = TextStream(tokenizer, stop=["three"])
    deltas, tail = stream_through(stream, ids)
    assert joined(deltas, tail) == "count to " and stream.stopped


@pytest.mark.parametrize(
    ("stops", "expected", "which"),
    [
        (["cde", "bcd"], "a", "bcd"),  # both complete in the same push: the earlier one wins
        (["bcd", "bcdef"], "a", "bcdef"),  # same start: the longer one is reported
        (["ef", "xyz", "b"], "a", "b"),
        (["abcdefg"], "abcdef", None),  # never completes: everything comes out on finish
    ],
)
def test_overlapping_stop_strings_earliest_wins(tokenizer, stops, expected, which):
    ids = tokenizer.encode("abcdef", add_special_tokens=False)
    stream = TextStream(tokenizer, stop=stops)
    deltas, tail = [stream.push(ids)], stream.finish()  # one push: every stop is visible at once
    assert joined(deltas, tail) == expected
    assert stream.stop_string == which and stream.stopped == (which is not None)


def test_overlapping_stop_strings_token_by_token(tokenizer):
    # Streaming: the earliest complete stop string in the text seen so far wins.
    ids = tokenizer.encode("one two three four", add_special_tokens=False)
    stream = TextStream(tokenizer, stop=["three four", "two three"])
    deltas, tail = stream_through(stream, ids)
    assert joined(deltas, tail) == "one " and stream.stop_string == "two three"


def test_empty_stop_strings_are_ignored(tokenizer):
    ids = tokenizer.encode("plain text", add_special_tokens=False)
    deltas, tail = stream_through(TextStream(tokenizer, stop=["", ""]), ids)
    assert joined(deltas, tail) == "plain text"
    assert all(d.text for d in deltas)  # no hold-back without real stop strings


# --- property: any chunking, any stop substring ---------------------------------------------------

ALPHABET = st.sampled_from(list("abcdefgh xyz,.!?\n\t'") + ["é", "ß", "日", "本", "語", "🦀", "👋", "❤️", "한"])
TEXT = st.lists(ALPHABET, min_size=1, max_size=40).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, data=st.data())
def test_property_output_is_the_text_up_to_the_first_stop(tokenizer, text, data):
    ids = tokenizer.encode(text, add_special_tokens=False)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assume(full)
    if data.draw(st.booleans(), label="stop from the text"):
        start = data.draw(st.integers(0, len(full) - 1), label="start")
        stop = full[start : start + data.draw(st.integers(1, 6), label="length")]
    else:
        stop = data.draw(st.lists(ALPHABET, min_size=1, max_size=3).map("".join), label="stop")
    sizes = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=8), label="push sizes")

    stream = TextStream(tokenizer, stop=[stop])
    deltas, tail = stream_through(stream, ids, sizes)
    found = full.find(stop)
    expected = full if found < 0 else full[:found]
    assert joined(deltas, tail) == expected
    assert stream.stopped == (found >= 0) and stream.text == expected
    emitted = [d.text for d in deltas] + [tail.text]
    assert not any(REPLACEMENT_CHAR in piece for piece in emitted)
    if found >= 0:  # the stop is reported once, and nothing comes after it
        first = next(i for i, d in enumerate(deltas + [tail]) if d.stopped)
        assert all(piece == "" for piece in emitted[first + 1 :])
