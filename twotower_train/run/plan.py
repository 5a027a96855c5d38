"""``mode=plan``: the two-tower model of a recipe built on the meta device (no weights, no
network), its parameter counts, and a per-GPU memory estimate for ZeRO 0-3 at the recipe's
micro batch and sequence length, with activation checkpointing off and on.

    python -m twotower_train recipe=nemotron_3_nano_30b_a3b mode=plan plan.gpus=64

The formula (docs/recipes.md, "Memory plan") in bytes per GPU, Ψd = trainable (denoiser)
parameters, Ψc = frozen (context tower) parameters, N = ``plan.gpus``, w = 2 (bf16) or 4
(fp32) bytes:

    context tower   w Ψc                 (/N under ZeRO-3 with context_placement=shard)
    denoiser        w Ψd                 (/N at stage 3)
    gradients       w Ψd                 (/N at stages 2-3)
    Adam            (4 + 4 + 4) Ψd: fp32 master, m, v (DeepSpeed keeps the master even
                    for fp32 weights; plain fp32 AdamW at stage 0: 8 Ψd) (/N at stages 1-3)
                    + 4 Ψd / N with bf16 at stages 1-3: the gradient partition in fp32
    ZeRO buffers    stages 1-2: reduce + all-gather buckets (w x bucket elements);
                    stage 3: w x (max(largest module, min(Ψd [+ Ψc if sharded], live,
                    reuse)) + prefetch + reduce bucket): up to ``deepspeed.max_live_parameters``
                    (live, default 1e9) gathered parameters stay alive, and one used again
                    within ``max_reuse_distance`` (reuse, 1e9) fetched parameters is not
                    released (the denoiser's by its backward, a sharded context tower's by
                    the next step), plus the prefetch and reduce buckets
    activations     T = micro_batch x seq_len tokens, ``layer_activation_bytes`` per layer
                    (what autograd saves for the backward), the LM heads, the context
                    tower's K/V, Mamba states and logits that the denoiser reads; with
                    checkpointing each layer keeps its input (w h per token) and one layer
                    at a time is recomputed
    build (host)    built whole (ZeRO 0-2, or ``deepspeed.zero_init=false``), every process
                    holds the fp32 model and, training in bf16, a template copy before ZeRO
                    partitions it: 8 (Ψc + Ψd) (4 (Ψc + Ψd) in fp32); built partitioned (ZeRO-3, ``zero_init``, the default),
                    its partitions w (Ψc + Ψd) / N plus the largest tensor gathered whole
                    while it is copied (a replicated context tower or a scratch backbone:
                    + 4 Ψc, built whole first);
                    printed under the table
    host (cpu)      ``plan.device=cpu``: the fp32 template copy of the whole model a bf16
                    run built whole keeps for evaluation and export (4 (Ψc + Ψd)) is in the
                    same memory (a partitioned build, or an fp32 run, whose live weights are
                    exact, keeps it on the meta device: nothing)

Estimates, not measurements: allocator slack, fragmentation and the framework's own
buffers come on top (docs/recipes.md compares with a measured run).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from twotower_train.config import Config, ContextPlacement, InitMode, PlanDevice
from twotower_train.model import TwoTowerModel

GIB = 2**30


@dataclass
class LayerShape:
    """What a denoiser layer's activations depend on (widths per token)."""

    kinds: tuple[str, ...]  # of "attention", "mlp", "moe", "mamba"
    params: int  # parameters of the layer (ZeRO-3 gathers one layer at a time)
    hidden: int
    q: int = 0  # attention: heads x head_dim
    kv: int = 0  # attention: kv heads x head_dim
    heads: int = 0
    qk_norm: bool = False
    inter: int = 0  # dense MLP width
    gated: bool = True  # MLP / experts: gate x up (SwiGLU) vs one up projection (relu2)
    experts: int = 0  # MoE: routed experts, top-k, expert and shared widths
    top_k: int = 0
    moe_inter: int = 0
    shared_inter: int = 0
    d_inner: int = 0  # Mamba-2: heads x head_dim
    conv_dim: int = 0
    in_proj: int = 0
    ssm_heads: int = 0
    ssm_state: int = 0  # head_dim x state size (the SSM state per head)
    conv_kernel: int = 4


