"""Attention masks of the two towers, as pure functions.

Convention everywhere: a boolean mask is True where a query MAY attend to a key.

The denoiser's one-pass training attention runs over the concatenation
``[context keys (L) ; denoiser keys (L)]``.  Query ``i`` (in block ``i // bs``) sees

* context key ``j < L``        iff ``j // bs <  i // bs``   (clean blocks 0..n-1)
* denoiser key ``L + j``       iff ``j // bs == i // bs``   (its own noisy block, bidirectional)

``block_causal_mask`` builds that as a dense ``[L, 2L]`` tensor (SDPA path);
``block_causal_mask_mod`` is the same predicate as a FlexAttention ``mask_mod``.

Documents. ``doc_ids [B, L]`` are built from the CLEAN row (an EOS closes its document).
The denoiser may only use the boundaries its clean context shows: block n belongs to ONE
document, the one open at its start (``block_document_ids``: ``doc_ids[:, n * bs]``, fixed
by the clean blocks 0..n-1 alone), exactly as at decoding, where the block after a prompt
is one document and an EOS is only known once committed. So a boundary inside block n
never splits its in-block attention, and its context keys are those of that one document.
A masked EOS inside the block therefore cannot be read off the mask.
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


def block_document_ids(doc_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """``doc_ids [B, L]`` (clean row) -> ``[B, L]``: every position carries the document of its
    block's first position -- the document open when the block starts, known from the clean
    blocks before it (an EOS that ends block n-1 opens a new document at block n)."""
    batch, length = doc_ids.shape
    starts = doc_ids[:, ::block_size]  # [B, nb]
    return starts.repeat_interleave(block_size, dim=1)[:, :length]


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """``doc_ids [B, L]`` -> each token's position inside its document ``[B, L]`` (what the
    model sees at decoding, where a document starts at position 0). Documents are contiguous."""
    batch, length = doc_ids.shape
    pos = torch.arange(length, device=doc_ids.device).expand(batch, length)
    new_doc = torch.ones_like(doc_ids, dtype=torch.bool)
    new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    starts = torch.where(new_doc, pos, torch.zeros_like(pos)).cummax(dim=1).values
    return pos - starts


def block_document_positions(doc_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """Positions of the denoiser's tokens with documents: block n continues the document open
    at its start (``block_document_ids``), so its tokens are numbered from that document's
    start, past an EOS inside the block as at decoding. ``[B, L]``."""
    batch, length = doc_ids.shape
    first = document_positions(doc_ids)[:, ::block_size]  # [B, nb]: block start in its doc
    offset = torch.arange(block_size, device=doc_ids.device)
    return (first[:, :, None] + offset).reshape(batch, -1)[:, :length]


def block_causal_mask_mod(
    seq_len: int, block_size: int, doc_ids: torch.Tensor | None = None
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` equal to ``denoiser_attention_mask``.

    ``kv_idx`` indexes the concatenation ``[context keys ; denoiser keys]`` of length ``2L``;
    ``doc_ids [B, L]`` come from the clean row (see the module docstring).
    """

    def mask_mod(b, h, q_idx, kv_idx):
        is_context = kv_idx < seq_len
        k_pos = torch.where(is_context, kv_idx, kv_idx - seq_len)
        q_blk = q_idx // block_size
        k_blk = k_pos // block_size
        context_ok = k_blk < q_blk
        if doc_ids is not None:
            # the block's one document (its first position's) against the clean key's
            context_ok = context_ok & (doc_ids[b, q_blk * block_size] == doc_ids[b, k_pos])
        return torch.where(is_context, context_ok, k_blk == q_blk)

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

    Without documents: ``[1, 1, L, 2L]``; with ``doc_ids [B, L]`` (clean row): ``[B, 1, L, 2L]``,
    where block n's queries see only the context keys of the document open at the block's
    start, and all of their own block (no split at a boundary inside it).
    """
    mask = block_causal_mask(seq_len, block_size, device=device)[None, None]
    if doc_ids is not None:
        docs = doc_ids.to(device) if device is not None else doc_ids
        block_docs = block_document_ids(docs, block_size)
        mask = mask & same_doc_mask(block_docs, torch.cat([docs, block_docs], dim=1))
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
