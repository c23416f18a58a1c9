"""The fused decode forward (``decode_forward.c``): every decoder layer of a Llama-family model
for a batch of decode rows in one C call: AMX tile multiplies for a bfloat16 model on a CPU with
AMX (any number of rows), GEMV otherwise (a few rows).

`FusedDecoder` is built once per model and KV cache: it collects the plain weights' and the
caches' addresses per layer into the C struct; each call then passes the step's rows (float32
hidden states after the embedding, RoPE cos/sin of their positions, their KV slots, block
tables and context lengths). The math is float32; in a bfloat16 model each activation is rounded to
bfloat16 where the per-op PyTorch path produces one, so the outputs are close to, not bit-equal
with, that path (the summation order differs).
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch

from tandem.kernels import paged_attention
from tandem.kernels.native import LazyLibrary

if TYPE_CHECKING:
    from tandem.models.layers.linear import Linear
    from tandem.models.llama import LlamaForCausalLM


class _Model(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_int64)
        for name in ("num_layers", "hidden", "num_heads", "num_kv_heads", "head_dim", "intermediate", "block_size")
    ]
    _fields_ += [
        ("eps", ctypes.c_float),
        ("attn_scale", ctypes.c_float),
        ("bf16", ctypes.c_int32),
        ("qk_norm", ctypes.c_int32),
    ]
    _fields_ += [
        (name, ctypes.c_void_p)
        for name in (
            "qkv_w",
            "qkv_b",
            "o_w",
            "gate_up_w",
            "down_w",
            "input_norm",
            "post_norm",
            "q_norm",
            "k_norm",
            "k_cache",
            "v_cache",
        )
    ]


def _addresses(tensors: list[torch.Tensor | None]) -> torch.Tensor:
    return torch.tensor([t.data_ptr() if t is not None else 0 for t in tensors], dtype=torch.int64)


def _bias32(linear: Linear) -> torch.Tensor | None:
    """The float32 copy of a projection's bias that its GEMV kernel keeps (None without a bias)."""
    if linear.bias is None:
        return None
    # Only the GEMV kernel keeps that copy: a biased projection without one fails here, as before
    # (supported() does not check for it).
    assert linear.gemv is not None, "the fused decoder reads a bias from its projection's GEMV kernel"
    return linear.gemv.bias32


def supported(model: LlamaForCausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int) -> bool:
    """Whether the fused path can run this model: CPU, float32/bfloat16, every projection's plain
    weight kept, and a shape the attention kernel serves."""
    cfg = model.config
    k0 = kv_caches[0][0]
    weights_ok = all(
        linear.weight is not None
        for layer in model.layers
        for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
    )
    return (
        weights_ok
        and all(layer.self_attn.o_proj.bias is None for layer in model.layers)
        and model.norm.weight.dtype == k0.dtype
        and paged_attention.supports(k0, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, block_size)
        and _lib() is not None
    )


_lib = LazyLibrary(
    "tandem_attention",
    paged_attention.SOURCES,
    paged_attention.FLAGS,
    {
        "tandem_decode_forward": (
            [ctypes.POINTER(_Model)]
            + [ctypes.c_void_p] * 5
            + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int],
            ctypes.c_int,
        ),
        "tandem_decode_scratch_floats": ([ctypes.POINTER(_Model), ctypes.c_int64], ctypes.c_int64),
        "tandem_decode_uses_amx": ([ctypes.POINTER(_Model), ctypes.c_int64], ctypes.c_int),
    },
    paged_attention.HEADERS,
    disable_env="TANDEM_DISABLE_CPU_ATTENTION",
    fallback="no fused decoder",
)
"""The attention kernels' library (the same build), with the fused decoder's signatures."""


class FusedDecoder:
    """The decoder layers of ``model`` over ``kv_caches``, for up to ``max_rows`` decode rows:
    ``gemv_max_rows``, or ``amx_max_rows`` where the batch path multiplies on AMX tiles."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        gemv_max_rows: int,
        amx_max_rows: int = 0,
    ) -> None:
        lib = _lib()
        assert lib is not None and supported(model, kv_caches, block_size)
        cfg, layers = model.config, list(model.layers)
        self.kv_caches = kv_caches
        attn = [layer.self_attn for layer in layers]
        self._keep = {  # address tables; the tensors they point into are the model's and the cache's own
            "qkv_w": _addresses([a.qkv_proj.weight for a in attn]),
            "qkv_b": _addresses([_bias32(a.qkv_proj) for a in attn]),
            "o_w": _addresses([a.o_proj.weight for a in attn]),
            "gate_up_w": _addresses([layer.mlp.gate_up_proj.weight for layer in layers]),
            "down_w": _addresses([layer.mlp.down_proj.weight for layer in layers]),
            "input_norm": _addresses([layer.input_layernorm.weight for layer in layers]),
            "post_norm": _addresses([layer.post_attention_layernorm.weight for layer in layers]),
            "q_norm": _addresses([a.q_norm.weight if a.q_norm is not None else None for a in attn]),
            "k_norm": _addresses([a.k_norm.weight if a.k_norm is not None else None for a in attn]),
            "k_cache": _addresses([k for k, _ in kv_caches]),
            "v_cache": _addresses([v for _, v in kv_caches]),
        }
        self._struct = _Model(
            num_layers=len(layers),
            hidden=cfg.hidden_size,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            intermediate=cfg.intermediate_size,
            block_size=block_size,
            eps=cfg.rms_norm_eps,
            attn_scale=cfg.head_dim**-0.5,
            bf16=int(kv_caches[0][0].dtype == torch.bfloat16),
            qk_norm=int(cfg.qk_norm),
            **{name: table.data_ptr() for name, table in self._keep.items()},
        )
        self._ref = ctypes.byref(self._struct)
        self.uses_amx = amx_max_rows > gemv_max_rows and bool(lib.tandem_decode_uses_amx(self._ref, amx_max_rows))
        """Whether steps run on AMX tiles, so batches up to amx_max_rows can come here (else only
        gemv_max_rows rows; larger batches take the per-op path)."""
        self.max_rows = amx_max_rows if self.uses_amx else gemv_max_rows
        self._scratch = torch.empty(lib.tandem_decode_scratch_floats(self._ref, self.max_rows), dtype=torch.float32)
        self._fn = lib.tandem_decode_forward

    def __call__(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        tables: torch.Tensor,
        ctx_lens: torch.Tensor,
    ) -> torch.Tensor:
        """hidden float32 [R, hidden] (updated in place and returned); cos/sin float32 [R, head_dim];
        slots, ctx_lens int64 [R]; tables int64 [R, max_blocks]."""
        rows = hidden.shape[0]
        assert rows <= self.max_rows and hidden.dtype == torch.float32 and hidden.is_contiguous()
        status = self._fn(
            self._ref,
            hidden.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            slots.data_ptr(),
            tables.data_ptr(),
            tables.shape[1],
            ctx_lens.data_ptr(),
            rows,
            self._scratch.data_ptr(),
            torch.get_num_threads(),
        )
        if status != 0:
            raise RuntimeError(f"tandem_decode_forward failed ({status})")
        return hidden
