"""An added ``[MASK]`` for backbones whose vocabulary has none.

The denoiser reads masked positions as a ``[MASK]`` token. When the tokenizer has no mask
token, the framework adds one with the first id past the backbone's embedding matrix
(``mask_id == vocab``) and the denoiser's token embedding gets one trained row for it:
``AddedMaskEmbedding`` wraps the copied embedding without changing the copied weight's
name or its tie to the LM head (logits stay ``[..., vocab]``; the mask is never predicted).
The context tower reads only clean tokens and never sees the id.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import UnsupportedBackbone


class AddedMaskEmbedding(nn.Module):
    """``embed`` (an ``nn.Embedding``, optionally scaled as Gemma's) plus one row,
    ``mask_embedding [H]``, for ``mask_id == embed.num_embeddings``.

    ``weight`` is the wrapped embedding's own Parameter (a tied LM head stays tied; the state
    dict keeps its name). The new row starts at the mean embedding, the usual choice for an
    added token: it carries no token's meaning and sits where the model's inputs live."""

    def __init__(self, embed: nn.Module, mask_id: int) -> None:
        super().__init__()
        vocab, dim = embed.weight.shape
        if mask_id != vocab:
            raise ValueError(
                f"an added [MASK] takes id {vocab} (the vocabulary's size), not {mask_id}"
            )
        if hasattr(embed.weight, "ds_id"):
            raise UnsupportedBackbone(
                "an added [MASK] row is initialised from the whole embedding: build the model "
                "whole (deepspeed.zero_init=false)"
            )
        self.weight = embed.weight
        self.padding_idx = getattr(embed, "padding_idx", None)
        scale = getattr(embed, "embed_scale", None)
        self.scale = None if scale is None else float(scale)
        self.mask_id = mask_id
        self.num_embeddings = vocab + 1
        self.embedding_dim = dim
        with torch.no_grad():
            mean = embed.weight.detach().float().mean(0)
        self.mask_embedding = nn.Parameter(mean.to(embed.weight.dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [B, T]`` (``mask_id`` allowed) -> ``[B, T, H]``."""
        is_mask = ids == self.mask_id
        out = F.embedding(ids.masked_fill(is_mask, 0), self.weight, self.padding_idx)
        out = torch.where(is_mask[..., None], self.mask_embedding.to(out.dtype), out)
        if self.scale is not None:
            out = out * self.scale
        return out


def forbid_mask(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """A copy of ``logits [..., V]`` with the mask token made impossible, where ``V`` has a
    column for it (an added ``[MASK]`` has none: ``logits`` itself is returned)."""
    if mask_id >= logits.shape[-1]:
        return logits
    return logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), -torch.inf)
