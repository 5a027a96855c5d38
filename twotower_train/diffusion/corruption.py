"""Block-wise forward (corruption) process: replace tokens by [MASK] with their block's
mask probability."""

from __future__ import annotations

from typing import Literal

import torch

from twotower_train.diffusion.schedules import Schedule, mask_prob


def expand_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Per-block values [B, nb] -> per-token values [B, nb * block_size] (each repeated).

    Use it to turn sampled t [B, nb] into `t_tok` [B, L] for the losses.
    """
    return x.repeat_interleave(block_size, dim=1)


def mask_tokens(
    ids: torch.Tensor,
    t: torch.Tensor,
    *,
    block_size: int,
    mask_id: int,
    schedule: Schedule,
    mask_range: tuple[float, float] = (0.0, 1.0),
    loss_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    suffix_prob: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask each token independently with its block's probability.

    ids [B, L] int, t [B, nb] with nb = L / block_size, loss_mask [B, L] bool or None
    (None: every position may be masked).

    The block's mask probability is m(t) from `schedule`, clamped into
    mask_range = (mask_min, mask_max). Positions where loss_mask is False (prompt,
    padding) are never masked.

    Returns:
        noisy_ids [B, L]: ids with masked positions set to mask_id.
        masked [B, L] bool: which positions were masked.
        p_mask [B, L] fp32: the probability each position had of being masked
            (the clamped block probability; 0 where loss_mask is False).

    ``suffix_prob``: the share of blocks whose masked positions are moved to the block's
    end: such a block masks its last k maskable positions, k being the count the independent
    draw gave it (so the number masked per block has the same distribution). Left-to-right
    ("prefix") decoding only ever shows the denoiser blocks masked that way.

    Deterministic given the generator: the uniforms are drawn on the generator's device
    (CPU when there is none) and then moved to ids.device.
    """
    if not 0.0 <= suffix_prob <= 1.0:
        raise ValueError(f"suffix_prob must be in [0, 1], got {suffix_prob}")
    batch, length = ids.shape
    if length % block_size != 0:
        raise ValueError(f"sequence length {length} is not a multiple of block_size {block_size}")
    if t.shape != (batch, length // block_size):
        raise ValueError(f"t has shape {tuple(t.shape)}, expected {(batch, length // block_size)}")
    mask_min, mask_max = mask_range
    if not 0.0 <= mask_min <= mask_max <= 1.0:
        raise ValueError(f"mask_range must satisfy 0 <= min <= max <= 1, got {mask_range}")

    p_block = mask_prob(t, schedule).clamp(mask_min, mask_max)  # [B, nb]
    p_mask = expand_blocks(p_block, block_size).to(ids.device)  # [B, L]
    if loss_mask is not None:
        p_mask = p_mask * loss_mask.to(p_mask.dtype)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(batch, length, generator=generator, device=gen_device).to(ids.device)
    # u in [0, 1), so p = 0 never masks and p = 1 always masks.
    masked = u < p_mask
    if suffix_prob > 0:
        masked = _suffix_blocks(masked, p_mask > 0, block_size, suffix_prob, generator)
    noisy_ids = torch.where(masked, torch.full_like(ids, mask_id), ids)
    return noisy_ids, masked, p_mask


def _suffix_blocks(
    masked: torch.Tensor,
    maskable: torch.Tensor,
    block_size: int,
    share: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """``masked [B, L]`` with a ``share`` of its blocks re-masked as a suffix: the last k
    maskable positions of the block, k = how many the block had masked."""
    batch, length = masked.shape
    nb = length // block_size
    m = masked.view(batch, nb, block_size)
    ok = maskable.view(batch, nb, block_size)
    k = m.sum(-1, keepdim=True)
    from_right = ok.flip(-1).long().cumsum(-1).flip(-1)  # maskable positions at or after i
    suffix = ok & (from_right <= k)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    pick = torch.rand(batch, nb, 1, generator=generator, device=gen_device).to(masked.device)
    return torch.where(pick < share, suffix, m).view(batch, length)


AfterEOSMode = Literal["ignore", "eos", "keep"]


def after_eos_targets(
    ids: torch.Tensor,
    in_block_doc: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    mode: AfterEOSMode,
    eos_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a block's positions past an in-block EOS are trained on.

    ids [B, L] clean, in_block_doc [B, L] bool (True where a position belongs to the
    document open at its block's start, see ``model.masks.block_document_ids``),
    loss_mask [B, L] bool.

    Returns ``(targets [B, L], maskable [B, L], scored [B, L])``: the row the noisy block is
    made from and scored against, where `mask_tokens` may mask (its ``loss_mask``), and which
    masked positions enter the loss (``masked & scored``).

    Positions after the EOS are maskable in every mode, also where ``loss_mask`` is False (the
    next document's prompt): a position that is never masked would show where the document
    ended.

    * ``ignore``: noised like the rest, not scored (decoding discards what follows an EOS);
    * ``eos``: they read EOS, input and target (a finished answer padded with EOS);
    * ``keep``: the next document's tokens are the targets (the block cannot know them).
    """
    if mode not in ("ignore", "eos", "keep"):
        raise ValueError(f"unknown after_eos mode {mode!r}; expected 'ignore', 'eos' or 'keep'")
    outside = ~in_block_doc
    maskable = loss_mask | outside
    if mode == "keep":
        return ids, maskable, loss_mask
    if mode == "ignore":
        return ids, maskable, loss_mask & in_block_doc
    if eos_id is None:
        raise ValueError("after_eos='eos' needs eos_id")
    return ids.masked_fill(outside, eos_id), maskable, maskable
