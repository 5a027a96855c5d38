"""DeepSpeed ZeRO engine setup.

Only parameters with `requires_grad=True` reach the optimizer, so a frozen
context tower costs no gradient buffers and no optimizer state at any stage.
Under ZeRO-3 the context tower is partitioned with the denoiser
(`deepspeed.context_placement=shard`, gathered layer by layer in its forward) or kept
whole on every rank in the run's dtype (`replicate`: DeepSpeed never sees it).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from twotower_train.config import (
    ContextPlacement,
    DeepSpeedConfig,
    DType,
    LRSchedule,
    OptimConfig,
)
from twotower_train.engine.zero_init import full_ndim


def lr_lambda(step: int, total: int, opt: OptimConfig) -> float:
    """LR multiplier at optimizer step `step` (0-based): warmup, then cosine/WSD/constant."""
    if opt.warmup_steps > 0 and step < opt.warmup_steps:
        return (step + 1) / opt.warmup_steps
    floor = opt.min_lr_ratio
    if opt.schedule == LRSchedule.constant:
        return 1.0
    if opt.schedule == LRSchedule.cosine:
        span = max(1, total - opt.warmup_steps)
        progress = min(1.0, (step - opt.warmup_steps) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # WSD: stable at 1.0, then linear decay to `floor` over the last decay_fraction.
    decay_steps = max(1, int(round(total * opt.decay_fraction)))
    decay_start = total - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / decay_steps)
    return 1.0 - (1.0 - floor) * progress


def deepspeed_config(
    ds: DeepSpeedConfig,
    *,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    grad_clip: float,
    dtype: DType,
) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": ds.stage}
    if ds.stage > 0:
        zero.update(
            overlap_comm=ds.overlap_comm,
            reduce_bucket_size=ds.reduce_bucket_size,
            allgather_bucket_size=ds.allgather_bucket_size,
        )
    if ds.stage == 3:
        zero.update(
            stage3_max_live_parameters=ds.max_live_parameters,
            stage3_max_reuse_distance=ds.max_reuse_distance,
            stage3_prefetch_bucket_size=ds.prefetch_bucket_size,
        )
    if ds.offload_optimizer:
        if ds.stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs ZeRO stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        # Explicit: DeepSpeed's own default is 1.0.
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": dtype == DType.bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters only; no weight decay on biases, norms and embeddings' 1-D params."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if full_ndim(p) >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_engine(
    module: nn.Module,
    opt: OptimConfig,
    ds: DeepSpeedConfig,
    config: dict[str, Any],
    *,
    dtype: DType,
    total_steps: int,
):
    """`deepspeed.initialize` with ``config`` (``deepspeed_config``), a client AdamW over the
    trainable parameters and a LambdaLR schedule of ``total_steps``. Returns ``(engine,
    optimizer, scheduler)``."""
    import deepspeed

    optimizer = torch.optim.AdamW(
        param_groups(module, opt.weight_decay),
        lr=opt.lr,
        betas=(opt.beta1, opt.beta2),
        eps=opt.eps,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, total_steps, opt)
    )
    replicated = []
    if ds.stage == 3 and ds.context_placement == ContextPlacement.replicate:
        replicated = _detach_context_towers(module)
    try:
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=config,
            dist_init_required=False,
        )
    finally:
        # Back as a plain attribute, whole, in the dtype DeepSpeed casts the rest to: outside
        # the module tree, which ZeRO-3's hooks walk and expect every parameter of to be its
        # own (nor do checkpoints store it: it is frozen, rebuilt from the backbone).
        for parent, name, tower in replicated:
            object.__setattr__(parent, name, tower.to(dtype.torch))
    return engine, optimizer, scheduler


def _detach_context_towers(module: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Take every frozen ``ContextTower`` out of ``module`` (so ``deepspeed.initialize`` does
    not partition it); returns ``(parent, name, tower)`` to put back."""
    from twotower_train.model.towers import ContextTower

    found = []
    for name, child in module.named_modules():
        if isinstance(child, ContextTower):
            if any(p.requires_grad for p in child.parameters()):
                raise ValueError(f"{name} is not frozen: it cannot be replicated")
            parent_name, _, attr = name.rpartition(".")
            found.append((module.get_submodule(parent_name), attr, child))
    for parent, attr, _ in found:
        delattr(parent, attr)
    return found


def trainable_state_dict(engine) -> dict[str, torch.Tensor]:
    """The trained parameters (``requires_grad``; not the frozen context tower), gathered
    on every rank (collective under ZeRO-3), fp32 on CPU, named as in ``engine.module``."""
    import deepspeed

    named = [(k, p) for k, p in engine.module.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(
        [p for _, p in named], modifier_rank=None, enabled=engine.zero_optimization_stage() == 3
    ):
        return {k: p.detach().float().cpu().clone() for k, p in named}
