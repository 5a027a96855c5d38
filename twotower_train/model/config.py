"""``TwoTowerConfig``: the one settings object of a two-tower model.

The same dataclass, with the same field names, is

* the ``denoiser:`` section of the run config (``twotower_train/config.py`` embeds it);
* what ``TwoTowerModel.from_backbone(backbone, config, **overrides)`` builds from;
* ``model.config`` on a built model;
* the ``config.json`` of a release (``to_dict`` / ``from_dict``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum

import torch


class DType(str, Enum):
    bf16 = "bf16"
    fp32 = "fp32"

    @property
    def torch(self) -> torch.dtype:
        return torch.bfloat16 if self is DType.bf16 else torch.float32


class AttnImpl(str, Enum):
    sdpa = "sdpa"  # scaled_dot_product_attention with a boolean mask
    flex = "flex"  # FlexAttention (compiled on CUDA)


@dataclass
class TwoTowerConfig:
    block_size: int = 16
    # The [MASK] token id; null = the tokenizer's mask token (resolved when the model is built).
    mask_token_id: int | None = None
    layers: int | None = None  # denoiser layers: null = all backbone layers; k = the top k
    tie_head: bool = False  # tie the denoiser's LM head to its embedding
    mamba_bidirectional: bool = False  # hybrid backbones: add a right-to-left Mamba pass
    # adaLN-single on each block's mask rate m(t) (the fraction masked; decoding passes the
    # observed fraction, so any noise schedule decodes right)
    time_conditioning: bool = False
    attn_impl: AttnImpl = AttnImpl.sdpa
    # Read position p's prediction from output p-1 (the backbone's next-token habit);
    # a block's first position takes the context tower's prediction.
    shift_logits: bool = True
    # Context-tower weights dtype (null = as the model is held).
    context_dtype: DType | None = None

    def __post_init__(self) -> None:
        self.attn_impl = AttnImpl(self.attn_impl)
        if self.context_dtype is not None:
            self.context_dtype = DType(self.context_dtype)

    def validate(self) -> None:
        """Value checks (the model builder calls them; the run config at compose time)."""
        if self.block_size < 1:
            raise ValueError(f"denoiser.block_size must be >= 1, got {self.block_size}")
        if self.layers is not None and self.layers < 1:
            raise ValueError(f"denoiser.layers must be >= 1 or null, got {self.layers}")

    def replace(self, **changes) -> TwoTowerConfig:
        """A copy with ``changes`` (field names only)."""
        _check_names(changes, TypeError)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-ready (enums as their values)."""
        out = dataclasses.asdict(self)
        out["attn_impl"] = self.attn_impl.value
        out["context_dtype"] = self.context_dtype.value if self.context_dtype else None
        return out

    @classmethod
    def from_dict(cls, values: dict) -> TwoTowerConfig:
        """Inverse of ``to_dict``; an unknown key is an error (a newer or foreign file)."""
        _check_names(values, ValueError)
        return cls(**values)


def _check_names(values: dict, error: type[Exception]) -> None:
    unknown = set(values) - {f.name for f in dataclasses.fields(TwoTowerConfig)}
    if unknown:
        raise error(f"unknown two-tower setting(s) {sorted(unknown)}")
