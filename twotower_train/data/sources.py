"""Training data: documents from a source, tokenised and packed (cached on disk)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from twotower_train.config import DataConfig
from twotower_train.data.packing import pack_documents


@dataclass
class TokenData:
    train: np.ndarray  # [N, seq_len] int32
    val: np.ndarray  # [M, seq_len] int32 (may be empty)
    dropped_tail_tokens: int


def cache_dir() -> Path:
    return Path(os.environ.get("TWOTOWER_CACHE", Path.home() / ".cache" / "twotower_train"))


def _tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(texts), 8192):
        out.extend(tokenizer(texts[i : i + 8192], add_special_tokens=False)["input_ids"])
    return out


def tiny_world_documents() -> tuple[list[str], list[str]]:
    """(train documents, held-out documents) of the shipped tiny world."""
    from twotower_train.data import tiny_world

    held_out = [ex["prompt"] + ex["answer"] for ex in tiny_world.load_test_tasks()]
    held_out += tiny_world.load_test_text()
    return tiny_world.load_train_documents(), held_out


def build_token_data(cfg: DataConfig, tokenizer, *, is_main: bool = True) -> TokenData:
    if cfg.source != "tiny_world":
        raise ValueError(f"data.source '{cfg.source}' is not supported (use 'tiny_world')")
    key = json.dumps(
        {"source": cfg.source, "seq_len": cfg.seq_len, "tok": _tokenizer_fingerprint(tokenizer)},
        sort_keys=True,
    )
    path = cache_dir() / f"packed_{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"
    if path.is_file():
        with np.load(path) as z:
            return TokenData(z["train"], z["val"], int(z["dropped"]))
    train_docs, val_docs = tiny_world_documents()
    eos = tokenizer.eos_token_id
    train, dropped = pack_documents(_tokenize(tokenizer, train_docs), eos, cfg.seq_len)
    val, _ = pack_documents(_tokenize(tokenizer, val_docs), eos, cfg.seq_len)
    if is_main:  # other ranks tokenise themselves rather than race on the file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, train=train, val=val, dropped=dropped)
        os.replace(tmp, path)
    return TokenData(train, val, dropped)
