"""The training loader: what the loop asks for each micro step, and what a
checkpoint stores to continue exactly where it stopped.

Every batch is a dict of tensors on CPU:
    input_ids  [b, L] long   packed tokens (EOS between documents)
    loss_mask  [b, L] bool   positions that carry loss (False: prompts, padding)
    doc_ids    [b, L] long   document index within the row (for document masking)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from twotower_train.config import DataConfig
from twotower_train.data.packing import BatchOrder
from twotower_train.data.sources import build_token_data


def doc_ids_from_eos(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[b, L] -> [b, L]: document index of each position; an EOS closes its document."""
    is_eos = (tokens == eos_id).long()
    return torch.cumsum(is_eos, dim=1) - is_eos


@dataclass
class PackedLoader:
    """Map-style loader over packed rows with a deterministic, resumable order."""

    train_rows: np.ndarray  # [N, L]
    val_rows: np.ndarray  # [M, L]
    order: BatchOrder
    eos_id: int
    position: int = 0  # global samples consumed

    def _batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.ascontiguousarray(rows)).long()
        return {
            "input_ids": ids,
            "loss_mask": torch.ones_like(ids, dtype=torch.bool),
            "doc_ids": doc_ids_from_eos(ids, self.eos_id),
        }

    def next_batch(self) -> dict[str, torch.Tensor]:
        rows = self.train_rows[self.order.indices(self.position)]
        self.position += self.order.samples_per_micro_step
        return self._batch(rows)

    def validation_batches(self, max_rows: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """This rank's share of the first `max_rows` held-out rows; equal count on every rank."""
        world, rank = self.order.world_size, self.order.rank
        per_rank = min(len(self.val_rows), max_rows) // world
        mine = self.val_rows[rank * per_rank : (rank + 1) * per_rank]
        return [self._batch(mine[i : i + batch_size]) for i in range(0, per_rank, batch_size)]

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "num_samples": len(self.train_rows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_samples"] != len(self.train_rows):
            raise ValueError(
                f"the data changed since the checkpoint: {state['num_samples']} packed "
                f"sequences then, {len(self.train_rows)} now"
            )
        self.position = state["position"]


def build_loader(
    cfg: DataConfig,
    tokenizer,
    *,
    seed: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
) -> PackedLoader:
    data = build_token_data(cfg, tokenizer, is_main=rank == 0)
    order = BatchOrder(len(data.train), seed, micro_batch_size, rank, world_size)
    return PackedLoader(data.train, data.val, order, tokenizer.eos_token_id)
