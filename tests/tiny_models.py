"""Tiny random backbones built from ``transformers`` configs (no downloads).

``FAMILIES``: the families every model test runs on (``tiny_backbone(family)``), e.g.
``tiny_backbone("nemotron_h")`` is a 6-layer hybrid with Mamba-2, attention, MoE and MLP
blocks, hidden size 64, vocabulary 128, fp32. ``registry_backbone(model_type)``: any
causal LM transformers ships, shrunk from its default config (``test_families.py``).
"""

from __future__ import annotations

import torch

FAMILIES = (
    "llama",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "gemma3_text",  # sliding-window and global layers, QK-norm, scaled embeddings, post-norms
    "granite",  # embedding / residual / attention / logit multipliers
    "smollm3",  # layers without RoPE
    "cohere",  # parallel attention + MLP, logit scale
    "nemotron_h",
)

# Sizes for ``registry_config``: every key a config's constructor knows is set.
TINY_SIZES = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=3,
    head_dim=16,
    max_position_embeddings=512,
    moe_intermediate_size=32,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    shared_expert_intermediate_size=32,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.1,  # larger than usual so perturbations show in the logits
    n_embd=64,
    n_head=4,
    n_layer=3,
    n_positions=512,
    d_model=64,
    num_layers=3,
    ffn_dim=96,
    n_inner=96,
    sliding_window=6,
    # multi-head latent attention (DeepSeek-V2/V3, MiniCPM3) and partial rotary (GPT-J)
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    kv_lora_rank=16,
    q_lora_rank=32,
    rotary_dim=8,
)
# Per-family settings on top of TINY_SIZES (e.g. a layer pattern that shows every kind).
FAMILY_OVERRIDES = {
    "gemma3_text": dict(layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "smollm3": dict(no_rope_layers=[1, 0, 1]),
    "qwen3_moe": dict(decoder_sparse_step=1, mlp_only_layers=[1]),
}

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
    if family in FAMILIES:
        return registry_config(family, **overrides)
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def registry_config(model_type: str, **overrides):
    """The default config of ``model_type`` shrunk with ``TINY_SIZES`` (and the family's
    ``FAMILY_OVERRIDES``; keyword overrides win)."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    default = cls()
    # only what the family's config knows (a stray ``sliding_window`` would be read by the
    # attention layers of some families without being in their masks)
    sizes = {k: v for k, v in TINY_SIZES.items() if hasattr(default, k)}
    return cls(**{**sizes, **FAMILY_OVERRIDES.get(model_type, {}), **overrides})


def registry_backbone(model_type: str, seed: int = 0, max_params: float = 8e6):
    """A tiny random causal LM of ``model_type`` (eval mode), or a ``str`` saying why none can
    be built (the config refuses the tiny sizes, or the model stays large)."""
    import transformers as tf

    try:
        config = registry_config(model_type)
        with torch.device("meta"):
            n = sum(p.numel() for p in tf.AutoModelForCausalLM.from_config(config).parameters())
        if n > max_params:
            return f"{n / 1e6:.0f}M parameters at the tiny sizes"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return tf.AutoModelForCausalLM.from_config(config).eval()
    except Exception as exc:  # a config / model that cannot be built small: not ours to judge
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0][:120] if text else ''}"


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
    cls = classes.get(family, tf.AutoModelForCausalLM.from_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model.eval()
