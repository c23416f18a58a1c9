"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, SmolLM) over the paged KV cache.

Tokens of all requests in a step are flattened into one ``[num_tokens, hidden]`` batch, so
every linear layer is a single matmul per step. q/k/v and gate/up projections are fused at load
time (fewer, larger matmuls); attention is delegated to ``tandem.models.layers.attention``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast, overload

import torch
import torch.nn.functional as F
from torch import nn

from tandem.kernels import decode_forward, elementwise
from tandem.models.config import ModelConfig
from tandem.models.layers.attention import AttentionMetadata, paged_attention
from tandem.models.layers.linear import Linear
from tandem.models.layers.rope import RotaryEmbedding, apply_rotary

FUSED_DECODE_MAX_ROWS = 4
"""Decode steps of up to this many rows (and no prefill) run the fused C decoder on CPU
(``TANDEM_DISABLE_FUSED_DECODE=1`` turns it off); larger batches use oneDNN GEMMs per op.
``python benchmarks/cpu_kernel_choices.py`` (SmolLM2-135M bf16, 2 cores, context ~260): fused 13.9 /
17.6 / 21.8 ms per step at 1 / 2 / 4 rows against 20.3 / 24.9 / 23.3 ms per op; per op ahead from 6."""
FUSED_DECODE_AMX_MAX_ROWS = 256
"""With bfloat16 weights on a CPU with AMX, decode steps of up to this many rows run the fused C
decoder, its linear layers as AMX tile multiplies at every row count (faster than the GEMVs from 1
row on: docs/benchmarks.md)."""


@dataclass
class RopeTables:
    """RoPE cos/sin of the step's positions, looked up once per forward for every layer: in the
    model dtype ``[T, 1, D]`` for the PyTorch ops, or float32 ``[T, D]`` where the attention layers
    are fused (the C RoPE + KV store; every layer is, or none)."""

    cos: torch.Tensor
    sin: torch.Tensor


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fused = False
        """Use the fused C kernel (kernels/elementwise) for 2-D inputs; set by prepare_for_inference on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.dim() == 2:
            return elementwise.rmsnorm(x, self.weight, self.eps)
        # Same numerics as HF: normalise in float32, scale in the model dtype.
        if x.dtype == torch.float32:
            return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    if TYPE_CHECKING:
        __call__ = forward


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = self.head_dim**-0.5
        self.fused = False
        """RoPE and the KV store in one C pass (kernels/elementwise); CPU, no q/k norm."""

    def forward(
        self, rope: RopeTables, x: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        if self.fused:
            qkv = self.qkv_proj(x)
            elementwise.rope_store(
                qkv,
                rope.cos,
                rope.sin,
                meta.slot_mapping,
                kv_cache[0],
                kv_cache[1],
                self.num_heads,
                self.num_kv_heads,
                self.head_dim,
            )
            q, k, v = (
                t.view(num_tokens, -1, self.head_dim)
                for t in qkv.split_with_sizes([self.q_size, self.kv_size, self.kv_size], dim=-1)
            )
            out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, kv_stored=True)
            return self.o_proj(out.view(num_tokens, self.q_size))
        # split_with_sizes: the op Tensor.split calls for a list of sizes (typed, where split is not)
        q, k, v = self.qkv_proj(x).split_with_sizes([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:  # both or neither (cfg.qk_norm)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, k, rope.cos, rope.sin)
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(out.view(num_tokens, self.q_size))

    if TYPE_CHECKING:
        __call__ = forward


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.fused = False
        """SiLU-and-multiply in one C pass (kernels/elementwise); CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.down_proj(elementwise.silu_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [T, 2I]: gate | up, as split(I) would
        return self.down_proj(F.silu(gate) * up)

    if TYPE_CHECKING:
        __call__ = forward


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, rope: RopeTables, x: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
    ) -> torch.Tensor:
        x = x + self.self_attn(rope, self.input_layernorm(x), kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))

    if TYPE_CHECKING:
        __call__ = forward


if TYPE_CHECKING:

    class DecoderLayers(nn.ModuleList):
        """What mypy knows of ``LlamaForCausalLM.layers``: an nn.ModuleList (not generic in torch)
        holding only DecoderLayer."""

        def __iter__(self) -> Iterator[DecoderLayer]: ...

        @overload
        def __getitem__(self, idx: slice) -> nn.ModuleList: ...

        @overload
        def __getitem__(self, idx: int) -> DecoderLayer: ...

        def __getitem__(self, idx: int | slice) -> DecoderLayer | nn.ModuleList: ...


