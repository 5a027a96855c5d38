"""Optional adaLN-single time conditioning for the denoiser (PixArt-alpha style).

``t`` -> sinusoidal embedding -> ONE shared MLP -> ``[..., 2 * D]`` (shift, scale), plus a
learned per-sub-layer table ``[n_sublayers, 2, D]``. Every normed hidden state of the
denoiser becomes ``norm(h) * (1 + scale_j) + shift_j`` for its sub-layer ``j``.
The MLP's last layer and the table start at zero, so a fresh model equals the one without
time conditioning; both still receive gradients from the first step.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of ``t`` in [0, 1] (scaled by 1000): ``[...]`` -> ``[..., dim]``."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = (t.float() * 1000.0)[..., None] * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class AdaLNSingle(nn.Module):
    """Shared timestep MLP + per-sub-layer (shift, scale) table."""

    def __init__(self, hidden_size: int, num_sublayers: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, 2 * hidden_size),
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.table = nn.Parameter(torch.zeros(num_sublayers, 2, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """``t [B, T]`` per token -> shared modulation ``[B, T, 2, D]`` (add ``table[j]``)."""
        emb = timestep_embedding(t, self.frequency_dim).to(self.mlp[0].weight.dtype)
        out = self.mlp(emb)
        return out.unflatten(-1, (2, -1))

    def modulate(self, x: torch.Tensor, shared: torch.Tensor, sublayer: int) -> torch.Tensor:
        """``x [B, T, D]`` normed hidden states, ``shared [B, T, 2, D]`` -> modulated ``x``."""
        mod = shared + self.table[sublayer]
        shift, scale = mod.unbind(dim=-2)
        return x * (1 + scale.to(x.dtype)) + shift.to(x.dtype)


def expand_timesteps(t: torch.Tensor, batch: int, length: int, block_size: int) -> torch.Tensor:
    """Per-token timesteps ``[B, L]`` from ``t`` of shape ``[]``, ``[B]``, ``[B, L / bs]``
    (one per block) or ``[B, L]``."""
    if t.dim() == 0:
        return t.expand(batch, length)
    if t.dim() == 1:
        return t[:, None].expand(batch, length)
    if t.shape[1] == length:
        return t
    if t.shape[1] * block_size == length:
        return t.repeat_interleave(block_size, dim=1)
    if t.shape[1] == 1:
        return t.expand(batch, length)
    raise ValueError(
        f"t has shape {tuple(t.shape)}; expected [B], [B, {length // block_size}] or [B, {length}]"
    )
