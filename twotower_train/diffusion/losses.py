"""Losses of the two-tower objective: masked-diffusion cross-entropy and distillation
from the AR context tower. All math in fp32; only the selected positions' logits are
upcast, never a full [B, L, V] fp32 copy."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from twotower_train.diffusion.schedules import Schedule, elbo_weight

Weighting = Literal["none", "elbo"]
KDDirection = Literal["forward", "reverse"]
TWeighting = Literal["none", "t", "1-t"]


def diffusion_ce(
    logits: torch.Tensor,
    targets: torch.Tensor,
    masked: torch.Tensor,
    *,
    t_tok: torch.Tensor | None = None,
    weighting: Weighting = "none",
    schedule: Schedule = "linear",
    num_loss_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked-diffusion cross-entropy, scalar fp32.

    logits [B, L, V] (denoiser, any float dtype), targets [B, L] clean ids,
    masked [B, L] bool, t_tok [B, L] per-token diffusion time (needed for "elbo").

    weighting="none": mean CE over all masked tokens in the batch,
        sum_masked CE / #masked.
    weighting="elbo": MDLM continuous-time bound,
        sum_masked w(t) CE / num_loss_tokens,  w(t) = m'(t) / m(t),
        where num_loss_tokens is the number of tokens that *could* be masked (the
        loss_mask count, e.g. `loss_mask.sum()`, or a count over all ranks). Dividing by
        that fixed count, not by #masked, keeps it an unbiased estimate of the
        per-token negative ELBO in nats; dividing by #masked would not be.

    Either form returns a graph-attached 0 when there is nothing to score.
    """
    if weighting not in ("none", "elbo"):
        raise ValueError(f"unknown weighting {weighting!r}; expected 'none' or 'elbo'")
    if weighting == "elbo" and (t_tok is None or num_loss_tokens is None):
        raise ValueError("weighting='elbo' needs t_tok and num_loss_tokens")
    sel_logits = logits[masked].float()  # [N, V]
    sel_targets = targets[masked]  # [N]
    if sel_targets.numel() == 0:
        return sel_logits.sum()  # 0, still attached to the graph
    ce = F.cross_entropy(sel_logits, sel_targets, reduction="none")  # [N]
    if weighting == "none":
        return ce.mean()
    return (ce_weights(t_tok[masked], "elbo", schedule) * ce).sum() / loss_token_count(
        num_loss_tokens, ce.device
    )


def ce_weights(t: torch.Tensor, weighting: Weighting, schedule: Schedule) -> torch.Tensor:
    """Per-token weight of the diffusion CE at times ``t [N]``: 1, or the ELBO's m'(t)/m(t)."""
    if weighting == "none":
        return torch.ones_like(t, dtype=torch.float32)
    return elbo_weight(t, schedule)


def loss_token_count(num_loss_tokens: int | torch.Tensor, device) -> torch.Tensor:
    """The ELBO's fixed denominator as an fp32 scalar, at least 1."""
    return torch.as_tensor(num_loss_tokens, dtype=torch.float32, device=device).clamp_min(1.0)


def kd_weights(t: torch.Tensor | None, t_weighting: TWeighting, n: int, device) -> torch.Tensor:
    """Per-token weight of the distillation KL at times ``t [N]``: 1, t or 1 - t."""
    if t_weighting == "t":
        return t.float()
    if t_weighting == "1-t":
        return 1.0 - t.float()
    return torch.ones(n, device=device)


def kl_per_row(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    temperature: float = 1.0,
    direction: KDDirection = "forward",
) -> torch.Tensor:
    """KL between ``softmax(teacher / T)`` and ``softmax(student / T)`` per row of fp32
    logits ``[N, V]`` -> ``[N]``, forward ``KL(p || q)`` or reverse ``KL(q || p)``; the
    teacher is detached (no ``T^2`` factor here)."""
    log_q = F.log_softmax(student / temperature, dim=-1)
    log_p = F.log_softmax(teacher.detach() / temperature, dim=-1)
    return _kl_rows(log_p, log_q) if direction == "forward" else _kl_rows(log_q, log_p)


def _kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row from log-probabilities [N, V] -> [N].

    0 log 0 = 0: entries where a has zero mass (a -inf logit, e.g. a banned token) are
    filled with 0 before the product, so neither the value nor the gradient turns NaN.
    """
    empty = log_a == -torch.inf
    diff = log_a.masked_fill(empty, 0.0) - log_b.masked_fill(empty, 0.0)
    return (log_a.exp() * diff).sum(-1)


def shift_teacher_logits(context_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align the AR context tower's next-token logits with the denoiser's positions.

    context_logits [B, L, V]: position p-1 predicts token p.
    Returns teacher [B, L, V] with teacher[:, p] = context_logits[:, p - 1] (teacher[:, 0]
    is a copy of context_logits[:, 0], a placeholder) and valid [B, L] bool, False at
    p = 0 where there is no teacher. Pass `masked & valid` to `distillation_kl`.
    """
    teacher = torch.cat([context_logits[:, :1], context_logits[:, :-1]], dim=1)
    valid = torch.ones(context_logits.shape[:2], dtype=torch.bool, device=context_logits.device)
    valid[:, 0] = False
    return teacher, valid


def distillation_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    masked: torch.Tensor,
    *,
    temperature: float = 1.0,
    direction: KDDirection = "forward",
    t_tok: torch.Tensor | None = None,
    t_weighting: TWeighting = "none",
) -> torch.Tensor:
    """KL between teacher and student token distributions at masked positions, scalar fp32.

    student_logits [B, L, V], teacher_logits [B, L, V] (already shifted, see
    `shift_teacher_logits`), masked [B, L] bool (positions to score; include the
    teacher's `valid`), t_tok [B, L] (needed unless t_weighting="none").

    With p = softmax(teacher / T), q = softmax(student / T):
        forward: KL(p || q) = sum_v p (log p - log q)   (mass-covering)
        reverse: KL(q || p) = sum_v q (log q - log p)   (mode-seeking)
    each times T^2 so gradient scale does not depend on T (Hinton et al.).
    Per-token weight a = 1, t or 1 - t; loss = sum_masked a * KL / #masked (a mean over
    masked positions, not normalised by the sum of weights).
    The teacher is detached. Exactly 0 when student == teacher.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if direction not in ("forward", "reverse"):
        raise ValueError(f"unknown direction {direction!r}; expected 'forward' or 'reverse'")
    if t_weighting not in ("none", "t", "1-t"):
        raise ValueError(f"unknown t_weighting {t_weighting!r}; expected 'none', 't' or '1-t'")
    if t_weighting != "none" and t_tok is None:
        raise ValueError(f"t_weighting={t_weighting!r} needs t_tok")
    student = student_logits[masked].float()  # [N, V]
    if student.shape[0] == 0:
        return student.sum()  # 0, still attached to the graph
    teacher = teacher_logits[masked].float()  # [N, V]
    kl = kl_per_row(student, teacher, temperature=temperature, direction=direction)  # [N]
    t_sel = None if t_tok is None else t_tok[masked]
    kl = kl * kd_weights(t_sel, t_weighting, kl.shape[0], kl.device)
    return kl.mean() * temperature**2
