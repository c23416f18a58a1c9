"""vLLM's own greedy outputs, the reference of the `--engine vllm` end-to-end tests.

Run as a script (``python tests/e2e/vllm_reference.py [REQUESTS.json]``, else the requests on
stdin), it loads SmolLM2-135M-Instruct from Tandem's model cache into vLLM's offline ``LLM`` with
the settings the tests give ``tandem serve --engine vllm`` (float32, eager, 32-token blocks; on
vLLM's CPU build that is the combination that gives exact text), runs ``LLM.generate`` greedily
on the given prompt token ids and prints one JSON line: ``[{"token_ids": [...], "finish_reason":
...}, ...]``, in request order. The requests are ``[{"prompt_token_ids": [...], "max_tokens": N,
"ignore_eos": false}, ...]``. vLLM's own log goes to stderr.

Tests import this module for `VllmReference` (the script as a child process in its own session,
so its engine core never outlives it), `VLLM_ENV` and `SERVE_ARGS`; vLLM is imported only by the
script itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

MODEL = "smollm2-135m-instruct"
BLOCK_SIZE = 32
MAX_MODEL_LEN = 2048
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}
"""A 1 GiB KV cache per engine (plenty for these tests), no usage reports, no hub lookups."""
SERVE_ARGS = (
    "--engine",
    "vllm",
    "--dtype",
    "float32",
    "--block-size",
    str(BLOCK_SIZE),
    "--max-model-len",
    str(MAX_MODEL_LEN),
    "--vllm-arg",
    "enforce_eager=true",
)
"""`tandem serve` flags that match the reference's engine settings."""


@dataclass
class Greedy:
    """One greedy generation, as vLLM's ``LLM.generate`` produced it."""

    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    """The output decoded as the frontend does (special tokens skipped)."""
    finish_reason: str


class VllmReference:
    """The script as a child process: start it with the requests, collect its outputs later (it
    loads vLLM while the test's server boots)."""

    def __init__(self, requests: list[dict[str, Any]]) -> None:
        self.requests = requests
        self._input = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)  # noqa: SIM115 (removed in result)
        json.dump(requests, self._input)
        self._input.close()
        self._stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in result)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, self._input.name],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **VLLM_ENV},
            start_new_session=True,  # its engine core is in its group: killpg reaches it
        )
        self._outputs: list[dict[str, Any]] | None = None

    def result(self, timeout: float = 300.0) -> list[dict[str, Any]]:
        """``[{"token_ids", "finish_reason"}]`` in request order (AssertionError with vLLM's log if
        the script failed)."""
        if self._outputs is None:
            try:
                stdout, _ = self.proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                stdout = ""
            finally:
                self.close()
            self._stderr.seek(0)
            log = self._stderr.read()[-6000:]
            self._stderr.close()
            lines = stdout.strip().splitlines()
            assert self.proc.returncode == 0 and lines, f"vllm_reference.py failed ({self.proc.returncode}):\n{log}"
            self._outputs = json.loads(lines[-1])
            assert len(self._outputs) == len(self.requests)
        return self._outputs

    def close(self) -> None:
        """Kill the script and whatever it started (idempotent)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # an engine core left behind
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._input.name)


class Prompts:
    """The model's HF tokenizer in the test process: prompt token ids as the frontend builds them
    (chat template, or plain encoding), and vLLM's outputs as `Greedy` results."""

    def __init__(self) -> None:
        from transformers import AutoTokenizer

        from tandem.model_cache import resolve_model

        self.tok = AutoTokenizer.from_pretrained(resolve_model(MODEL, progress=False).hf_dir)

    def chat_ids(self, question: str) -> list[int]:
        text = self.tok.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        return list(self.tok.encode(text, add_special_tokens=False))

    def completion_ids(self, prompt: str) -> list[int]:
        return list(self.tok.encode(prompt))

    def greedy(self, request: dict[str, Any], output: dict[str, Any]) -> Greedy:
        ids = output["token_ids"]
        return Greedy(
            request["prompt_token_ids"], ids, self.tok.decode(ids, skip_special_tokens=True), output["finish_reason"]
        )


def main(argv: list[str]) -> None:
    if argv:
        with open(argv[0]) as f:
            requests = json.load(f)
    else:
        requests = json.load(sys.stdin)
    # vLLM and its engine core write their log to stdout: keep stdout for the JSON line only.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for name, value in VLLM_ENV.items():
        os.environ.setdefault(name, value)

    from vllm.inputs import TokensPrompt

    from tandem.model_cache import resolve_model
    from vllm import LLM, SamplingParams

    hf_dir = resolve_model(MODEL, progress=False).hf_dir
    llm = LLM(
        model=str(hf_dir),
        dtype="float32",
        enforce_eager=True,
        block_size=BLOCK_SIZE,
        max_model_len=MAX_MODEL_LEN,
    )
    prompts = [TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in requests]
    params = [
        SamplingParams(temperature=0, max_tokens=r["max_tokens"], ignore_eos=r.get("ignore_eos", False))
        for r in requests
    ]
    results = llm.generate(prompts, params, use_tqdm=False)
    outputs = [
        {"token_ids": list(r.outputs[0].token_ids), "finish_reason": r.outputs[0].finish_reason} for r in results
    ]
    out.write(json.dumps(outputs) + "\n")
    out.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
