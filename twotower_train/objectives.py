"""Training objectives as thin modules around a model: forward(batch) -> metrics.

The engine wraps one of these, so DeepSpeed sees a module whose forward returns
the loss; the model code itself knows nothing about objectives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalLMObjective(nn.Module):
    """Next-token cross-entropy, for pretraining or fine-tuning an AR backbone."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """input_ids [B, L] -> {"loss": mean next-token CE over B x (L-1) positions}."""
        logits = self.model(input_ids=input_ids).logits  # [B, L, V]
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="mean"
        )
        return {"loss": loss}

    def hf_model(self) -> nn.Module:
        return self.model
