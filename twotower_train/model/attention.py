"""The attention kernel both towers call: SDPA with a boolean mask, or FlexAttention.

Q/K/V come from the backbone family's own projections (see ``adapters``); this file only
does the score/softmax/value part, so the two towers and the two mask paths share it.
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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as in the HF Llama family: ``x [B, H, T, d]``, ``cos/sin [B|1, T, d]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)


def flex_available() -> bool:
    return flex_attention is not None


@lru_cache(maxsize=1)
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, block_mask, scale):
    if q.device.type == "cuda":
        fn = _compiled_flex()
    else:
        # On CPU the eager (unfused, score-materialising) path is exact and compiles nothing;
        # it is only used by tests and tiny runs.
        fn = flex_attention
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


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


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    mask=None,
    is_causal: bool = False,
) -> torch.Tensor:
    """``q [B, H, Tq, d]``, ``k/v [B, Hkv, Tk, d]`` -> ``[B, Tq, H * d]``.

    ``mask``: None, a bool tensor broadcastable to ``[B, H, Tq, Tk]`` (True = attend, SDPA), or a
    FlexAttention ``BlockMask``. GQA is handled by the kernels (no repeated K/V copies).
    """
    if BlockMask is not None and isinstance(mask, BlockMask):
        out = _flex(q, k, v, mask, scale)
    else:
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal and mask is None,
            scale=scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
    batch, heads, length, dim = out.shape
    return out.transpose(1, 2).reshape(batch, length, heads * dim)
