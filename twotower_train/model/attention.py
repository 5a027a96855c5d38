"""The attention kernel both towers call: SDPA with a boolean mask, or FlexAttention.

Q/K/V come from the backbone family's own code (handed over by transformers' attention
registry, see ``registry.py``); this file only does the score/softmax/value part, so the
two towers and the two mask paths share it.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import torch
import torch.nn.functional as F

try:  # FlexAttention ships with torch >= 2.5; keep import failures non-fatal.
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - old torch
    BlockMask = None  # type: ignore[assignment,misc]
    create_block_mask = None  # type: ignore[assignment]
    flex_attention = None  # type: ignore[assignment]

from .masks import block_causal_mask_mod


def flex_available() -> bool:
    return flex_attention is not None


@lru_cache(maxsize=1)
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, block_mask, scale, softcap=None):
    if q.device.type == "cuda":
        fn = _compiled_flex()
    else:
        # On CPU the eager (unfused, score-materialising) path is exact and compiles nothing;
        # it is only used by tests and tiny runs.
        fn = flex_attention
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        score_mod = None
        if softcap is not None:

            def score_mod(score, b, h, q_idx, kv_idx):
                return softcap * torch.tanh(score / softcap)

        return fn(
            q,
            k,
            v,
            score_mod=score_mod,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )


def denoiser_block_mask(
    seq_len: int, block_size: int, doc_ids: torch.Tensor | None, device: torch.device
):
    """FlexAttention ``BlockMask`` for the one-pass denoiser (same predicate as
    ``masks.block_causal_mask`` & documents)."""
    if create_block_mask is None:  # pragma: no cover
        raise RuntimeError("FlexAttention is not available in this torch build")
    batch = None if doc_ids is None else doc_ids.shape[0]
    mask_mod = block_causal_mask_mod(seq_len, block_size, doc_ids)
    return create_block_mask(mask_mod, batch, None, seq_len, 2 * seq_len, device=device)


def window_block_mask(block_mask, mask_mod, allowed: torch.Tensor):
    """``block_mask`` (built from ``mask_mod``) narrowed to ``allowed [Tq, Tk]`` (a sliding
    window as a dense predicate over query / key indices)."""

    def windowed(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx, kv_idx) & allowed[q_idx, kv_idx]

    batch = block_mask.kv_num_blocks.shape[0]
    q_len, kv_len = block_mask.seq_lengths
    return create_block_mask(windowed, batch, None, q_len, kv_len, device=allowed.device)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    mask=None,
    is_causal: bool = False,
    softcap: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """``q [B, H, Tq, d]``, ``k/v [B, Hkv, Tk, d]`` -> ``[B, Tq, H, d]``.

    ``mask``: None, a bool tensor broadcastable to ``[B, H, Tq, Tk]`` (True = attend, SDPA), or a
    FlexAttention ``BlockMask``. ``softcap``: scores become ``softcap * tanh(s / softcap)``
    (Gemma 2); ``dropout``: on the attention weights (SDPA path). GQA is handled by the
    kernels (no repeated K/V copies) except on the soft-cap path.
    """
    if BlockMask is not None and isinstance(mask, BlockMask):
        if dropout:
            raise ValueError("attention dropout is not supported with FlexAttention")
        out = _flex(q, k, v, mask, scale, softcap)
    elif softcap is not None:
        out = _softcapped(q, k, v, scale, mask, is_causal, softcap, dropout)
    else:
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=is_causal and mask is None,
            scale=scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
    return out.transpose(1, 2)


def _softcapped(q, k, v, scale, mask, is_causal, softcap, dropout):
    """Attention with soft-capped scores, written out (SDPA has no soft-cap)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * scale
    scores = softcap * torch.tanh(scores / softcap)
    if is_causal and mask is None:
        tq, tk = scores.shape[-2:]
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    if mask is not None:
        scores = scores.masked_fill(~mask, -torch.inf)
    weights = torch.softmax(scores, dim=-1).to(v.dtype)
    weights = F.dropout(weights, p=dropout, training=dropout > 0)
    return weights @ v
