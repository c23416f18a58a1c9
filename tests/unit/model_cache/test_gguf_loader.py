"""GGUF loading: names, shapes, config, values, llama q/k un-permutation, errors, tokenizer."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tests.tiny_gguf import CHATML_TEMPLATE, TinyModelSpec, llama_cpp_permute, write_tiny_gguf

from tandem.model_cache.errors import ModelLoadError
from tandem.model_cache.gguf_loader import load_gguf, load_gguf_tokenizer, read_gguf_config, unpermute_llama_qk
from tandem.model_cache.gguf_names import expected_shapes

LLAMA = TinyModelSpec(arch="llama", num_heads=4, num_kv_heads=2)
QWEN3 = TinyModelSpec(arch="qwen3", head_dim=32, tie_word_embeddings=False)  # head_dim != hidden/heads
QWEN2 = TinyModelSpec(arch="qwen2")


def _write(tmp_path: Path, spec: TinyModelSpec, name: str = "tiny.gguf") -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path / name
    return path, write_tiny_gguf(path, spec, seed=1)


def _q8_roundtrip(value: np.ndarray) -> np.ndarray:
    """What Q8_0 storage turns ``value`` into (rows quantize independently, so permutation commutes)."""
    q8 = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.dequantize(gguf.quants.quantize(value, q8), q8).reshape(value.shape)


def test_llama_f32_names_shapes_config_and_exact_values(tmp_path: Path) -> None:
    path, weights = _write(tmp_path, LLAMA)
    model = load_gguf(path)
    cfg = model.config
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (64, 128, 2)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert cfg["vocab_size"] == weights["model.embed_tokens.weight"].shape[0]
    assert cfg["tie_word_embeddings"] is True and cfg["torch_dtype"] == "float32"
    assert cfg["rope_theta"] == 10000.0 and cfg["rms_norm_eps"] == pytest.approx(1e-5)
    assert cfg["max_position_embeddings"] == 256 and "rope_scaling" not in cfg
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert model.chat_template == CHATML_TEMPLATE

    assert set(model.state_dict) == set(weights) == set(expected_shapes(cfg))
    assert "lm_head.weight" not in model.state_dict
    for name, value in weights.items():
        tensor = model.state_dict[name]
        assert tensor.dtype == torch.float32 and tuple(tensor.shape) == value.shape, name
        assert torch.equal(tensor, torch.from_numpy(value)), name  # q/k un-permuted exactly


def test_llama_q8_0_within_quantization_tolerance(tmp_path: Path) -> None:
    path, weights = _write(tmp_path, TinyModelSpec(arch="llama", qtype="Q8_0"))
    state = load_gguf(path).state_dict
    for name, value in weights.items():
        got = state[name].numpy()
        if value.ndim == 1:  # norms stay F32
            np.testing.assert_array_equal(got, value)
            continue
        # Exactly what Q8_0 stores, and close to the original: half a step per 32-block, plus the
        # rounding of the block scale to fp16 (at most 127 * 2**-11 of a step).
        np.testing.assert_array_equal(got, _q8_roundtrip(value), err_msg=name)
        step = np.abs(value.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
        assert np.all(np.abs(got - value).reshape(-1, 32) <= step * 0.57), name


def test_llama_permutation_round_trips_and_matches_the_stored_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for heads, head_dim, cols in ((4, 16, 8), (3, 64, 5), (1, 2, 1)):
        w = rng.standard_normal((heads * head_dim, cols)).astype(np.float32)
        permuted = llama_cpp_permute(w, heads)
        assert not np.array_equal(permuted, w) or head_dim == 2
        assert torch.equal(unpermute_llama_qk(torch.from_numpy(permuted), heads), torch.from_numpy(w))
        bias = w[:, 0].copy()  # 1-D (bias) rows permute the same way
        assert torch.equal(
            unpermute_llama_qk(torch.from_numpy(llama_cpp_permute(bias, heads)), heads), torch.from_numpy(bias)
        )

    # The file really holds the permuted rows; the loader hands back the HF layout.
    path, weights = _write(tmp_path, LLAMA)
    stored = {
        t.name: np.array(t.data).reshape(tuple(reversed(t.shape.tolist()))) for t in gguf.GGUFReader(path).tensors
    }
    q_hf = weights["model.layers.0.self_attn.q_proj.weight"]
    k_hf = weights["model.layers.0.self_attn.k_proj.weight"]
    np.testing.assert_array_equal(stored["blk.0.attn_q.weight"], llama_cpp_permute(q_hf, LLAMA.num_heads))
    np.testing.assert_array_equal(stored["blk.0.attn_k.weight"], llama_cpp_permute(k_hf, LLAMA.num_kv_heads))
    assert not np.array_equal(stored["blk.0.attn_q.weight"], q_hf)


def test_qwen3_q8_0_head_dim_qk_norms_and_untied_head(tmp_path: Path) -> None:
    path, weights = _write(tmp_path, TinyModelSpec(**{**QWEN3.__dict__, "qtype": "Q8_0"}))
    model = load_gguf(path)
    cfg = model.config
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["model_type"] == "qwen3"
    assert cfg["head_dim"] == 32 and cfg["tie_word_embeddings"] is False and cfg["attention_bias"] is False
    assert set(model.state_dict) == set(weights) == set(expected_shapes(cfg))
    assert model.state_dict["model.layers.1.self_attn.q_norm.weight"].shape == (32,)
    assert model.state_dict["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 64)
    assert model.state_dict["lm_head.weight"].shape == (cfg["vocab_size"], 64)
    for name, value in weights.items():  # qwen3 is stored without the llama permutation
        expected = value if value.ndim == 1 else _q8_roundtrip(value)
        np.testing.assert_array_equal(model.state_dict[name].numpy(), expected, err_msg=name)


def test_qwen2_has_qkv_bias(tmp_path: Path) -> None:
    path, weights = _write(tmp_path, QWEN2)
    model = load_gguf(path)
    assert model.config["model_type"] == "qwen2" and model.config["attention_bias"] is True
    bias = model.state_dict["model.layers.1.self_attn.k_proj.bias"]
    assert torch.equal(bias, torch.from_numpy(weights["model.layers.1.self_attn.k_proj.bias"]))
    assert set(model.state_dict) == set(weights)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path: Path) -> None:
    spec = TinyModelSpec(arch="llama", rope_theta=500000.0, llama3_rope_factor=8.0)
    path, weights = _write(tmp_path, spec)
    model = load_gguf(path)
    assert model.config["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert set(model.state_dict) == set(weights)  # rope_freqs is no parameter

    # rope_freqs that no Llama 3 setting explains are refused rather than silently ignored.
    bad = tmp_path / "bad.gguf"
    writer = gguf.GGUFWriter(str(bad), "llama")
    reader = gguf.GGUFReader(path)
    for field in reader.fields.values():
        if not field.name.startswith("GGUF.") and field.name != "general.architecture":
            value = field.contents()
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        data = np.array(tensor.data)
        if tensor.name == "rope_freqs.weight":
            data = np.full_like(data, 3.0)
        writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="rope_freqs"):
        load_gguf(bad)


def test_yarn_metadata_becomes_rope_scaling(tmp_path: Path) -> None:
    path, _ = _write(tmp_path, TinyModelSpec(arch="qwen2", yarn_factor=4.0))
    assert read_gguf_config(path)["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 256,
    }


def test_read_gguf_config_matches_load_gguf(tmp_path: Path) -> None:
    path, _ = _write(tmp_path, QWEN3)
    assert read_gguf_config(path) == load_gguf(path).config


@pytest.mark.parametrize(
    "spec",
    [
        TinyModelSpec(arch="llama", qtype="Q8_0"),
        TinyModelSpec(arch="qwen2"),
        TinyModelSpec(arch="qwen3", head_dim=128, qtype="Q8_0", tie_word_embeddings=False),
    ],
)
def test_same_weights_as_transformers_gguf_loader(tmp_path: Path, spec: TinyModelSpec) -> None:
    """An independent check of names and the q/k un-permutation against transformers' own GGUF path."""
    import accelerate  # noqa: F401  (transformers needs it to load GGUF files; a test dependency)
    from transformers import AutoModelForCausalLM

    path, _ = _write(tmp_path, spec)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).state_dict()
    ours = load_gguf(path).state_dict
    for name, tensor in ours.items():
        assert torch.equal(tensor, reference[name]), name


