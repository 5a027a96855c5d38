"""Masked (absorbing-state) block diffusion: schedules, corruption and losses.

Pure functions of tensors; the training objective module composes them.
"""

from twotower_train.diffusion.corruption import (
    AfterEOSMode,
    after_eos_targets,
    expand_blocks,
    mask_tokens,
)
from twotower_train.diffusion.losses import (
    KDDirection,
    TWeighting,
    Weighting,
    ce_weights,
    diffusion_ce,
    distillation_kl,
    kd_weights,
    kl_per_row,
    loss_token_count,
    shift_teacher_logits,
)
from twotower_train.diffusion.schedules import (
    Schedule,
    TimePer,
    elbo_weight,
    mask_prob,
    sample_t,
)

__all__ = [
    "AfterEOSMode",
    "after_eos_targets",
    "KDDirection",
    "Schedule",
    "TWeighting",
    "TimePer",
    "Weighting",
    "ce_weights",
    "diffusion_ce",
    "distillation_kl",
    "kd_weights",
    "kl_per_row",
    "loss_token_count",
    "elbo_weight",
    "expand_blocks",
    "mask_prob",
    "mask_tokens",
    "sample_t",
    "shift_teacher_logits",
]
