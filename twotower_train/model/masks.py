"""Attention masks of the two towers, as pure functions.

Convention everywhere: a boolean mask is True where a query MAY attend to a key.

The denoiser's one-pass training attention runs over the concatenation
``[context keys (L) ; denoiser keys (L)]``.  Query ``i`` (in block ``i // bs``) sees

* context key ``j < L``        iff ``j // bs <  i // bs``   (clean blocks 0..n-1)
* denoiser key ``L + j``       iff ``j // bs == i // bs``   (its own noisy block, bidirectional)

``block_causal_mask`` builds that as a dense ``[L, 2L]`` tensor (SDPA path);
``block_causal_mask_mod`` is the same predicate as a FlexAttention ``mask_mod``.
An optional ``doc_ids [B, L]`` forbids attention across document boundaries in both halves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def block_causal_mask(seq_len: int, block_size: int, device: torch.device | str | None = None):
    """Denoiser one-pass mask: bool ``[L, 2L]``, True = attend (see module docstring)."""
    q_block = torch.arange(seq_len, device=device) // block_size  # [L]
    k_block = q_block
    context = k_block[None, :] < q_block[:, None]  # [L, L]: earlier clean blocks only
    own = k_block[None, :] == q_block[:, None]  # [L, L]: same noisy block, both directions
    return torch.cat([context, own], dim=1)


def block_causal_mask_mod(
    seq_len: int, block_size: int, doc_ids: torch.Tensor | None = None
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` equal to ``block_causal_mask`` (& docs).

    ``kv_idx`` indexes the concatenation ``[context keys ; denoiser keys]`` of length ``2L``.
    """

    def mask_mod(b, h, q_idx, kv_idx):
        is_context = kv_idx < seq_len
        k_pos = torch.where(is_context, kv_idx, kv_idx - seq_len)
        q_blk = q_idx // block_size
        k_blk = k_pos // block_size
        allowed = torch.where(is_context, k_blk < q_blk, k_blk == q_blk)
        if doc_ids is not None:
            allowed = allowed & (doc_ids[b, q_idx] == doc_ids[b, k_pos])
        return allowed

    return mask_mod


def same_doc_mask(q_docs: torch.Tensor, k_docs: torch.Tensor) -> torch.Tensor:
    """``[B, Tq]`` x ``[B, Tk]`` document ids -> bool ``[B, 1, Tq, Tk]`` (True = same document)."""
    return (q_docs[:, :, None] == k_docs[:, None, :])[:, None]


def causal_mask(
    query_len: int, past_len: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Context-tower mask for ``query_len`` new tokens after ``past_len`` cached ones.

    bool ``[Tq, past + Tq]``: query ``i`` (absolute position ``past + i``) sees keys ``<= past + i``.
    """
    q_pos = torch.arange(query_len, device=device)[:, None] + past_len
    k_pos = torch.arange(past_len + query_len, device=device)[None, :]
    return k_pos <= q_pos


def denoiser_attention_mask(
    seq_len: int,
    block_size: int,
    doc_ids: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Dense one-pass denoiser mask, broadcastable to ``[B, H, L, 2L]`` for SDPA.

    Without documents: ``[1, 1, L, 2L]``; with ``doc_ids [B, L]``: ``[B, 1, L, 2L]``.
    """
    mask = block_causal_mask(seq_len, block_size, device=device)[None, None]
    if doc_ids is not None:
        docs = doc_ids.to(device) if device is not None else doc_ids
        mask = mask & same_doc_mask(docs, torch.cat([docs, docs], dim=1))
    return mask


def context_attention_mask(
    seq_len: int,
    doc_ids: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """Context-tower one-pass mask: None (plain causal, SDPA ``is_causal``) or, with
    ``doc_ids [B, L]``, bool ``[B, 1, L, L]`` = causal & same document."""
    if doc_ids is None:
        return None
    return causal_mask(seq_len, 0, device=doc_ids.device)[None, None] & same_doc_mask(
        doc_ids, doc_ids
    )
