"""`tandem chat` end to end: a real process on a pseudo-terminal, driven like a person would."""

from __future__ import annotations

import os
import re
import sys

import pexpect  # a test dependency (pyproject [test])

PROMPT = ">>> "
ANSWER_END = re.compile(r"tok/s[^\n]*\n")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def spawn_chat(*flags: str) -> pexpect.spawn:
    env = {**os.environ, "TERM": "dumb", "COLUMNS": "200"}
    child = pexpect.spawn(
        sys.executable, ["-m", "tandem", "chat", *flags], env=env, encoding="utf-8", timeout=60, dimensions=(50, 200)
    )
    child.expect_exact(PROMPT, timeout=120)  # model load
    return child


def clean(text: str) -> str:
    return ANSI.sub("", text).replace("\r", "")


def ask(child: pexpect.spawn, question: str) -> str:
    """Send a question; return the streamed answer (without the echo and the stats line)."""
    child.sendline(question)
    child.expect(ANSWER_END)
    answer = clean(child.before).split(question, 1)[-1]
    child.expect_exact(PROMPT)
    return answer.rsplit("\n", 1)[0].strip()


def test_chat_session():
    child = spawn_chat("--temperature", "0", "--max-tokens", "24")
    try:
        answer = ask(child, "What is the capital of France?")
        assert "Paris" in answer
        follow_up = ask(child, "And what is the capital of Germany?")
        assert follow_up and "\ufffd" not in follow_up

        child.sendline("/stats")
        child.expect_exact(PROMPT)
        stats = clean(child.before)
        assert re.search(r"KV cache: \d+\.\d% used", stats)
        assert "conversation: 2 exchanges" in stats
        assert re.search(r"prompt tokens \d+ \([1-9]\d* cached\)", stats)  # the history hit the prefix cache

        child.sendline("/reset")
        child.expect_exact("history cleared")
        child.expect_exact(PROMPT)
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_ctrl_c_aborts_the_answer_then_quits():
    child = spawn_chat("--temperature", "0", "--max-tokens", "1000")
    try:
        question = "Write a very long story about a dragon who learns to cook."
        child.sendline(question)
        child.expect_exact(question)  # the terminal's echo
        child.expect(r"\w+ \w+ \w+")  # the answer has started streaming
        child.sendintr()
        child.expect_exact("aborted")
        child.expect_exact(PROMPT)

        child.sendline("/stats")
        child.expect_exact(PROMPT)
        stats = clean(child.before)
        assert "0 running, 0 waiting" in stats
        assert "KV cache: 0.0% used" in stats  # the aborted request's blocks were freed
        assert "conversation: 0 exchanges" in stats  # an aborted turn is not kept

        # Ctrl-C at the prompt quits. A Ctrl-C that lands between readline drawing the prompt and
        # entering its read loop only sets Python's signal flag, which readline's blocking read
        # does not see (on a loaded machine the window is wide enough to hit): a user then
        # presses it again, and so does this test, once.
        child.sendintr()
        if child.expect([pexpect.EOF, pexpect.TIMEOUT], timeout=10) == 1:
            child.sendintr()
            child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 130
