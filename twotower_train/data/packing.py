"""Pack tokenised documents into fixed-length training sequences, and a
deterministic, resumable, rank-sharded batch order over them.

The order is a pure function of (seed, sample position): global sample position
p lives in epoch p // N at slot p % N of that epoch's permutation. A resumed run
only needs the number of samples consumed, and ranks never overlap or leave gaps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch


def pack_documents(docs: Iterable[list[int]], eos_id: int, seq_len: int) -> tuple[np.ndarray, int]:
    """Concatenate documents with EOS after each and cut into rows of `seq_len`.

    Returns (tokens [N, seq_len] int32, number of tail tokens dropped).
    """
    flat: list[int] = []
    for ids in docs:
        flat.extend(ids)
        flat.append(eos_id)
    n = len(flat) // seq_len
    if n == 0:
        raise ValueError(f"not enough tokens ({len(flat)}) for one sequence of {seq_len}")
    arr = np.asarray(flat[: n * seq_len], dtype=np.int32).reshape(n, seq_len)
    return arr, len(flat) - n * seq_len


@dataclass
class BatchOrder:
    """Which sample rows make up each rank's micro batch, as a function of position."""

    num_samples: int
    seed: int
    micro_batch_size: int
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.num_samples, generator=g).numpy()}
        return self._perms[epoch]

    def indices(self, position: int) -> np.ndarray:
        """Rows of this rank's micro batch that starts at global sample `position`.

        One micro step consumes micro_batch_size x world_size samples globally.
        """
        start = position + self.rank * self.micro_batch_size
        out = np.empty(self.micro_batch_size, dtype=np.int64)
        for i in range(self.micro_batch_size):
            p = start + i
            out[i] = self._perm(p // self.num_samples)[p % self.num_samples]
        return out

    @property
    def samples_per_micro_step(self) -> int:
        return self.micro_batch_size * self.world_size
