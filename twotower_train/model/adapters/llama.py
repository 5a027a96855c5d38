"""Llama and Qwen2: ``model.embed_tokens``, decoder layers of
``input_layernorm -> self_attn`` and ``post_attention_layernorm -> mlp``, ``model.norm``,
``model.rotary_emb``, ``lm_head``. Qwen2 differs only by q/k/v biases, which live inside
the reused ``nn.Linear`` modules."""

from __future__ import annotations

from torch import nn

from .base import ATTENTION, FFN, BackboneAdapter, BackboneParts, SubLayer


class LlamaAdapter(BackboneAdapter):
    model_types = ("llama", "qwen2")

    def validate(self, config) -> None:
        layer_types = getattr(config, "layer_types", None) or []
        if "sliding_attention" in layer_types or getattr(config, "use_sliding_window", False):
            raise NotImplementedError("sliding-window attention layers are not supported")

    def parts(self, backbone: nn.Module) -> BackboneParts:
        model = backbone.model
        return BackboneParts(
            embed=model.embed_tokens,
            layers=model.layers,
            norm=model.norm,
            head=backbone.lm_head,
            rotary=model.rotary_emb,
        )

    def sublayers(self, layer: nn.Module) -> list[SubLayer]:
        return [
            SubLayer(ATTENTION, layer.input_layernorm, layer.self_attn),
            SubLayer(FFN, layer.post_attention_layernorm, layer.mlp),
        ]
