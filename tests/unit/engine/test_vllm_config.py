"""The vLLM engine config: ``--vllm-arg KEY=VALUE`` parsing (JSON values, strings kept, dashes to
underscores, errors for items without ``=``), Tandem's flags mapped onto ``AsyncEngineArgs``
keywords (only the fields set; the KV budget in bytes; ``extra`` wins), and the check of
argument names against vLLM's real ``AsyncEngineArgs``."""

from __future__ import annotations

from typing import Any

import pytest

from tandem.engine.vllm.config import GIB, VllmEngineConfig, check_engine_arg_names, parse_vllm_args


@pytest.mark.parametrize(
    "item, expected",
    [
        ("enforce_eager=true", {"enforce_eager": True}),
        ("max_num_seqs=4", {"max_num_seqs": 4}),
        ("gpu_memory_utilization=0.9", {"gpu_memory_utilization": 0.9}),
        (
            'kv_transfer_config={"kv_role": "kv_both", "n": [1, 2]}',
            {"kv_transfer_config": {"kv_role": "kv_both", "n": [1, 2]}},
        ),
        ("seed=null", {"seed": None}),
        ('tokenizer="quoted"', {"tokenizer": "quoted"}),
    ],
)
def test_values_are_read_as_json_when_they_parse(item: str, expected: dict[str, Any]) -> None:
    assert parse_vllm_args([item]) == expected


@pytest.mark.parametrize(
    "item, expected",
    [
        ("dtype=float32", {"dtype": "float32"}),
        ("attention_backend=CPU_ATTN", {"attention_backend": "CPU_ATTN"}),
        ("served_model_name=", {"served_model_name": ""}),
        ("hf_overrides={not json", {"hf_overrides": "{not json"}),
        ("url=http://h:1/?a=b", {"url": "http://h:1/?a=b"}),  # only the first '=' splits
    ],
)
def test_values_that_are_not_json_are_kept_as_strings(item: str, expected: dict[str, Any]) -> None:
    assert parse_vllm_args([item]) == expected


def test_dashes_in_keys_become_underscores_and_later_items_win() -> None:
    parsed = parse_vllm_args(["enforce-eager=true", "max-num-batched-tokens=64", " block_size =32", "max_num_seqs=2"])
    assert parsed == {"enforce_eager": True, "max_num_batched_tokens": 64, "block_size": 32, "max_num_seqs": 2}
    assert parse_vllm_args(["max-num-seqs=1", "max_num_seqs=3"]) == {"max_num_seqs": 3}
    assert parse_vllm_args([]) == {}


@pytest.mark.parametrize("item", ["enforce_eager", "=true", "  =1", ""])
def test_items_without_a_key_and_equals_sign_are_errors(item: str) -> None:
    with pytest.raises(ValueError, match="KEY=VALUE") as error:
        parse_vllm_args(["max_num_seqs=1", item])
    assert repr(item) in str(error.value)


def test_engine_kwargs_pass_only_the_fields_that_are_set() -> None:
    assert VllmEngineConfig(model_dir="/m").engine_kwargs() == {
        "model": "/m",
        "dtype": "auto",
        "enable_prefix_caching": True,
    }


def test_engine_kwargs_map_every_tandem_field() -> None:
    config = VllmEngineConfig(
        model_dir="/models/smol",
        dtype="float32",
        block_size=32,
        max_model_len=512,
        enable_prefix_caching=False,
        kv_cache_gib=0.5,
        num_kv_blocks=100,
        max_num_batched_tokens=256,
        max_num_seqs=8,
    )
    assert config.engine_kwargs() == {
        "model": "/models/smol",
        "dtype": "float32",
        "enable_prefix_caching": False,
        "block_size": 32,
        "max_model_len": 512,
        "kv_cache_memory_bytes": GIB // 2,
        "num_gpu_blocks_override": 100,
        "max_num_batched_tokens": 256,
        "max_num_seqs": 8,
    }
    kwargs = VllmEngineConfig(model_dir="/m", kv_cache_gib=1.5).engine_kwargs()
    assert kwargs["kv_cache_memory_bytes"] == 3 * (1 << 29) and isinstance(kwargs["kv_cache_memory_bytes"], int)
    assert "kv_cache_gib" not in kwargs and "num_kv_blocks" not in kwargs


def test_zero_values_are_set_not_dropped() -> None:
    kwargs = VllmEngineConfig(model_dir="/m", kv_cache_gib=0.0, max_num_seqs=0).engine_kwargs()
    assert kwargs["kv_cache_memory_bytes"] == 0 and kwargs["max_num_seqs"] == 0


def test_extra_wins_over_the_mapped_fields() -> None:
    config = VllmEngineConfig(
        model_dir="/m",
        dtype="float32",
        block_size=16,
        extra={"dtype": "bfloat16", "block_size": 64, "enforce_eager": True, "model": "/other"},
    )
    kwargs = config.engine_kwargs()
    assert kwargs["dtype"] == "bfloat16" and kwargs["block_size"] == 64 and kwargs["model"] == "/other"
    assert kwargs["enforce_eager"] is True


def test_engine_kwargs_do_not_share_state_with_the_config() -> None:
    config = VllmEngineConfig(model_dir="/m", extra={"enforce_eager": True})
    config.engine_kwargs()["enforce_eager"] = False
    assert config.engine_kwargs()["enforce_eager"] is True


def test_known_engine_arg_names_pass() -> None:
    pytest.importorskip("vllm")
    check_engine_arg_names({})
    check_engine_arg_names(parse_vllm_args(["enforce-eager=true", "gpu_memory_utilization=0.8"]))
    # Every name Tandem's own flags map onto is a real AsyncEngineArgs field.
    full = VllmEngineConfig(
        model_dir="/m",
        block_size=32,
        max_model_len=64,
        kv_cache_gib=1,
        num_kv_blocks=8,
        max_num_batched_tokens=64,
        max_num_seqs=2,
    )
    check_engine_arg_names(full.engine_kwargs())


def test_unknown_engine_arg_names_raise_naming_them() -> None:
    pytest.importorskip("vllm")
    with pytest.raises(ValueError, match="enforce_eagre") as error:
        check_engine_arg_names({"enforce_eager": True, "enforce_eagre": True, "zz_not_an_arg": 1})
    message = str(error.value)
    assert "zz_not_an_arg" in message and "'enforce_eager'" not in message
