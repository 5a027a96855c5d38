"""The LM head, applied to the rows that are read and no others.

At real vocabularies the logits are most of a training step's memory: ``[B, L, V]`` fp32 is
0.2 GB at SmolLM2-135M's shape (4 x 256, V 49,152) and 8.6 GB at Gemma-3-270m's (4 x 2048,
V 262,144), per tower, before a loss makes its own copy. So the towers hand out their final
hidden states; ``lm_logits`` is a family's head (its logit multiplier or softcap included)
on whatever rows a caller picks, and ``chunked_sums`` reduces a loss over many rows a chunk
at a time, recomputing each chunk's logits in the backward instead of keeping them.

``check_backbone`` (``registry.py``) compares ``lm_logits(decoder_hidden(...))`` with the HF
model's own forward on every backbone it accepts, so a family whose head does something
this file does not reproduce is refused at construction, not trained wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# One chunk's fp32 logits at most this many elements (256 MiB) unless told otherwise. Every
# chunk's backward reads the head and makes a whole [V, H] gradient of it, so a chunk must
# be wide enough for its logits to outweigh that (a 64-row chunk at V 262,144 does not);
# 256 MiB keeps a step of a few hundred scored rows in one chunk and still bounds the
# logits of a real batch (4 x 2048 rows at V 262,144: 8 GiB in one piece).
DEFAULT_CHUNK_ELEMENTS = 64 * 2**20


def decoder_hidden(
    model: nn.Module, ids: torch.Tensor, positions: torch.Tensor | None
) -> torch.Tensor:
    """An HF causal LM's final hidden states ``[B, T, H]`` (after its last norm), without
    the LM head: the same call its own ``forward`` makes before the head."""
    out = model.get_decoder()(input_ids=ids, position_ids=positions, use_cache=False)
    return out[0]


def head_vocab(model: nn.Module) -> int:
    """Rows of ``model``'s LM head (its logits' width), also under ZeRO-3 partitioning."""
    weight = model.get_output_embeddings().weight
    return getattr(weight, "ds_shape", weight.shape)[0]


def lm_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``model``'s LM head on ``hidden [..., H]``: fp32 logits ``[..., V]``, with the
    family's output multiplier (Cohere's ``logit_scale``, Granite's ``logits_scaling``) or
    final softcap (Gemma 2/3) applied in the model's dtype, as its forward does."""
    head = model.get_output_embeddings()
    logits = head(hidden)
    config = model.config
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, (int, float)):
        logits = logits * scale
    divisor = getattr(config, "logits_scaling", None)
    if divisor is not None:
        logits = logits / divisor
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


@dataclass
class Rows:
    """Rows whose logits a loss reads: ``head(hidden)`` with ``hidden [n, H]``."""

    hidden: torch.Tensor
    head: Callable[[torch.Tensor], torch.Tensor]

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def logits(self, index: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        return self.head(self.hidden[index])


def chunk_rows(vocab: int, chunk: int = 0) -> int:
    """Rows per chunk: ``chunk`` if set, else as many as keep one chunk's fp32 logits
    within ``DEFAULT_CHUNK_ELEMENTS``."""
    return chunk if chunk > 0 else max(1, DEFAULT_CHUNK_ELEMENTS // max(vocab, 1))


def chunked_sums(
    fn: Callable[..., tuple[torch.Tensor, ...]], n: int, chunk: int, *row_tensors: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """``sum over chunks of fn(start, stop, *[t[start:stop] for t in row_tensors])``.

    ``fn`` returns a tuple of scalars (the chunk's sums). With more than one chunk and
    autograd on, each chunk runs under non-reentrant activation checkpointing: its logits
    exist only while the chunk is computed, forward and again in the backward, so no more
    than one chunk's ``[chunk, V]`` is ever alive. One chunk runs as a plain call."""
    recompute = n > chunk and torch.is_grad_enabled()
    totals = None
    for start in range(0, n, chunk) if n else [0]:
        stop = min(start + chunk, n)
        args = (start, stop, *(t[start:stop] for t in row_tensors))
        totals = add_sums(
            totals, checkpoint(fn, *args, use_reentrant=False) if recompute else fn(*args)
        )
    return totals


def add_sums(
    totals: tuple[torch.Tensor, ...] | None, part: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, ...]:
    """``totals + part`` element by element (``part`` itself when there are no totals yet)."""
    return part if totals is None else tuple(a + b for a, b in zip(totals, part))
