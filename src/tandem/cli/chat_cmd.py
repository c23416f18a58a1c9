"""``tandem chat``: an interactive, streaming chat in the terminal on the builtin engine.

The model is loaded once; each turn renders the whole conversation with the tokenizer's chat
template (the prefix cache makes the repeated history cheap), then steps the synchronous engine,
printing each token's text as soon as it is stable. Ctrl-C during an answer aborts it in the
engine (its KV blocks are freed) and returns to the prompt; Ctrl-C or Ctrl-D at the prompt quits.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

from tandem.cli.engine_args import add_engine_args, engine_config_from_args

if TYPE_CHECKING:  # keep `tandem --help` from importing torch
    from rich.console import Console

    from tandem.engine.llm_engine import LLMEngine
    from tandem.frontend.detokenizer import IncrementalDetokenizer
    from tandem.protocols.sampling_params import SamplingParams

PROMPT = ">>> "
HELP = "/reset clears the history, /stats shows engine stats, /exit or Ctrl-D quits, Ctrl-C stops an answer"


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``chat`` and its flags."""
    parser = subparsers.add_parser("chat", help="chat with a model in the terminal (streaming)")
    add_engine_args(parser)
    parser.add_argument("--system", metavar="PROMPT", help="system prompt (default: the chat template's own)")
    parser.add_argument("--max-tokens", type=int, default=256, help="most tokens per answer (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    parser.add_argument("--seed", type=int, help="sampling seed, for reproducible answers")
    parser.set_defaults(func=run)


@dataclass
class Chat:
    """One conversation: the engine, the turns so far and the context they take."""

    engine: LLMEngine
    console: Console
    params: SamplingParams
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    turns: int = 0
    context_tokens: int = 0

    def messages(self, user_text: str) -> list[dict[str, str]]:
        """System prompt + history + the new user turn."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history + [{"role": "user", "content": user_text}]


class SigintFlag:
    """While active, Ctrl-C sets ``hit`` instead of raising, so a step is never cut in half."""

    hit = False
    _previous: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.hit = True

    def __enter__(self) -> SigintFlag:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)


def run(args: argparse.Namespace) -> int:
    """The prompt loop; returns the exit code."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input() on a terminal)
    from rich.console import Console

    from tandem.protocols.sampling_params import SamplingParams

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    console = Console(highlight=False, soft_wrap=True)
    try:
        engine = load_engine(args, console)
    except KeyboardInterrupt:
        return 130
    if engine is None:
        return 1
    chat = Chat(engine, console, params, args.system)
    console.print(f"[bold]tandem chat[/bold] · {engine.loaded.name} ({args.device}, {args.dtype})\n[dim]{HELP}[/dim]")
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            return 130
        if line.strip() in ("/exit", "/quit"):
            return 0
        handle_line(chat, line.strip())


def handle_line(chat: Chat, text: str) -> None:
    """Run a /command or answer a message."""
    if text == "/reset":
        chat.history.clear()
        chat.context_tokens = 0
        chat.console.print("[dim]history cleared[/dim]")
    elif text == "/stats":
        print_stats(chat)
    elif text.startswith("/"):
        chat.console.print(f"[yellow]unknown command {text}[/yellow] [dim]{HELP}[/dim]")
    elif text:
        with SigintFlag() as interrupt:  # from here on Ctrl-C stops the answer, not the program
            answer(chat, text, interrupt)


def load_engine(args: argparse.Namespace, console: Console) -> LLMEngine | None:
    """Build the engine (pulling the model into the cache on first use) under a spinner."""
    from tandem.engine.llm_engine import LLMEngine
    from tandem.model_cache.errors import ModelLoadError

    try:
        config = engine_config_from_args(args)
        with console.status(f"loading {args.model}…"):
            engine = LLMEngine(config)
    except (ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    if not getattr(engine.loaded.tokenizer, "chat_template", None):
        print(f"error: {engine.loaded.name} has no tokenizer with a chat template", file=sys.stderr)
        return None
    return engine


def answer(chat: Chat, user_text: str, interrupt: SigintFlag) -> None:
    """Stream one answer to stdout; keep the turn in the history unless it failed or was aborted."""
    from tandem.frontend.detokenizer import IncrementalDetokenizer

    engine = chat.engine
    try:
        prompt = engine.loaded.tokenizer.apply_chat_template(
            chat.messages(user_text), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        request_id = f"chat-{chat.turns}"
        chat.turns += 1
        engine.add_request(request_id, prompt, chat.params)
    except ValueError as exc:
        chat.console.print(f"[red]error:[/red] {exc}")
        return
    detok = IncrementalDetokenizer(engine.loaded.tokenizer, prompt_token_ids=prompt)
    started = time.perf_counter()
    reason, num_tokens, cached = stream(engine, request_id, detok, interrupt)
    elapsed = time.perf_counter() - started
    if reason is None:
        chat.console.print("[dim]⏹ aborted[/dim]")
        return
    chat.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": detok.text.strip()}]
    chat.context_tokens = len(prompt) + num_tokens
    speed = num_tokens / elapsed if elapsed > 0 else 0.0
    note = " · hit --max-tokens" if reason == "length" else ""
    chat.console.print(
        f"[dim]{num_tokens} tokens in {elapsed:.1f}s · {speed:.1f} tok/s · "
        f"prompt {len(prompt)} tokens ({cached} cached){note}[/dim]"
    )


def stream(
    engine: LLMEngine, request_id: str, detok: IncrementalDetokenizer, interrupt: SigintFlag
) -> tuple[str | None, int, int]:
    """Step the engine until the request finishes or Ctrl-C aborts it, printing stable text.

    Returns the finish reason (None when aborted), the output tokens and the cached prompt tokens.
    """
    reason, num_tokens, cached = None, 0, 0
    try:
        while reason is None and not interrupt.hit:
            for out in engine.step():
                if out.request_id == request_id and not interrupt.hit:
                    num_tokens, cached = out.num_output_tokens, out.num_cached_tokens
                    write(detok.push(out.new_token_ids))
                    reason = out.finish_reason
    finally:
        if reason is None:  # Ctrl-C (or a failed step): free the request's KV blocks
            engine.abort_request(request_id)
    if reason is not None:  # an aborted answer's held-back tail may end mid-character: drop it
        write(detok.flush())
    if not detok.text.endswith("\n"):
        write("\n")
    return reason, num_tokens, cached


def write(text: str) -> None:
    """Print a piece of the answer at once."""
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


def print_stats(chat: Chat) -> None:
    """The engine's counters and the conversation's size."""
    s = chat.engine.stats()
    lines = [
        f"requests: {s.num_running} running, {s.num_waiting} waiting · steps {s.steps_total} · "
        f"preemptions {s.num_preemptions}",
        f"KV cache: {s.kv_usage:.1%} used · {s.num_free_blocks}/{s.num_total_blocks} blocks free "
        f"(block size {chat.engine.block_size})",
        f"prefix cache: {s.prefix_cache_hit_rate:.1%} hit rate · prompt tokens {s.prompt_tokens_total} "
        f"({s.cached_prompt_tokens_total} cached) · generated {s.generation_tokens_total}",
        f"conversation: {len(chat.history) // 2} exchanges · context {chat.context_tokens}/"
        f"{chat.engine.max_model_len} tokens",
    ]
    chat.console.print("\n".join(f"[dim]{line}[/dim]" for line in lines))
