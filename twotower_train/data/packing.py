"""Packing tokens into rows of `seq_len`, the batch tensors of a row, and the
deterministic mixture of sources by weight.

Rows never pad: documents are concatenated (EOS after each) and cut every `seq_len`
tokens, so a document may continue in the next row. Each row carries `flags`
(tokens.END / tokens.PROMPT) from which the loss mask and document ids follow.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable

import numpy as np
import torch

from twotower_train.data.documents import DataError
from twotower_train.data.tokens import END, PROMPT, TokenChunk


def pack_documents(docs: Iterable[list[int]], eos_id: int, seq_len: int) -> tuple[np.ndarray, int]:
    """Concatenate token lists with EOS after each and cut into rows of `seq_len`.

    Returns (tokens [N, seq_len] int32, number of tail tokens dropped). For small
    in-memory sets (evaluation); training data goes through the loader.
    """
    flat: list[int] = []
    for ids in docs:
        flat.extend(ids)
        flat.append(eos_id)
    n = len(flat) // seq_len
    if n == 0:
        raise DataError(f"not enough tokens ({len(flat)}) for one sequence of {seq_len}")
    arr = np.asarray(flat[: n * seq_len], dtype=np.int32).reshape(n, seq_len)
    return arr, len(flat) - n * seq_len


def rows_to_batch(tokens: np.ndarray, flags: np.ndarray) -> dict[str, torch.Tensor]:
    """Rows `tokens/flags [b, L]` -> the loader's batch dict of CPU tensors:

    input_ids [b, L] long, loss_mask [b, L] bool (False on prompt tokens),
    doc_ids [b, L] long (document index within the row; an EOS closes its document)."""
    end = torch.from_numpy((flags & END).astype(np.int64))
    return {
        "input_ids": torch.from_numpy(tokens.astype(np.int64)),
        "loss_mask": torch.from_numpy((flags & PROMPT) == 0),
        "doc_ids": torch.cumsum(end, dim=1) - end,
    }


class Packer:
    """Streams chunks into full rows; the remainder carries over to the next chunk."""

    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len
        self.tokens = np.zeros(0, np.int32)
        self.flags = np.zeros(0, np.uint8)

    def add(self, chunk: TokenChunk) -> tuple[np.ndarray, np.ndarray]:
        """Append `chunk`; return the rows it completes (tokens, flags) [n, L]."""
        tokens = np.concatenate([self.tokens, chunk.tokens])
        flags = np.concatenate([self.flags, chunk.flags])
        n = len(tokens) // self.seq_len
        cut = n * self.seq_len
        self.tokens, self.flags = tokens[cut:].copy(), flags[cut:].copy()
        shape = (n, self.seq_len)
        return tokens[:cut].reshape(shape), flags[:cut].reshape(shape)

    def state_dict(self) -> dict[str, str]:
        return {"tokens": encode_array(self.tokens), "flags": encode_array(self.flags)}

    def load_state_dict(self, state: dict[str, str]) -> None:
        self.tokens = decode_array(state["tokens"], np.int32)
        self.flags = decode_array(state["flags"], np.uint8)


def encode_array(a: np.ndarray) -> str:
    """A small array as base64 text (JSON-serialisable checkpoint state)."""
    return base64.b64encode(
        np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()
    ).decode()


def decode_array(text: str, dtype) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.dtype(dtype).newbyteorder("<")).astype(
        dtype
    )


class MixtureSchedule:
    """Which source each successive row comes from: always the one furthest behind its
    weight (ties to the first), so after g rows source s has given round(w_s * g) +- 1.

    Deterministic and seed-free; `drawn` (rows taken per source) is the whole state."""

    def __init__(self, weights: list[float]) -> None:
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.drawn = [0] * len(weights)

    def next(self) -> int:
        if len(self.drawn) == 1:
            self.drawn[0] += 1
            return 0
        g = sum(self.drawn) + 1
        deficit = self.weights * g - np.asarray(self.drawn)
        s = int(np.argmax(deficit))
        self.drawn[s] += 1
        return s


def derive_seed(*parts: object) -> int:
    """A 64-bit key from (run seed, source, epoch, ...), stable across runs and platforms."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class IndexPermutation:
    """A seeded permutation of range(n) evaluated pointwise: `perm(i)` for any i, in O(1)
    memory (a 4-round Feistel network on the next even power of two, cycle-walking back
    into range). The training order is then a pure function of (seed, epoch, position)."""

    ROUNDS = 4

    def __init__(self, n: int, *seed_parts: object) -> None:
        if n < 1:
            raise ValueError(f"cannot permute {n} items")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits & 1
        self.half = np.uint64(bits // 2)
        self.mask = np.uint64((1 << (bits // 2)) - 1)
        self.keys = [np.uint64(derive_seed(*seed_parts, r)) for r in range(self.ROUNDS)]

    def __call__(self, index: np.ndarray | int) -> np.ndarray:
        x = np.atleast_1d(np.asarray(index, dtype=np.uint64)).copy()
        todo = np.ones(len(x), dtype=bool)
        while todo.any():
            v = x[todo]
            left, right = v >> self.half, v & self.mask
            for key in self.keys:
                left, right = right, left ^ (_mix64(right ^ key) & self.mask)
            v = (left << self.half) | right
            x[todo] = v
            todo[todo] = v >= np.uint64(self.n)
        return x.astype(np.int64)
