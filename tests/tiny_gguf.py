"""Write small random-weight GGUF files laid out the way llama.cpp's converter writes them.

For tests and examples: a few layers, a byte-level BPE vocabulary of a few hundred tokens and a
ChatML template, in F32, F16 or Q8_0. ``write_tiny_gguf`` returns the HF-layout weights it wrote,
so a loader can be checked against them (llama q/k are stored permuted, as llama.cpp does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# A few merges so that common words become single tokens ("Ġ" is the byte-level space).
MERGES = ("H e", "l l", "He ll", "Hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld")


@dataclass
class TinyModelSpec:
    """Shape of a tiny model. Dimensions that get quantized must be multiples of 32 (Q8_0 blocks)."""

    arch: str = "llama"
    """GGUF architecture: llama, qwen2 (q/k/v bias) or qwen3 (q/k norms)."""
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    """None: hidden_size // num_heads (qwen3 often differs)."""
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    context_length: int = 256
    qtype: str = "F32"
    """F32, F16 or Q8_0 for the 2-D weights; norms and biases stay F32 as in llama.cpp."""
    chat_template: str | None = CHATML_TEMPLATE
    llama3_rope_factor: float | None = None
    """Write a ``rope_freqs`` tensor as llama.cpp does for Llama 3.x rope scaling (low 1, high 4, 8192)."""
    yarn_factor: float | None = None
    """Write ``rope.scaling.type=yarn`` metadata with this factor (original context: context_length)."""

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a byte-level BPE vocabulary: specials, 256 bytes, merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(SPECIAL_TOKENS) + sorted(bytes_to_unicode().values())
    tokens += [m.replace(" ", "") for m in MERGES]
    types = [3] * len(SPECIAL_TOKENS) + [1] * (len(tokens) - len(SPECIAL_TOKENS))  # 3 = CONTROL
    return tokens, types, list(MERGES)


def random_hf_weights(spec: TinyModelSpec, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under HF names, in HF layout."""
    rng = np.random.default_rng(seed)
    h, i, d = spec.hidden_size, spec.intermediate_size, spec.resolved_head_dim
    q, kv = spec.num_heads * d, spec.num_kv_heads * d

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    weights = {"model.embed_tokens.weight": rand(vocab_size, h), "model.norm.weight": 1 + rand(h)}
    if not spec.tie_word_embeddings:
        weights["lm_head.weight"] = rand(vocab_size, h)
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}."
        weights |= {
            p + "input_layernorm.weight": 1 + rand(h),
            p + "post_attention_layernorm.weight": 1 + rand(h),
            p + "self_attn.q_proj.weight": rand(q, h),
            p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h),
            p + "self_attn.o_proj.weight": rand(h, q),
            p + "mlp.gate_proj.weight": rand(i, h),
            p + "mlp.up_proj.weight": rand(i, h),
            p + "mlp.down_proj.weight": rand(h, i),
        }
        if spec.arch == "qwen2":
            for name, rows in (("q", q), ("k", kv), ("v", kv)):
                weights[p + f"self_attn.{name}_proj.bias"] = rand(rows)
        if spec.arch == "qwen3":
            weights[p + "self_attn.q_norm.weight"] = 1 + rand(d)
            weights[p + "self_attn.k_norm.weight"] = 1 + rand(d)
    return weights


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """The q/k row permutation llama.cpp's converter applies: per head, [2, d/2] halves -> [d/2, 2]."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama3_rope_freqs(spec: TinyModelSpec) -> np.ndarray:
    """Per-frequency divisors llama.cpp stores for Llama 3 rope scaling (low 1, high 4, original 8192)."""
    factor, low, high, original = spec.llama3_rope_factor or 1.0, 1.0, 4.0, 8192
    dim = spec.resolved_head_dim
    divisors = []
    for freq in 1.0 / spec.rope_theta ** (np.arange(0, dim, 2) / dim):
        wavelen = 2 * np.pi / freq
        if wavelen < original / high:
            divisors.append(1.0)
        elif wavelen > original / low:
            divisors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, dtype=np.float32)


_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_tensor_name(hf_name: str) -> str:
    """llama.cpp's name for an HF parameter name."""
    if hf_name in _GGUF_NAMES:
        return _GGUF_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_NAMES[module]}.{kind}"


def write_tiny_gguf(path: str | Path, spec: TinyModelSpec | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a tiny GGUF to ``path``; return the HF-layout float32 weights it encodes (pre-quantization)."""
    import gguf

    spec = spec or TinyModelSpec()
    tokens, types, merges = tiny_vocab()
    weights = random_hf_weights(spec, len(tokens), seed)
    writer = gguf.GGUFWriter(str(path), spec.arch)
    writer.add_name(f"tiny-{spec.arch}")
    writer.add_block_count(spec.num_layers)
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    if spec.head_dim is not None:
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
    writer.add_rope_dimension_count(spec.resolved_head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    if spec.chat_template is not None:
        writer.add_chat_template(spec.chat_template)
    if spec.yarn_factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(spec.yarn_factor)
        writer.add_rope_scaling_orig_ctx_len(spec.context_length)
    if spec.llama3_rope_factor is not None:
        writer.add_tensor("rope_freqs.weight", llama3_rope_freqs(spec))
    for name, value in weights.items():
        _add_tensor(writer, spec, name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def _add_tensor(writer: object, spec: TinyModelSpec, name: str, value: np.ndarray) -> None:
    import gguf

    if spec.arch == "llama" and ".self_attn.q_proj." in name:
        value = llama_cpp_permute(value, spec.num_heads)
    elif spec.arch == "llama" and ".self_attn.k_proj." in name:
        value = llama_cpp_permute(value, spec.num_kv_heads)
    if value.ndim == 1 or spec.qtype == "F32":
        writer.add_tensor(gguf_tensor_name(name), value)  # type: ignore[attr-defined]
    elif spec.qtype == "F16":
        writer.add_tensor(gguf_tensor_name(name), value.astype(np.float16))  # type: ignore[attr-defined]
    else:
        qtype = gguf.GGMLQuantizationType[spec.qtype]
        packed = gguf.quants.quantize(value, qtype)
        writer.add_tensor(gguf_tensor_name(name), packed, raw_dtype=qtype)  # type: ignore[attr-defined]
