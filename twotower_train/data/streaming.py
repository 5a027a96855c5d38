"""Streaming mode: rows of one source, read and tokenised while training runs.

The source is read in windows of `data.shuffle_window` documents; each window's documents
are shuffled (seeded by run seed, source, epoch and window) and packed after the tokens the
previous window left over. A window is a pure function of where it starts, so the state is
small: the reader's cursor at the window start, the carried-over tokens, and how many of the
window's rows were taken. Resuming re-reads that one window and skips the rows taken. The
next window is read in a background thread while the current one is handed out.

At the end of the source the next epoch starts again after the held-out documents; the
leftover tokens carry on, so no token is dropped.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from twotower_train.data.documents import BadDocuments, DataError
from twotower_train.data.packing import IndexPermutation, Packer
from twotower_train.data.sources import empty_message
from twotower_train.data.tokens import DocumentTokenizer, TokenChunk, tokenize_documents


def concat_chunks(chunks: list[TokenChunk]) -> TokenChunk:
    if not chunks:
        return TokenChunk.empty()
    return TokenChunk(
        np.concatenate([c.tokens for c in chunks]),
        np.concatenate([c.flags for c in chunks]),
        np.concatenate([c.doc_tokens for c in chunks]),
    )


def read_held_out(
    reader, bad: BadDocuments, tok: DocumentTokenizer, min_tokens: int, n_tokens: int
) -> tuple[TokenChunk, list | None]:
    """The first documents of `reader`, in order, until they hold >= `n_tokens` tokens.

    Returns (their tokens, the cursor right after the last one); the cursor is None when the
    reader ran out first. One document per tokenizer call: the held-out part is small and
    the cursor must stop exactly after the last document used."""
    chunks, total = [], 0
    for doc in reader.documents():
        chunk = tokenize_documents([doc], tok, min_tokens, bad)
        if chunk.num_docs:
            chunks.append(chunk)
            total += len(chunk.tokens)
            if total >= n_tokens:
                return concat_chunks(chunks), reader.cursor()
    return concat_chunks(chunks), None


@dataclass
class Window:
    """One window: where it starts (the checkpointed part) and the rows it packs into."""

    epoch: int
    index: int
    cursor: list | None  # reader cursor of its first document
    carry: dict[str, str]  # tokens left over by the previous window (Packer state)
    kept_before: int  # documents kept in this epoch before this window
    skipped: dict[str, Any]  # bad-document counts before this window
    tokens: np.ndarray  # [n, L] int32
    flags: np.ndarray  # [n, L] uint8
    kept: int  # documents kept in this window
    exhausted: bool  # the source ended inside this window
    next_cursor: list | None
    carry_after: dict[str, str]


class StreamingRows:
    """The k-th training row of one source, k = 0, 1, 2, ... (sequential access only).

    While the rows of one window are handed out, a background thread already reads,
    tokenises and packs the next one (the tokenizer releases the GIL), so training does not
    wait for it unless the loader is slower than training."""

    def __init__(
        self,
        *,
        reader,
        bad: BadDocuments,
        tok: DocumentTokenizer,
        label: str,
        index: int,
        seq_len: int,
        seed: int,
        window: int,
        min_tokens: int,
        start: list | None,
        log: Callable[[str], None],
    ) -> None:
        self.reader = reader
        self.bad = bad
        self.tok = tok
        self.label = label
        self.index = index
        self.seq_len = seq_len
        self.seed = seed
        self.window_size = window
        self.min_tokens = min_tokens
        self.start = start  # cursor of the first training document (after the held-out ones)
        self.log = log
        self.taken = 0  # rows of the current window handed out
        self.drawn = 0  # rows handed out in all
        self._it = None  # the document iterator, positioned after the last window read
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="twotower-data")
        empty = Packer(seq_len).state_dict()
        self._current: Window | None = None
        self._next: Future = self._pool.submit(self._read, 0, 0, start, empty, 0, None)

    @property
    def epoch(self) -> int:
        return self._window().epoch

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    # -- windows ---------------------------------------------------------------------------
    def _read(self, epoch, index, cursor, carry, kept_before, it) -> Window:
        """Read, shuffle and pack one window (runs in the prefetch thread)."""
        if it is None:
            it = self.reader.documents(cursor)
        self._it = it
        skipped = self.bad.state()
        docs = list(itertools.islice(it, self.window_size))
        exhausted = len(docs) < self.window_size
        next_cursor = None if exhausted else self.reader.cursor()
        chunk = tokenize_documents(docs, self.tok, self.min_tokens, self.bad)
        if chunk.num_docs > 1:
            perm = IndexPermutation(chunk.num_docs, self.seed, "window", self.index, epoch, index)
            chunk = chunk.take(perm(np.arange(chunk.num_docs)))
        packer = Packer(self.seq_len)
        packer.load_state_dict(carry)
        tokens, flags = packer.add(chunk)
        return Window(
            epoch, index, cursor, carry, kept_before, skipped, tokens, flags,
            chunk.num_docs, exhausted, next_cursor, packer.state_dict(),
        )  # fmt: skip

    def _following(self, w: Window) -> Future:
        """Start reading the window after `w` in the background."""
        if w.exhausted:  # the next epoch starts again after the held-out documents
            args = (w.epoch + 1, 0, self.start, w.carry_after, 0, None)
        else:
            args = (
                w.epoch,
                w.index + 1,
                w.next_cursor,
                w.carry_after,
                w.kept_before + w.kept,
                self._it,
            )
        return self._pool.submit(self._read, *args)

    def _window(self) -> Window:
        if self._current is None:
            self._current = self._next.result()
            self._next = self._following(self._current)
        return self._current

    def _advance(self) -> None:
        w = self._window()
        if w.exhausted:
            kept = w.kept_before + w.kept
            if kept == 0:
                raise DataError(empty_message(self.label, self.bad))
            summary = f", skipped {self.bad.summary()}" if self.bad.total else ""
            self.log(f"{self.label}: epoch {w.epoch} done ({kept:,} documents{summary})")
        self._current = self._next.result()
        self._next = self._following(self._current)
        self.taken = 0

    # -- rows ------------------------------------------------------------------------------
    def row(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Row k (tokens [L] int32, flags [L] uint8); k must be the next row."""
        if k != self.drawn:
            raise RuntimeError(f"{self.label}: rows are sequential (asked {k}, next {self.drawn})")
        while self.taken >= len(self._window().tokens):
            self._advance()
        w = self._current
        tokens, flags = w.tokens[self.taken], w.flags[self.taken]
        self.taken += 1
        self.drawn += 1
        return tokens, flags

    skip = row  # another rank's row: it still has to be read to know what follows

    # -- checkpoint ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        w = self._window()
        return {
            "epoch": w.epoch,
            "window": w.index,
            "cursor": w.cursor,
            "carry": w.carry,
            "kept_before": w.kept_before,
            "skipped": w.skipped,
            "taken": self.taken,
            "drawn": self.drawn,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):  # a read in flight owns the reader: let it end
            self._next.result()
        self.bad.counts, self.bad.first = {}, {}
        self.bad.merge(state["skipped"])
        args = (state["epoch"], state["window"], state["cursor"], state["carry"])
        self._current = self._read(*args, state["kept_before"], None)
        self._next = self._following(self._current)
        self.taken, self.drawn = state["taken"], state["drawn"]
        if self.taken > len(self._current.tokens):
            raise DataError(
                f"{self.label}: the data changed since the checkpoint (window {state['window']} of "
                f"epoch {state['epoch']} now has {len(self._current.tokens)} rows, "
                f"{self.taken} were taken)"
            )