@dataclass
class ModelShape:
    """What the estimate reads off a built model (``model_shape``)."""

    trainable: int
    frozen: int
    hidden: int
    vocab: int
    layers: list[LayerShape]  # the denoiser's layers
    context_layers: list[LayerShape]  # the backbone's layers
    largest_module: int  # parameters of the largest module ZeRO-3 gathers at once
    model_type: str = ""
    largest_tensor: int = 0  # elements of the largest single parameter


@dataclass
class Estimate:
    """Bytes per GPU, by part."""

    context: float
    weights: float
    grads: float
    optimizer: float
    buffers: float
    activations: float
    host: float = 0.0  # plan.device=cpu: the run's fp32 template copy

    @property
    def total(self) -> float:
        return (
            self.context
            + self.weights
            + self.grads
            + self.optimizer
            + self.buffers
            + self.activations
            + self.host
        )


# -- the model on the meta device ----------------------------------------------------------


def meta_model(cfg: Config) -> TwoTowerModel:
    """The run's two-tower model with every tensor on the meta device (no memory, no
    weights, no network): the backbone built from its config alone."""
    from transformers import AutoModelForCausalLM

    from twotower_train.backbones import BackboneError, backbone_config

    config = backbone_config(cfg.backbone)
    try:
        with torch.device("meta"):
            backbone = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            vocab = backbone.get_input_embeddings().num_embeddings
            mask = cfg.denoiser.mask_token_id
            # the mask token changes no shape: any id in the vocabulary will do
            mask = mask if mask is not None and 0 <= mask < vocab else vocab - 1
            return TwoTowerModel.from_backbone(backbone, cfg.denoiser, mask_token_id=mask)
    except BackboneError:
        raise
    except Exception as exc:
        from twotower_train.errors import first_line

        raise BackboneError(
            f"cannot build '{config.model_type}' on the meta device: {first_line(exc)}"
        ) from None