def test_tokenizer_from_gguf_has_chat_template_and_round_trips(tmp_path: Path) -> None:
    path, _ = _write(tmp_path, LLAMA)
    tokenizer = load_gguf_tokenizer(path)
    assert tokenizer.chat_template == CHATML_TEMPLATE
    ids = tokenizer("Hello world")["input_ids"]
    assert len(ids) == 2 and tokenizer.decode(ids) == "Hello world"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"


# ---- errors ---------------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found.*nope.gguf"):
        load_gguf(tmp_path / "nope.gguf")


def test_directory_is_not_a_gguf(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="directory"):
        load_gguf(tmp_path)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_text('{"not": "gguf"}')
    with pytest.raises(ModelLoadError, match=r"not a GGUF file \(bad magic.*model.gguf"):
        load_gguf(path)
    assert issubclass(ModelLoadError, ValueError)


def test_truncated_gguf(tmp_path: Path) -> None:
    path, _ = _write(tmp_path, LLAMA)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ModelLoadError, match="cannot read GGUF file .*cut.gguf"):
        load_gguf(cut)


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"unsupported GGUF architecture 'gpt2'.*supported: llama, qwen2, qwen3"):
        load_gguf(path)
    with pytest.raises(ModelLoadError, match="unsupported GGUF architecture"):
        load_gguf_tokenizer(path)