class LlamaForCausalLM(nn.Module):
    """Decoder stack plus LM head; ``forward`` returns hidden states, ``compute_logits`` the logits."""

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self.rotary = RotaryEmbedding(
            cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings
        )
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = cast("DecoderLayers", nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._fused: decode_forward.FusedDecoder | None = None
        self._fused_off = os.environ.get("TANDEM_DISABLE_FUSED_DECODE") == "1"

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        fused = self._fused_decoder(kv_caches, meta)
        if fused is not None:
            assert meta.decode_ctx_lens is not None  # _fused_decoder returns a decoder only then
            hidden = fused(
                x.float(),
                self.rotary.cos[positions],
                self.rotary.sin[positions],
                meta.slot_mapping,
                meta.decode_block_table,
                meta.decode_ctx_lens,
            )
            return self.norm(hidden.to(x.dtype))
        if self.layers[0].self_attn.fused:  # the C RoPE + KV store takes float32 tables
            rope = RopeTables(self.rotary.cos[positions], self.rotary.sin[positions])
        else:
            rope = RopeTables(*self.rotary.lookup(positions, x.dtype))
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(rope, x, kv_cache, meta)
        return self.norm(x)

    def _fused_decoder(
        self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata
    ) -> decode_forward.FusedDecoder | None:
        """The fused C decode path (tandem.kernels.decode_forward) when this step can take it: only
        decode rows, at most FUSED_DECODE_MAX_ROWS of them (FUSED_DECODE_AMX_MAX_ROWS with AMX), on
        the C attention kernel's metadata."""
        if meta.prefills or meta.decode_ctx_lens is None or self._fused_off:
            return None
        if self._fused is None or self._fused.kv_caches is not kv_caches:
            self._fused = None
            if not decode_forward.supported(self, kv_caches, meta.block_size):
                self._fused_off = True
                return None
            self._fused = decode_forward.FusedDecoder(
                self, kv_caches, meta.block_size, FUSED_DECODE_MAX_ROWS, FUSED_DECODE_AMX_MAX_ROWS
            )
        return self._fused if meta.num_decode_tokens <= self._fused.max_rows else None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def decode_weight_bytes(self) -> int:
        """Weight bytes one decode step reads: every linear layer (the LM head included) and norm.

        The embedding table is not counted: a step looks up one row of it per token.
        """
        total = 0
        for module in self.modules():
            if isinstance(module, Linear):
                total += module.weight_bytes
                if module.bias is not None:
                    total += module.bias.numel() * module.bias.element_size()
            elif isinstance(module, RMSNorm):
                total += module.weight.numel() * module.weight.element_size()
        return total

    def resident_weight_bytes(self) -> int:
        """Bytes of every weight copy kept in memory (on CPU: plain and oneDNN-packed)."""
        plain = sum(p.numel() * p.element_size() for p in self.parameters())
        packed = sum(m.weight_bytes for m in self.modules() if isinstance(m, Linear) and m.packed_weight is not None)
        return plain + packed

    def prepare_for_inference(self) -> None:
        """After loading, on CPU: give every linear layer its fast paths (see models/linear.py).

        A tied LM head gets its own packed copy; the embedding keeps the plain table for lookups.
        """
        if self.norm.weight.device.type != "cpu":
            return
        for module in self.modules():
            if isinstance(module, Linear):
                module.prepare_for_cpu()
        cfg = self.config
        if elementwise.supports(self.norm.weight) and cfg.hidden_size <= elementwise.MAX_NORM_DIM:
            for module in self.modules():
                if isinstance(module, RMSNorm | MLP):
                    module.fused = True
                elif isinstance(module, Attention):
                    module.fused = not cfg.qk_norm

    def load_hf_state_dict(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named (name, tensor) pairs, fusing q/k/v and gate/up; raises on missing or unexpected names."""
        own = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            target, shard = _hf_to_fused_name(name, self.config)
            if target is None:
                continue  # rotary caches and the like
            if target not in own:
                raise KeyError(f"unexpected weight {name!r}")
            param = own[target]
            with torch.no_grad():
                if shard is None:
                    param.copy_(tensor)
                else:
                    start, size = shard
                    param.narrow(0, start, size).copy_(tensor)
            loaded.add(f"{target}:{shard}")
        expected = _expected_loads(self.config)
        missing = expected - loaded
        if missing:
            raise KeyError(f"checkpoint lacks weights: {sorted(missing)[:5]}...")


_MODEL_PREFIX = "model."


def _qkv_shard(proj: str, cfg: ModelConfig) -> tuple[int, int]:
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[proj]


def _hf_to_fused_name(name: str, cfg: ModelConfig) -> tuple[str | None, tuple[int, int] | None]:
    """Map an HF parameter name to (our parameter name, row slice) — the slice for fused weights."""
    if "rotary_emb" in name:
        return None, None
    if name == "lm_head.weight":
        return (None, None) if cfg.tie_word_embeddings else ("lm_head.weight", None)
    if name.startswith(_MODEL_PREFIX):
        name = name[len(_MODEL_PREFIX) :]
    for proj in ("q", "k", "v"):
        key = f".self_attn.{proj}_proj."
        if key in name:
            return name.replace(key, ".self_attn.qkv_proj."), _qkv_shard(proj, cfg)
    if ".mlp.gate_proj." in name:
        return name.replace(".mlp.gate_proj.", ".mlp.gate_up_proj."), (0, cfg.intermediate_size)
    if ".mlp.up_proj." in name:
        return name.replace(".mlp.up_proj.", ".mlp.gate_up_proj."), (cfg.intermediate_size, cfg.intermediate_size)
    return name, None


def _expected_loads(cfg: ModelConfig) -> set[str]:
    names = ["embed_tokens.weight:None", "norm.weight:None"]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight:None")
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}"
        names += [
            f"{p}.input_layernorm.weight:None",
            f"{p}.post_attention_layernorm.weight:None",
            f"{p}.self_attn.o_proj.weight:None",
            f"{p}.mlp.down_proj.weight:None",
            f"{p}.mlp.gate_up_proj.weight:{(0, cfg.intermediate_size)}",
            f"{p}.mlp.gate_up_proj.weight:{(cfg.intermediate_size, cfg.intermediate_size)}",
        ]
        for proj in ("q", "k", "v"):
            names.append(f"{p}.self_attn.qkv_proj.weight:{_qkv_shard(proj, cfg)}")
            if cfg.qkv_bias:
                names.append(f"{p}.self_attn.qkv_proj.bias:{_qkv_shard(proj, cfg)}")
        if cfg.qk_norm:
            names += [f"{p}.self_attn.q_norm.weight:None", f"{p}.self_attn.k_norm.weight:None"]
    return set(names)
