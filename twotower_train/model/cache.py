"""What flows from the context tower to the denoiser.

* ``ContextCache`` -- the context tower's incremental state after ``length`` clean tokens:
  per attention layer the K/V of every token, per Mamba layer the conv and SSM state at the
  end. Decoding extends it one chunk at a time (``TwoTowerModel.context_extend``).
* ``ContextOutputs`` -- one training pass of the context tower over a whole sequence: its
  logits, the full cache, and for Mamba layers the conv/SSM state at EVERY block boundary.
* ``DenoiserContext`` -- what one denoiser forward reads, built from either of the above:
  context K/V + the mask over ``[context keys ; own keys]``, and per-block initial Mamba
  states. The denoiser code is the same for the one-pass forward and a single block.

All dicts are keyed by *backbone* layer index (denoiser layer i reads backbone layer
``layer_ids[i]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ContextCache:
    """``keys/values[l] [B, Hkv, S, d]`` (after RoPE), ``conv[l] [B, K-1, C]`` (pre-conv rows),
    ``ssm[l] [B, H, P, N]`` (fp32), after ``length = S`` tokens. An empty cache = no prefix."""

    length: int = 0
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    conv: dict[int, torch.Tensor] = field(default_factory=dict)
    ssm: dict[int, torch.Tensor] = field(default_factory=dict)
    # The context tower's logits at the last cached position ``[B, V]``: its prediction of
    # the next token, which a shifted denoiser uses for the first position of a block.
    last_logits: torch.Tensor | None = None

    def truncate(self, length: int, last_logits: torch.Tensor) -> ContextCache:
        """The cache of the first ``length`` tokens, attention-only caches (K/V are cut; Mamba
        states cannot be and must be recomputed). ``last_logits [B, V]``: the logits at
        position ``length - 1``."""
        if self.conv or self.ssm:
            raise ValueError("a cache with Mamba states cannot be truncated; recompute it")
        if not 0 < length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")

        def cut(d: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
            return {k: v[:, :, :length] for k, v in d.items()}

        return ContextCache(length, cut(self.keys), cut(self.values), last_logits=last_logits)

    def select(self, index: torch.Tensor) -> ContextCache:
        """The cache of a subset / reordering of the batch (``index [B']``)."""

        def pick(d: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
            return {k: v.index_select(0, index.to(v.device)) for k, v in d.items()}

        last = None if self.last_logits is None else self.last_logits.index_select(0, index)
        return ContextCache(
            self.length, pick(self.keys), pick(self.values), pick(self.conv), pick(self.ssm), last
        )


@dataclass
class ContextOutputs:
    """One-pass context tower output over ``L = nb * bs`` clean tokens.

    ``conv_windows[l] [B, nb, K-1, C]`` and ``ssm_init[l] [B, nb, H, P, N]``: the Mamba
    conv/SSM state at the START of each block (= end of block n-1; zeros for block 0).
    """

    logits: torch.Tensor | None  # [B, L, V] fp32; None when only ``hidden`` was asked for
    cache: ContextCache
    conv_windows: dict[int, torch.Tensor] = field(default_factory=dict)
    ssm_init: dict[int, torch.Tensor] = field(default_factory=dict)
    hidden: torch.Tensor | None = None  # [B, L, H] final hidden states (before the LM head)


@dataclass
class DenoiserContext:
    """Inputs of one denoiser forward over ``T = nb * bs`` noisy tokens.

    ``attn_mask``: over ``[S context keys ; T own keys]`` -- None (see everything: one block
    after its prefix), a bool tensor ``[B|1, 1, T, S+T]`` or a FlexAttention ``BlockMask``.
    ``docs [B, nb, K-1+bs]``: document ids of each block's conv window + tokens (-1 = none),
    for the Mamba layers; None without documents. ``mask_mod``: the FlexAttention predicate
    ``attn_mask`` was built from (to narrow it to a layer's sliding window).
    """

    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    attn_mask: object
    conv_windows: dict[int, torch.Tensor]
    ssm_init: dict[int, torch.Tensor]
    docs: torch.Tensor | None = None
    mask_mod: object = None

    @classmethod
    def from_cache(cls, cache: ContextCache) -> DenoiserContext:
        """One block right after the cached prefix: it sees all cached keys."""
        return cls(
            keys=cache.keys,
            values=cache.values,
            attn_mask=None,
            conv_windows={k: v[:, None] for k, v in cache.conv.items()},
            ssm_init={k: v[:, None] for k, v in cache.ssm.items()},
        )
