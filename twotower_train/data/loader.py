"""The training loader: what the loop asks for each micro step, and what a
checkpoint stores to continue exactly where it stopped.

Every batch is a dict of tensors on CPU:
    input_ids  [b, L] long   packed tokens (EOS between documents)
    loss_mask  [b, L] bool   positions that carry loss (False: prompt tokens)
    doc_ids    [b, L] long   document index within the row (for document masking)

One global stream of rows, the same for any number of ranks: row g comes from the source
the mixture schedule picks (`MixtureSchedule`), as that source's next row. Micro step at
global row P hands rank r the rows P + r*b .. P + (r+1)*b - 1, so ranks never overlap and
leave no gap, and the state (P and the rows drawn per source) is identical on every rank.

- map-style (`data.streaming=false`): each source is tokenised once into a cache; its
  k-th row is row perm_epoch(k mod N) of the cache, a pure function of (seed, k).
- streaming: each source is read, shuffled by window and packed as training goes
  (`streaming.StreamingRows`); every rank reads the whole stream and keeps its rows.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from twotower_train.config import DataConfig
from twotower_train.data.documents import BadDocuments, DataError
from twotower_train.data.packing import IndexPermutation, MixtureSchedule, rows_to_batch
from twotower_train.data.sources import (
    SourceSpec,
    TokenCache,
    load_cache,
    resolve_sources,
    split_by_weight,
)
from twotower_train.data.streaming import StreamingRows, read_held_out
from twotower_train.data.tokens import DocumentTokenizer, TokenChunk, tokenize_documents

STATE_VERSION = 1


class CachedRows:
    """Training rows of one cached source: row k is a pure function of (seed, k)."""

    def __init__(
        self,
        cache: TokenCache,
        base: int,
        seq_len: int,
        seed: int,
        index: int,
        label: str,
        log: Callable[[str], None],
    ) -> None:
        self.cache = cache
        self.base = base
        self.seq_len = seq_len
        self.seed = seed
        self.index = index
        self.label = label
        self.log = log
        self.num_rows = (len(cache.tokens) - base) // seq_len
        self._perm: tuple[int, IndexPermutation] | None = None

    def skip(self, k: int) -> None:
        """Another rank's row k: nothing to read, but say when an epoch begins."""
        if k and k % self.num_rows == 0:
            self.log(
                f"{self.label}: all {self.num_rows:,} rows seen, epoch {k // self.num_rows} begins"
            )

    def rows(self, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows ks (tokens, flags) [len(ks), L]."""
        for k in ks.tolist():
            self.skip(k)
        epochs, slots = np.divmod(ks, self.num_rows)
        index = np.empty_like(ks)
        for epoch in np.unique(epochs).tolist():
            if self._perm is None or self._perm[0] != epoch:
                perm = IndexPermutation(self.num_rows, self.seed, "rows", self.index, epoch)
                self._perm = (epoch, perm)
            index[epochs == epoch] = self._perm[1](slots[epochs == epoch])
        starts = (self.base + index * self.seq_len).tolist()
        L = self.seq_len
        tokens = np.stack([self.cache.tokens[a : a + L] for a in starts])
        flags = np.stack([self.cache.flags[a : a + L] for a in starts])
        return tokens, flags

    def state_dict(self) -> None:
        return None  # the position alone determines everything

    def load_state_dict(self, state: None) -> None:
        pass


@dataclass
class SourceInfo:
    label: str
    weight: float
    held_out_rows: int


class Loader:
    """Deterministic, resumable, rank-sharded batches of packed rows (see module doc)."""

    def __init__(
        self,
        sources: list[CachedRows | StreamingRows],
        info: list[SourceInfo],
        val_tokens: np.ndarray,
        val_flags: np.ndarray,
        *,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        identity: dict[str, Any],
    ) -> None:
        self.sources = sources
        self.info = info
        self.val_tokens = val_tokens  # [V, L]
        self.val_flags = val_flags
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.identity = identity
        self.schedule = MixtureSchedule([i.weight for i in info])
        self.position = 0  # global rows consumed

    @property
    def samples_per_micro_step(self) -> int:
        return self.micro_batch_size * self.world_size

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's next micro batch: input_ids, loss_mask, doc_ids [b, L]."""
        b = self.micro_batch_size
        first = self.rank * b
        picks: list[tuple[int, int]] = []  # (source, its row index) of this rank's rows
        streamed: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for j in range(self.samples_per_micro_step):
            s = self.schedule.next()
            k = self.schedule.drawn[s] - 1
            if not first <= j < first + b:
                self.sources[s].skip(k)  # streaming: read past another rank's row
                continue
            if isinstance(self.sources[s], StreamingRows):
                streamed[len(picks)] = self.sources[s].row(k)
            picks.append((s, k))
        self.position += self.samples_per_micro_step
        tokens = np.empty((b, self.seq_len), np.int32)
        flags = np.empty((b, self.seq_len), np.uint8)
        for i, row in streamed.items():
            tokens[i], flags[i] = row
        for s in sorted({s for s, _ in picks} - {picks[i][0] for i in streamed}):
            where = [i for i, (src, _) in enumerate(picks) if src == s]
            ks = np.array([picks[i][1] for i in where], dtype=np.int64)
            tokens[where], flags[where] = self.sources[s].rows(ks)
        return rows_to_batch(tokens, flags)

    @property
    def seq_len(self) -> int:
        return self.val_tokens.shape[1]

    def validation_batches(self, max_rows: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """This rank's share of the first `max_rows` held-out rows; equal count on every rank."""
        per_rank = min(len(self.val_tokens), max_rows) // self.world_size
        lo, hi = self.rank * per_rank, (self.rank + 1) * per_rank
        tokens, flags = self.val_tokens[lo:hi], self.val_flags[lo:hi]
        return [
            rows_to_batch(tokens[i : i + batch_size], flags[i : i + batch_size])
            for i in range(0, per_rank, batch_size)
        ]

    # -- checkpoint ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable; identical on every rank."""
        return {
            "version": STATE_VERSION,
            "position": self.position,
            "drawn": list(self.schedule.drawn),
            "identity": self.identity,
            "sources": [s.state_dict() for s in self.sources],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(
                f"data loader state version {state.get('version')} is not {STATE_VERSION}"
            )
        then, now = state["identity"], self.identity
        changed = [k for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]
        if changed:
            raise DataError(
                f"the data changed since the checkpoint ({', '.join(changed)} differ): resume with "
                "the same data config, seed and files, or start a new run.dir"
            )
        self.position = state["position"]
        self.schedule.drawn = list(state["drawn"])
        for source, s in zip(self.sources, state["sources"]):
            source.load_state_dict(s)


# ---------------------------------------------------------------------------------------
# Building it.
# ---------------------------------------------------------------------------------------


def _rows_of(chunk_tokens: np.ndarray, chunk_flags: np.ndarray, rows: int, seq_len: int):
    n = rows * seq_len
    return chunk_tokens[:n].reshape(rows, seq_len), chunk_flags[:n].reshape(rows, seq_len)


def _held_out_end(flags: np.ndarray, n_tokens: int) -> int:
    """Index just past the first document that ends at or after `n_tokens` tokens."""
    lo = max(n_tokens - 1, 0)
    step = 1 << 16
    while lo < len(flags):
        ends = np.flatnonzero(np.asarray(flags[lo : lo + step]) & 1)
        if len(ends):
            return lo + int(ends[0]) + 1
        lo += step
    return len(flags)


def _interleave(parts: list[tuple[np.ndarray, np.ndarray]], seq_len: int):
    """Held-out rows of all sources, interleaved in proportion to their counts."""
    counts = [len(t) for t, _ in parts]
    total = sum(counts)
    tokens = np.empty((total, seq_len), np.int32)
    flags = np.empty((total, seq_len), np.uint8)
    if total == 0:
        return tokens, flags
    nonzero = [i for i, c in enumerate(counts) if c]
    schedule = MixtureSchedule([counts[i] for i in nonzero])
    for g in range(total):
        s = nonzero[schedule.next()]
        k = schedule.drawn[nonzero.index(s)] - 1
        tokens[g], flags[g] = parts[s][0][k], parts[s][1][k]
    return tokens, flags


def _describe_source(spec: SourceSpec, reader) -> list:
    """What identifies a source's content across machines (names and sizes, not mtimes)."""
    src = spec.cfg
    fields = [
        src.kind.value,
        src.field,
        src.prompt_field,
        src.completion_field,
        src.text_unit.value,
    ]
    files = getattr(reader, "files", None)
    if files is not None:
        return fields + [[f.name, f.stat().st_size] for f in files]
    return fields + [src.path, src.name, src.split, src.revision]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class _Build:
    """What every source needs while the loader is built."""

    cfg: DataConfig
    tok: DocumentTokenizer
    seed: int
    block_size: int | None
    builder: bool  # tokenises map-style caches (local rank 0)
    log: Callable[[str], None]

    @property
    def seq_len(self) -> int:
        return self.cfg.seq_len


Rows = tuple[np.ndarray, np.ndarray]  # (tokens, flags) [n, L]


def _shipped_held_out(spec: SourceSpec, v: int, b: _Build) -> Rows:
    """The first v rows of a source's own held-out documents (the tiny world's test split)."""
    L = b.seq_len
    bad = BadDocuments(b.cfg.on_bad_document, f"{spec.label} held-out", b.log)
    docs = list(spec.open_val_reader().documents())
    chunk = tokenize_documents(docs, b.tok, b.cfg.min_doc_tokens, bad)
    if len(chunk.tokens) < v * L:
        raise DataError(
            f"{spec.label}: its held-out documents fill {len(chunk.tokens) // L} rows of {L}, "
            f"{v} wanted (lower data.val_sequences)"
        )
    return _rows_of(chunk.tokens, chunk.flags, v, L)


def _streaming_source(spec, reader, bad, v: int, b: _Build) -> tuple[StreamingRows, Rows, list]:
    L, start = b.seq_len, None
    if spec.open_val_reader is not None:
        val = _shipped_held_out(spec, v, b)
    else:
        chunk, start = TokenChunk.empty(), None
        if v:
            chunk, start = read_held_out(reader, bad, b.tok, b.cfg.min_doc_tokens, v * L)
        if v and start is None:
            raise DataError(
                f"{spec.label}: the whole source ({len(chunk.tokens):,} tokens) is smaller than "
                f"its {v} held-out rows of {L} plus training (lower data.val_sequences)"
            )
        val = _rows_of(chunk.tokens, chunk.flags, v, L)
    rows = StreamingRows(
        reader=reader,
        bad=bad,
        tok=b.tok,
        label=spec.label,
        index=spec.index,
        seq_len=L,
        seed=b.seed,
        window=b.cfg.shuffle_window,
        min_tokens=b.cfg.min_doc_tokens,
        start=start,
        log=b.log,
    )
    b.log(
        f"{spec.label}: streaming, weight {spec.weight:g}, {v} held-out rows, documents "
        f"shuffled in windows of {b.cfg.shuffle_window:,}"
    )
    return rows, val, ["held_out_cursor", start]


def _cached_source(spec, reader, bad, v: int, b: _Build) -> tuple[CachedRows, Rows, list]:
    L = b.seq_len
    cache = load_cache(
        spec, reader, bad, b.tok, b.cfg, part="train", builder=b.builder, progress=b.builder,
        log=b.log,
    )  # fmt: skip
    base = 0
    if spec.open_val_reader is not None:
        val = _shipped_held_out(spec, v, b)
    else:  # hold out the first documents, up to the end of the one that fills v rows
        base = _held_out_end(cache.flags, v * L) if v else 0
        if v and base < v * L:
            raise DataError(
                f"{spec.label}: the whole source ({len(cache.tokens):,} tokens) is smaller than "
                f"its {v} held-out rows of {L} (lower data.val_sequences)"
            )
        val = _rows_of(cache.tokens, cache.flags, v, L)
    rows = CachedRows(cache, base, L, b.seed, spec.index, spec.label, b.log)
    if rows.num_rows == 0:
        raise DataError(
            f"{spec.label}: {len(cache.tokens) - base:,} training tokens, fewer than one row of "
            f"data.seq_len={L}"
        )
    _log_cache_stats(b.log, spec, cache, rows, v, b.block_size, L)
    return rows, val, ["rows", rows.num_rows, len(cache.tokens)]


def _silent(msg: str) -> None:
    pass


def build_loader(
    cfg: DataConfig,
    tokenizer,
    *,
    seed: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    block_size: int | None = None,
    log: Callable[[str], None] | None = None,
) -> Loader:
    """The loader for `cfg` (see module doc). `block_size` (the denoiser's) is checked
    against `cfg.seq_len` and used to report documents shorter than one block. `log`
    receives one-line progress and statistics messages (None: silent)."""
    if log is None:
        log = _silent
    L = cfg.seq_len
    if block_size is not None and (block_size < 1 or L % block_size):
        raise DataError(f"data.seq_len={L} must be a multiple of denoiser.block_size={block_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    b = _Build(cfg, DocumentTokenizer(tokenizer), seed, block_size, local_rank == 0, log)
    specs = resolve_sources(cfg)
    val_share = split_by_weight(cfg.val_sequences, [s.weight for s in specs])
    sources: list[CachedRows | StreamingRows] = []
    val_parts: list[Rows] = []
    described = []
    for spec, v in zip(specs, val_share):
        bad = BadDocuments(cfg.on_bad_document, spec.label, log)
        reader = spec.open_reader(cfg.streaming, bad)
        build = _streaming_source if cfg.streaming else _cached_source
        rows, val, extra = build(spec, reader, bad, v, b)
        sources.append(rows)
        val_parts.append(val)
        described.append([*_describe_source(spec, reader), extra])
    val_tokens, val_flags = _interleave(val_parts, L)
    identity = {
        "seq_len": L,
        "seed": seed,
        "streaming": cfg.streaming,
        "shuffle_window": cfg.shuffle_window if cfg.streaming else None,
        "weights": [s.weight for s in specs],
        "val_sequences": cfg.val_sequences,
        "tokenizer": b.tok.vocab_fingerprint,
        "sources": _digest(described),
    }
    return Loader(
        sources,
        [SourceInfo(s.label, s.weight, v) for s, v in zip(specs, val_share)],
        np.ascontiguousarray(val_tokens),
        np.ascontiguousarray(val_flags),
        micro_batch_size=micro_batch_size,
        rank=rank,
        world_size=world_size,
        identity=identity,
    )


def _log_cache_stats(log, spec, cache: TokenCache, rows: CachedRows, v, block_size, L) -> None:
    meta = cache.meta
    tail = len(cache.tokens) - rows.base - rows.num_rows * L
    msg = (
        f"{spec.label}: weight {spec.weight:g}, {meta['documents']:,} documents, "
        f"{meta['tokens']:,} tokens -> {rows.num_rows:,} rows of {L} + {v} held out "
        f"({tail:,} tail tokens unused)"
    )
    short = cache.short_documents(block_size)
    if short:
        msg += f"; {short:,} documents shorter than one block ({block_size} tokens), packed with their neighbours"
    skipped = meta["skipped"]
    if skipped["counts"]:
        bad = BadDocuments(None, spec.label, lambda m: None)  # type: ignore[arg-type]
        bad.merge(skipped)
        msg += f"; skipped {bad.total:,} bad documents: {bad.summary()}"
    log(msg)