def model_shape(model: TwoTowerModel) -> ModelShape:
    """Parameter counts and per-layer widths of a built (meta or real) two-tower model."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    config = model.backbone.config
    embed = model.denoiser.embed.weight
    head = model.denoiser.head.weight
    layers = [_layer_shape(layer, config) for layer in model.denoiser.layers]
    largest = max([embed.numel(), head.numel(), *(s.params for s in layers)])
    return ModelShape(
        trainable=trainable,
        frozen=frozen,
        hidden=embed.shape[1],
        vocab=head.shape[0],
        layers=layers,
        context_layers=[_layer_shape(layer, config) for layer in model.context.layers],
        largest_module=largest,
        model_type=getattr(config, "model_type", ""),
        largest_tensor=max(p.numel() for p in model.parameters()),
    )


def _layer_shape(layer: nn.Module, config) -> LayerShape:
    hidden = config.hidden_size
    shape = LayerShape(kinds=(), params=sum(p.numel() for p in layer.parameters()), hidden=hidden)
    kinds = []
    names = {type(m).__name__.lower(): m for m in layer.modules()}
    mods = dict(layer.named_modules())
    q_proj = next((m for n, m in mods.items() if n.endswith("q_proj")), None)
    k_proj = next((m for n, m in mods.items() if n.endswith("k_proj")), None)
    if q_proj is not None and k_proj is not None:
        kinds.append("attention")
        shape.q, shape.kv = q_proj.out_features, k_proj.out_features
        shape.heads = config.num_attention_heads
        shape.qk_norm = any(n.endswith("q_norm") for n in mods)
    mamba = next((m for n, m in names.items() if "mamba" in n and hasattr(m, "conv_dim")), None)
    if mamba is not None:
        kinds.append("mamba")
        shape.d_inner = mamba.intermediate_size
        shape.conv_dim = mamba.conv_dim
        shape.in_proj = mamba.in_proj.out_features
        shape.ssm_heads = mamba.num_heads
        shape.ssm_state = mamba.head_dim * mamba.ssm_state_size
        shape.conv_kernel = mamba.conv_kernel_size
    relu2 = "relu2" in str(getattr(config, "mlp_hidden_act", getattr(config, "hidden_act", "")))
    shape.gated = not relu2
    experts = getattr(config, "n_routed_experts", None) or getattr(config, "num_experts", None)
    if experts and any("moe" in n or "experts" in n for n in names):
        kinds.append("moe")
        shape.experts = experts
        shape.top_k = config.num_experts_per_tok
        shape.moe_inter = getattr(config, "moe_intermediate_size", config.intermediate_size)
        shared = getattr(config, "moe_shared_expert_intermediate_size", None)
        shared = shared or getattr(config, "shared_expert_intermediate_size", 0) or 0
        shape.shared_inter = shared * max(1, getattr(config, "n_shared_experts", 1) or 1)
    elif any(n.endswith(("up_proj", "fc1", "c_fc")) for n in mods):
        kinds.append("mlp")
        up = next(m for n, m in mods.items() if n.endswith(("up_proj", "fc1", "c_fc")))
        shape.inter = getattr(up, "out_features", config.intermediate_size)
        shape.gated = shape.gated and any(n.endswith("gate_proj") for n in mods)
    shape.kinds = tuple(kinds)
    return shape


# -- activations ---------------------------------------------------------------------------


def layer_activation_bytes(s: LayerShape, a: int, seq_len: int, block: int) -> float:
    """Bytes per token one denoiser layer saves for the backward (no checkpointing).

    ``a``: activation bytes (2 bf16, 4 fp32). RMSNorms compute in fp32: each keeps its fp32
    input and the normalised output (``(4 + a) x width``). The counts follow what autograd
    saves in the HF modules and in ``model/attention.py`` / ``model/mamba.py``."""
    h = s.hidden
    total = (4 + a) * h  # the layer's input norm
    if "attention" in s.kinds:
        # q after RoPE, [context K/V ; own K/V] (2 L keys), attention output and o_proj's
        # input copy, fp32 log-sum-exp per head, the [L, 2L] mask in the activation dtype
        total += a * (s.q + 2 * 2 * s.kv + 2 * s.q) + 4 * s.heads + a * 2 * seq_len
        if s.qk_norm:
            total += (4 + a) * (s.q + s.kv)
    if "mlp" in s.kinds:
        # gated: gate output (the activation's input), activation output, up output, the
        # product (down_proj's input) -- autograd keeps three distinct tensors of them
        total += (3 if s.gated else 2) * a * s.inter
        if "attention" in s.kinds:  # pre-MLP norm of a dense (Llama-style) layer
            total += (4 + a) * h
    if "moe" in s.kinds:
        per_expert = (3 if s.gated else 2) * a * s.moe_inter
        # router logits and scores (fp32); each of the top-k copies: its input, the expert's
        # hidden activations, its output; the shared expert as a dense MLP
        total += 2 * 4 * s.experts + s.top_k * (2 * a * h + per_expert)
        total += (3 if s.gated else 2) * a * s.shared_inter
    if "mamba" in s.kinds:
        # in_proj output, conv input window + output (silu), gated norm (fp32), out_proj
        # input; the SSD scan in fp32 (mamba.py, chunk = block): x*dt, y, the intra-block
        # [bs, bs] decay per head, and the per-block [H, P, N] states (twice: entering and
        # leaving) shared by the block's tokens
        total += a * (s.in_proj + 2 * s.conv_dim + 2 * s.d_inner) + (4 + a) * s.d_inner
        total += 4 * (3 * s.d_inner + 2 * s.ssm_heads * block)
        total += 4 * 2 * s.ssm_heads * s.ssm_state / block
    return total


def context_retained_bytes(s: LayerShape, a: int, block: int) -> float:
    """Bytes per token the context tower hands the denoiser from one layer (alive through
    the forward): attention K and V; Mamba conv window and SSM state at every block start."""
    total = 0.0
    if "attention" in s.kinds:
        total += a * 2 * s.kv
    if "mamba" in s.kinds:
        total += (a * (s.conv_kernel - 1) * s.conv_dim + 4 * s.ssm_heads * s.ssm_state) / block
    return total


def head_bytes(vocab: int, a: int) -> float:
    """Bytes per token of the denoiser's LM head saved for the backward: its logits
    (activation dtype), their fp32 copy, the shifted fp32 copy, and the cross-entropy's
    log-softmax of the masked rows (about half of them)."""
    return (a + 4 + 4 + 4 * 0.5) * vocab


def saved_bytes(shape: ModelShape, *, tokens: int, seq_len: int, block: int, a: int) -> float:
    """Bytes autograd saves for the denoiser's backward over ``tokens`` tokens (no
    checkpointing): its layers and the cross-entropy's fp32 rows (about half are masked);
    the LM head's other copies are alive at the end of the forward, not saved."""
    layers = sum(layer_activation_bytes(s, a, seq_len, block) for s in shape.layers)
    return tokens * (layers + 4 * 0.5 * shape.vocab)


