"""What a backbone adapter is: the wiring of one HF family, holding no weights.

A backbone layer is read as a list of pre-norm residual *sub-layers*
``h = h + mixer(norm(h))`` of three kinds:

* ``attention`` -- Q/K/V come from the family's own projections (``qkv``), the
  score/softmax part is ours (``attention.attend``) so the masks can differ per tower;
* ``mamba``     -- an HF Mamba-2 mixer, run by ``mamba.py`` from explicit states;
* ``ffn``       -- anything position-wise (MLP, MoE): the HF module is called as is.

The towers (``towers.py``) only talk to this interface, so a new family is one small file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..attention import apply_rope

ATTENTION = "attention"
MAMBA = "mamba"
FFN = "ffn"


@dataclass(frozen=True)
class SubLayer:
    kind: str  # ATTENTION | MAMBA | FFN
    norm: nn.Module
    mixer: nn.Module


@dataclass
class BackboneParts:
    """The HF submodules a tower is made of (references, not copies)."""

    embed: nn.Embedding
    layers: nn.ModuleList
    norm: nn.Module
    head: nn.Linear
    rotary: nn.Module | None  # None: no positional encoding in attention (Nemotron-H)


class BackboneAdapter:
    """Base wiring shared by the decoder-only families; subclasses override what differs."""

    model_types: ClassVar[tuple[str, ...]] = ()

    def validate(self, config) -> None:
        """Refuse configurations whose wiring this adapter does not reproduce."""

    def parts(self, backbone: nn.Module) -> BackboneParts:
        raise NotImplementedError

    def sublayers(self, layer: nn.Module) -> list[SubLayer]:
        raise NotImplementedError

    def num_sublayers(self, layer: nn.Module) -> int:
        return len(self.sublayers(layer))

    # -- pieces of a sub-layer -------------------------------------------------------------
    def normalize(self, norm: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return norm(h)

    def rope(self, rotary: nn.Module | None, h: torch.Tensor, positions: torch.Tensor):
        """``positions [1|B, T]`` -> ``(cos, sin)`` in ``h``'s dtype, or None without RoPE."""
        if rotary is None:
            return None
        return rotary(h, positions)

    def qkv(self, attn: nn.Module, x: torch.Tensor, rope):
        """``x [B, T, D]`` -> ``q [B, H, T, d]``, ``k/v [B, Hkv, T, d]`` (after RoPE)."""
        shape = (*x.shape[:-1], -1, attn.head_dim)
        q = attn.q_proj(x).view(shape)
        k = attn.k_proj(x).view(shape)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = self.qk_norm(attn, q, k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def qk_norm(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor):
        """Per-head norm of ``q/k [B, T, H, d]`` before RoPE (Qwen3); identity by default."""
        return q, k

    def attention_scale(self, attn: nn.Module) -> float:
        return attn.scaling

    def attention_out(self, attn: nn.Module, out: torch.Tensor) -> torch.Tensor:
        return attn.o_proj(out)

    def logits(self, head: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return head(h).float()
