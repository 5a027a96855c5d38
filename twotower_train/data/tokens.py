"""Tokenise documents with the backbone's tokenizer into one flat token stream.

A chunk of documents becomes two parallel arrays:
    tokens [T] int32   each document's tokens (prompt, then completion) and one EOS
    flags  [T] uint8   END on each document's EOS, PROMPT on prompt tokens
Packing cuts these into rows; `flags` gives the loss mask and document ids of a row.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

import numpy as np

from twotower_train.data.documents import BadDocuments, DataError, Document

END = 1  # the last token of a document (its EOS)
PROMPT = 2  # a prompt token: never masked, no loss
SHORT_HIST = 1024  # document lengths below this are histogrammed (short-document report)


class DocumentTokenizer:
    """The backbone's tokenizer, batched, no special tokens added; EOS closes a document."""

    def __init__(self, tokenizer) -> None:
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise DataError("the tokenizer has no EOS token to put between documents")
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            fast = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
            self._encode = lambda texts: [e.ids for e in fast(texts, add_special_tokens=False)]
            spec = backend.to_str()
        else:  # a slow (Python) tokenizer
            self._encode = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]
            spec = f"{type(tokenizer).__name__}:{sorted(tokenizer.get_vocab().items())}"
        # The cache key: exactly this tokenizer (any change re-tokenises).
        self.fingerprint = hashlib.sha256(f"{spec}|eos={self.eos_id}".encode()).hexdigest()[:16]
        # The resume check: the vocabulary and EOS, stable across library versions.
        vocab = sorted(tokenizer.get_vocab().items())
        self.vocab_fingerprint = hashlib.sha256(f"{vocab}|{self.eos_id}".encode()).hexdigest()[:16]

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self._encode(texts) if texts else []


@dataclass
class TokenChunk:
    tokens: np.ndarray  # [T] int32
    flags: np.ndarray  # [T] uint8 (END, PROMPT)
    doc_tokens: np.ndarray  # [D] int64: tokens per document, EOS excluded

    @property
    def num_docs(self) -> int:
        return len(self.doc_tokens)

    def take(self, order: np.ndarray) -> TokenChunk:
        """The same documents in `order` (a permutation of range(num_docs))."""
        lens = self.doc_tokens + 1
        starts = np.cumsum(lens) - lens
        new_lens = lens[order]
        # output position p of new document j reads input starts[order[j]] + (p - out_start[j])
        shift = starts[order] - (np.cumsum(new_lens) - new_lens)
        index = np.repeat(shift, new_lens) + np.arange(int(new_lens.sum()))
        return TokenChunk(self.tokens[index], self.flags[index], self.doc_tokens[order])

    @staticmethod
    def empty() -> TokenChunk:
        return TokenChunk(np.zeros(0, np.int32), np.zeros(0, np.uint8), np.zeros(0, np.int64))


def short_histogram(doc_tokens: np.ndarray) -> np.ndarray:
    """Counts of documents by length for lengths < SHORT_HIST ([SHORT_HIST] int64)."""
    small = doc_tokens[doc_tokens < SHORT_HIST]
    return np.bincount(small, minlength=SHORT_HIST).astype(np.int64)


def tokenize_documents(
    docs: list[Document], tok: DocumentTokenizer, min_tokens: int, bad: BadDocuments
) -> TokenChunk:
    """Tokenise `docs` (prompt + completion + EOS each); shorter than `min_tokens` is bad."""
    ids = tok.encode([d.text for d in docs])
    sft = any(d.prompt is not None for d in docs)
    prompt_ids = tok.encode([d.prompt or "" for d in docs]) if sft else None
    keep = list(range(len(docs)))
    if min_tokens > 0:
        keep = []
        for i, d in enumerate(docs):
            n = len(ids[i]) + (len(prompt_ids[i]) if sft else 0)
            if n < min_tokens:
                bad(d.where, "short", f"{n} tokens, fewer than data.min_doc_tokens={min_tokens}")
            else:
                keep.append(i)
    if not keep:
        return TokenChunk.empty()
    eos = tok.eos_id
    pieces: list[list[int]] = []
    completion_lens = np.empty(len(keep), np.int64)
    prompt_lens = np.zeros(len(keep), np.int64)
    for j, i in enumerate(keep):
        if sft:
            pieces.append(prompt_ids[i])
            prompt_lens[j] = len(prompt_ids[i])
        c = ids[i]
        c.append(eos)
        pieces.append(c)
        completion_lens[j] = len(c)
    doc_lens = prompt_lens + completion_lens
    total = int(doc_lens.sum())
    tokens = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int32, count=total)
    flags = np.zeros(total, np.uint8)
    if sft:
        runs = np.stack([prompt_lens, completion_lens], axis=1).reshape(-1)
        pattern = np.tile(np.array([PROMPT, 0], np.uint8), len(keep))
        flags = np.repeat(pattern, runs)
    flags[np.cumsum(doc_lens) - 1] |= END
    return TokenChunk(tokens, flags, doc_lens - 1)