def activation_bytes(shape: ModelShape, cfg: Config, a: int, checkpointing: bool) -> float:
    """Bytes of activations per GPU for one micro batch (``cfg.train.micro_batch_size`` x
    ``cfg.data.seq_len`` tokens): what the denoiser saves, and what the context tower hands
    it (K/V, Mamba states, its fp32 logits), alive until the forward ends."""
    seq, block = cfg.data.seq_len, cfg.denoiser.block_size
    tokens = cfg.train.micro_batch_size * seq
    per_layer = [layer_activation_bytes(s, a, seq, block) for s in shape.layers]
    if checkpointing:
        layers = a * shape.hidden * len(per_layer) + max(per_layer)
    else:
        layers = sum(per_layer)
    context = sum(context_retained_bytes(s, a, block) for s in shape.context_layers)
    context += 4 * shape.vocab  # the context tower's fp32 logits
    return tokens * (layers + context + head_bytes(shape.vocab, a))


# -- model states --------------------------------------------------------------------------


def estimate(shape: ModelShape, cfg: Config, stage: int, checkpointing: bool) -> Estimate:
    """Per-GPU bytes of ``shape`` trained with ``cfg`` at ZeRO ``stage`` on ``cfg.plan.gpus``."""
    n = cfg.plan.gpus
    w = cfg.precision.dtype.torch.itemsize
    pd, pc = shape.trainable, shape.frozen
    shard_context = stage == 3 and cfg.deepspeed.context_placement == ContextPlacement.shard
    # DeepSpeed's ZeRO optimizers (stages 1-3, and bf16 at stage 0) keep an fp32 master copy
    # beside the model's own parameters, even when those are fp32; plain fp32 AdamW does not
    adam = (8 if w == 4 and stage == 0 else 12) * pd
    # bf16 with a master copy: the gradient partition is cast to fp32 for the step
    master_grads = 4 * pd / n if w == 2 and stage > 0 else 0.0
    if stage == 3:
        # up to max_live_parameters gathered parameters stay alive, and one used again within
        # max_reuse_distance fetched parameters (the denoiser's by its backward, a sharded
        # context tower's by the next step) is not released; the largest module is gathered
        # whole; + the prefetch and reduce buckets
        reused = pd + (pc if shard_context else 0)
        ds = cfg.deepspeed
        kept = min(reused, ds.max_live_parameters, ds.max_reuse_distance)
        live = max(shape.largest_module, kept)
        buffers = w * (live + ds.prefetch_bucket_size + ds.reduce_bucket_size)
    elif stage > 0:
        buffers = w * (cfg.deepspeed.reduce_bucket_size + cfg.deepspeed.allgather_bucket_size)
    else:
        buffers = 0.0
    whole_template = not (stage == 3 and cfg.deepspeed.zero_init) and w != 4
    host = 4 * (pd + pc) if cfg.plan.device == PlanDevice.cpu and whole_template else 0.0
    return Estimate(
        context=w * pc / (n if shard_context else 1),
        weights=w * pd / (n if stage == 3 else 1),
        grads=w * pd / (n if stage >= 2 else 1) + master_grads,
        optimizer=adam / (n if stage >= 1 else 1),
        buffers=buffers,
        activations=activation_bytes(shape, cfg, w, checkpointing),
        host=host,
    )


