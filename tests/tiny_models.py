"""Tiny random backbones of every supported family, built from configs (no downloads).

For the tests (no downloads): ``tiny_backbone("nemotron_h")`` is a 6-layer hybrid with
Mamba-2, attention, MoE and MLP blocks, hidden size 64, vocabulary 128, fp32.
"""

from __future__ import annotations

import torch

FAMILIES = ("llama", "qwen2", "qwen3", "nemotron_h")

NEMOTRON_H_PATTERN = [
    "linear_attention",
    "full_attention",
    "moe",
    "linear_attention",
    "mlp",
    "full_attention",
]


def tiny_config(family: str, **overrides):
    """A tiny ``transformers`` config of ``family`` (keyword overrides win)."""
    import transformers as tf

    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.1,  # larger than usual so perturbations show in the logits
    )
    if family == "llama":
        kwargs = dict(common, num_hidden_layers=3)
        return tf.LlamaConfig(**{**kwargs, **overrides})
    if family == "qwen2":
        kwargs = dict(common, num_hidden_layers=3)
        return tf.Qwen2Config(**{**kwargs, **overrides})
    if family == "qwen3":
        kwargs = dict(common, num_hidden_layers=3, head_dim=16)
        return tf.Qwen3Config(**{**kwargs, **overrides})
    if family == "nemotron_h":
        kwargs = dict(
            common,
            layers_block_type=list(NEMOTRON_H_PATTERN),
            head_dim=16,
            ssm_state_size=16,
            mamba_num_heads=8,
            mamba_head_dim=16,
            n_groups=2,
            conv_kernel=4,
            chunk_size=8,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=32,
        )
        return tf.NemotronHConfig(**{**kwargs, **overrides})
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def tiny_backbone(family: str, seed: int = 0, **overrides):
    """A tiny random ``*ForCausalLM`` of ``family`` in eval mode (deterministic in ``seed``)."""
    import transformers as tf

    classes = {
        "llama": tf.LlamaForCausalLM,
        "qwen2": tf.Qwen2ForCausalLM,
        "qwen3": tf.Qwen3ForCausalLM,
        "nemotron_h": tf.NemotronHForCausalLM,
    }
    config = tiny_config(family, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = classes[family](config)
    return model.eval()
