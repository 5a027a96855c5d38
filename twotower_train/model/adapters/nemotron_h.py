"""Nemotron-H (``NemotronHForCausalLM``): a hybrid stack of single-mixer blocks
``h = h + mixer(norm(h))`` whose mixer is Mamba-2 (``linear_attention``), attention without
positional encoding (``full_attention``), a ReLU^2 MLP (``mlp``) or a routed MoE (``moe``).
``model.embeddings``, ``model.norm_f``, ``lm_head``."""

from __future__ import annotations

import torch
from torch import nn

from .base import ATTENTION, FFN, MAMBA, BackboneAdapter, BackboneParts, SubLayer

# HF 5.x block-type names (older checkpoints' names are remapped by the config).
_KINDS = {
    "linear_attention": MAMBA,
    "mamba": MAMBA,
    "full_attention": ATTENTION,
    "attention": ATTENTION,
    "mlp": FFN,
    "moe": FFN,
}


class NemotronHAdapter(BackboneAdapter):
    model_types = ("nemotron_h",)

    def validate(self, config) -> None:
        unknown = set(config.layers_block_type) - set(_KINDS)
        if unknown:
            raise NotImplementedError(f"unsupported Nemotron-H block types: {sorted(unknown)}")
        if getattr(config, "conv_kernel", 4) < 2:
            raise NotImplementedError("Mamba conv_kernel must be >= 2")

    def parts(self, backbone: nn.Module) -> BackboneParts:
        model = backbone.model
        return BackboneParts(
            embed=model.embeddings,
            layers=model.layers,
            norm=model.norm_f,
            head=backbone.lm_head,
            rotary=None,
        )

    def sublayers(self, layer: nn.Module) -> list[SubLayer]:
        return [SubLayer(_KINDS[layer.block_type], layer.norm, layer.mixer)]

    def normalize(self, norm: nn.Module, h: torch.Tensor) -> torch.Tensor:
        # NemotronHBlock casts the residual stream to the norm's dtype first.
        return norm(h.to(dtype=norm.weight.dtype))