def build_bytes(shape: ModelShape, cfg: Config, stage: int) -> float:
    """Host memory per process while a run builds its model (``train.setup``). Built whole:
    the fp32 backbone, the denoiser's fp32 copy of it and (training in bf16) the template
    copy of both that the run keeps for evaluation and export, before DeepSpeed partitions
    anything. Built
    partitioned (ZeRO-3 with ``deepspeed.zero_init``): each tensor's partition from the
    start, one tensor gathered whole at a time, the template on the meta device."""
    pd, pc = shape.trainable, shape.frozen
    w = cfg.precision.dtype.torch.itemsize
    if stage != 3 or not cfg.deepspeed.zero_init:
        return (4 if w == 4 else 8) * (pd + pc)
    replicate = cfg.deepspeed.context_placement == ContextPlacement.replicate
    # built whole first: a replicated context tower, and a scratch backbone (drawn whole)
    whole = replicate or cfg.backbone.init == InitMode.scratch
    return w * (pd + (0 if replicate else pc)) / cfg.plan.gpus + (
        4 * pc if whole else 4 * shape.largest_tensor
    )


def plan_text(cfg: Config, shape: ModelShape | None = None) -> str:
    """The plan ``mode=plan`` prints: parameters, then one row per ZeRO stage and
    activation checkpointing setting."""
    shape = shape or model_shape(meta_model(cfg))
    n, d = cfg.plan.gpus, cfg.precision.dtype.value
    counts = {}
    for s in shape.layers:
        counts["+".join(s.kinds)] = counts.get("+".join(s.kinds), 0) + 1
    kinds = ", ".join(f"{v} {k}" for k, v in counts.items())
    lines = [
        f"plan: recipe {cfg.recipe}, backbone {cfg.backbone.name_or_path} ({shape.model_type})",
        f"parameters: {shape.trainable / 1e9:.3f}B trainable (denoiser: {len(shape.layers)} "
        f"layers: {kinds}), {shape.frozen / 1e9:.3f}B frozen (context tower)",
        f"per {cfg.plan.device.value} memory at micro batch {cfg.train.micro_batch_size} x "
        f"seq_len {cfg.data.seq_len}, {n} x {cfg.plan.device.value}, {d}, context "
        f"{cfg.deepspeed.context_placement.value} under ZeRO-3 (GiB):",
        "",
        "| ZeRO | ckpt | context | denoiser | grads | Adam | buffers | activations | "
        + ("host copy | " if cfg.plan.device == PlanDevice.cpu else "")
        + "total | fits |",
        "|---:|:---|---:|---:|---:|---:|---:|---:|"
        + ("---:|" if cfg.plan.device == PlanDevice.cpu else "")
        + "---:|:---|",
    ]
    for stage in (0, 1, 2, 3):
        for ckpt in (False, True):
            e = estimate(shape, cfg, stage, ckpt)
            cells = [e.context, e.weights, e.grads, e.optimizer, e.buffers, e.activations]
            if cfg.plan.device == PlanDevice.cpu:
                cells.append(e.host)
            fits = "yes" if e.total <= cfg.plan.gpu_memory_gib * GIB else "no"
            lines.append(
                f"| {stage} | {'on' if ckpt else 'off'} | "
                + " | ".join(_gib(c) for c in cells)
                + f" | {_gib(e.total)} | {fits} |"
            )
    lines.append("")
    how = (
        "built partitioned: deepspeed.zero_init"
        if cfg.deepspeed.zero_init
        else "deepspeed.zero_init=false"
    )
    lines.append(
        f"host RAM per process while building: ZeRO 0-2 {_gib(build_bytes(shape, cfg, 2))} GiB "
        "(fp32 backbone + denoiser copy + a bf16 run's template copy, before ZeRO "
        "partitions anything); "
        f"ZeRO-3 {_gib(build_bytes(shape, cfg, 3))} GiB ({how})"
    )
    lines.append(
        f"fits: total <= plan.gpu_memory_gib={cfg.plan.gpu_memory_gib:g}. ckpt on: "
        "train.activation_checkpointing=true (estimated: each denoiser layer keeps its "
        "input). Formula: twotower_train/plan.py, docs/recipes.md."
    )
    return "\n".join(lines)


def _gib(x: float) -> str:
    if x == 0:
        return "0"
    return f"{x / GIB:.2f}" if x < 10 * GIB else f"{x / GIB:.1f}"


def run_plan(cfg: Config) -> None:
    print(plan_text(cfg), flush=True)
