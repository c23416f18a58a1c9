"""Rotary position embeddings and the scaling variants Llama-family checkpoints use.

``rope_inv_freq`` returns the per-pair inverse frequencies and a factor that scales cos/sin
(YaRN's attention factor; 1 elsewhere). ``RotaryEmbedding`` precomputes cos/sin for every
position up to ``max_positions`` and rotates q/k in the "rotate half" (GPT-NeoX) layout HF uses.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    factor, old_ctx = s["factor"], s["original_max_position_embeddings"]
    low_wavelen = old_ctx / s["low_freq_factor"]
    high_wavelen = old_ctx / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(theta: float, dim: int, s: dict[str, Any], max_pos: int) -> tuple[torch.Tensor, float]:
    # Blend interpolated (÷factor) and extrapolated frequencies with a linear ramp over the
    # dimensions between the beta_fast and beta_slow correction bounds.
    factor = s["factor"]
    orig = s.get("original_max_position_embeddings") or max_pos
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, float(attention_factor)


def rope_inv_freq(
    theta: float, dim: int, scaling: dict[str, Any] | None, max_position_embeddings: int, max_len: int
) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim/2], cos/sin scale) for a rope_type of default, linear, dynamic, llama3 or yarn.

    Dynamic NTK is evaluated once at ``max_len`` (the longest sequence the engine will run), so
    every position shares one table; this matches HF for sequences at that length.
    """
    s = scaling or {}
    rope_type = s.get("rope_type", "default")
    if rope_type == "default":
        return _default_inv_freq(theta, dim), 1.0
    if rope_type == "linear":
        return _default_inv_freq(theta, dim) / s["factor"], 1.0
    if rope_type == "dynamic":
        factor = s["factor"]
        if max_len > max_position_embeddings:
            theta = theta * ((factor * max_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return _default_inv_freq(theta, dim), 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(_default_inv_freq(theta, dim), s), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(theta, dim, s, max_position_embeddings)
    raise ValueError(f"unsupported rope_type {rope_type!r} (supported: default, linear, dynamic, llama3, yarn)")


class RotaryEmbedding(torch.nn.Module):
    """Applies RoPE to flattened q/k of shape [tokens, heads, head_dim] at given positions."""

    cos: torch.Tensor
    """float32 [max_positions, head_dim] (a non-persistent buffer)."""
    sin: torch.Tensor

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict[str, Any] | None,
        max_position_embeddings: int,
    ) -> None:
        super().__init__()
        self._args = (head_dim, max_positions, theta, scaling, max_position_embeddings)
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        if self.cos.device.type != "meta":  # built on meta: the loader calls reset_buffers later
            self.reset_buffers()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the float32 cos/sin tables, e.g. after the module was built on the meta device."""
        head_dim, max_positions, theta, scaling, max_position_embeddings = self._args
        inv_freq, scale = rope_inv_freq(theta, head_dim, scaling, max_position_embeddings, max_positions)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        device = device if device is not None else self.cos.device
        self.cos = (emb.cos() * scale).to(device)
        self.sin = (emb.sin() * scale).to(device)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, D] of the given positions, once per forward pass for all layers."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] by the looked-up cos/sin."""
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
