"""Configured sources -> document readers, and the map-style token cache.

`resolve_sources(cfg)` turns `data.source` / `data.sources` into `SourceSpec`s (paths
checked up front). Map-style mode tokenises each source once into
`<cache_dir>/tokens/<key>/{tokens.bin, flags.bin, meta.json}`, memory-mapped afterwards;
the key covers the files (path, size, mtime) or the dataset's fingerprint, the fields,
the tokenizer and the bad-document settings, so a changed input is tokenised again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twotower_train.config import DataConfig, DataSource, DataSourceConfig, SourceKind
from twotower_train.data.documents import (
    BadDocuments,
    DataError,
    Document,
    HubReader,
    JsonlReader,
    ListReader,
    ParquetReader,
    TextReader,
    resolve_files,
)
from twotower_train.data.tokens import (
    SHORT_HIST,
    DocumentTokenizer,
    short_histogram,
    tokenize_documents,
)
from twotower_train.errors import MissingFile

CACHE_VERSION = 1
TOKENIZE_BATCH = 1024  # documents per tokenizer call


def default_cache_dir() -> Path:
    return Path(os.environ.get("TWOTOWER_CACHE", Path.home() / ".cache" / "twotower_train"))


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()


@dataclass
class SourceSpec:
    """One configured source: how to open its reader, and its held-out documents if it
    ships them (the tiny world); otherwise validation rows are held out from its start."""

    index: int
    cfg: DataSourceConfig
    label: str
    weight: float
    open_reader: Callable[[bool, BadDocuments], Any]  # (streaming, bad) -> reader
    open_val_reader: Callable[[], Any] | None = None


def _tiny_world_spec(index: int, src: DataSourceConfig) -> SourceSpec:
    from twotower_train import tiny_world

    train_file = Path(tiny_world.CORPUS_DIR) / tiny_world.TRAIN_FILE
    if not train_file.is_file():
        raise MissingFile(
            f"tiny-world corpus {train_file} is missing; rebuild it with "
            f"`{tiny_world.BUILD_COMMAND}`"
        )

    def val_reader() -> ListReader:
        docs = []
        for ex in tiny_world.load_test_tasks():
            where = f"tiny_world test task {len(docs) + 1}"
            if src.prompt_field is not None:
                docs.append(Document(ex["answer"], ex["prompt"], where))
            else:
                docs.append(Document(ex["prompt"] + ex["answer"], None, where))
        if src.prompt_field is None:
            for i, text in enumerate(tiny_world.load_test_text()):
                docs.append(Document(text, None, f"tiny_world test paragraph {i + 1}"))
        return ListReader(docs)

    return SourceSpec(
        index,
        src,
        "tiny_world",
        src.weight,
        lambda streaming, bad: JsonlReader([train_file], src, bad),
        val_reader,
    )


def resolve_sources(cfg: DataConfig) -> list[SourceSpec]:
    """The configured sources, their local paths checked (FileNotFoundError if missing)."""
    if cfg.source == DataSource.tiny_world:
        return [_tiny_world_spec(0, DataSourceConfig(kind=SourceKind.tiny_world))]
    specs = []
    for i, src in enumerate(cfg.sources):
        label = f"data.sources[{i}] ({src.kind.value} {src.path})"
        if src.kind == SourceKind.tiny_world:
            specs.append(_tiny_world_spec(i, src))
            specs[-1].label = f"data.sources[{i}] (tiny_world)"
            continue
        if src.kind == SourceKind.hub:
            opener = lambda streaming, bad, src=src, label=label: HubReader(  # noqa: E731
                src, streaming, bad, label
            )
        else:
            files = resolve_files(src.path, src.kind, label)
            cls = {
                SourceKind.text: TextReader,
                SourceKind.jsonl: JsonlReader,
                SourceKind.parquet: ParquetReader,
            }[src.kind]
            opener = lambda streaming, bad, cls=cls, files=files, src=src: cls(  # noqa: E731
                files, src, bad
            )
        specs.append(SourceSpec(i, src, label, src.weight, opener))
    return specs


def split_by_weight(total: int, weights: list[float]) -> list[int]:
    """`total` split in proportion to `weights` (largest remainder; sums to `total`)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    out = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - out), kind="stable")[: total - int(out.sum())]:
        out[i] += 1
    return [int(x) for x in out]


# ---------------------------------------------------------------------------------------
# Map-style: tokenise once into a cache.
# ---------------------------------------------------------------------------------------


@dataclass
class TokenCache:
    """A source's tokens, memory-mapped: tokens [T] int32, flags [T] uint8, and stats."""

    path: Path
    tokens: np.ndarray
    flags: np.ndarray
    meta: dict[str, Any]

    @classmethod
    def open(cls, path: Path) -> TokenCache:
        meta = json.loads((path / "meta.json").read_text())
        n = meta["tokens"]
        tokens = np.memmap(path / "tokens.bin", dtype="<i4", mode="r", shape=(n,))
        flags = np.memmap(path / "flags.bin", dtype=np.uint8, mode="r", shape=(n,))
        return cls(path, tokens, flags, meta)

    def short_documents(self, block_size: int | None) -> int:
        if not block_size:
            return 0
        return int(sum(self.meta["short_hist"][: min(block_size, SHORT_HIST)]))


def cache_key(spec: SourceSpec, reader, tok: DocumentTokenizer, cfg: DataConfig, part: str) -> str:
    src = spec.cfg
    ident = {
        "version": CACHE_VERSION,
        "part": part,
        "kind": src.kind.value,
        "field": src.field,
        "prompt_field": src.prompt_field,
        "completion_field": src.completion_field,
        "text_unit": src.text_unit.value,
        "input": reader.fingerprint(),
        "tokenizer": tok.fingerprint,
        "min_doc_tokens": cfg.min_doc_tokens,
        "on_bad_document": cfg.on_bad_document.value,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def _batched(docs, n: int):
    it = iter(docs)
    while batch := list(itertools.islice(it, n)):
        yield batch


def build_cache(
    path: Path,
    reader,
    tok: DocumentTokenizer,
    cfg: DataConfig,
    bad: BadDocuments,
    label: str,
    progress: bool,
) -> TokenCache:
    """Tokenise every document of `reader` into `path` (written to a temp folder, renamed)."""
    from tqdm import tqdm

    tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n_docs, n_tokens = 0, 0
    hist = np.zeros(SHORT_HIST, np.int64)
    bar = tqdm(
        total=reader.total,
        unit=reader.unit,
        unit_scale=True,
        desc=f"tokenising {label}",
        disable=not progress,
        mininterval=1.0,
        dynamic_ncols=True,
    )
    try:
        with open(tmp / "tokens.bin", "wb") as ft, open(tmp / "flags.bin", "wb") as ff:
            for docs in _batched(reader.documents(), TOKENIZE_BATCH):
                chunk = tokenize_documents(docs, tok, cfg.min_doc_tokens, bad)
                ft.write(chunk.tokens.astype("<i4", copy=False).tobytes())
                ff.write(chunk.flags.tobytes())
                n_docs += chunk.num_docs
                n_tokens += len(chunk.tokens)
                hist += short_histogram(chunk.doc_tokens)
                bar.update(reader.progress() - bar.n)
                bar.set_postfix_str(f"{n_docs:,} docs, {n_tokens:,} tokens", refresh=False)
        bar.close()
        if n_docs == 0:
            raise DataError(empty_message(label, bad))
        meta = {
            "label": label,
            "documents": n_docs,
            "tokens": n_tokens,
            "skipped": bad.state(),
            "short_hist": hist.tolist(),
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished the same cache first
            if not (path / "meta.json").is_file():
                raise
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return TokenCache.open(path)


def empty_message(label: str, bad: BadDocuments) -> str:
    if bad.total:
        return f"{label}: no documents left after skipping {bad.total:,} bad ones: {bad.summary()}"
    return f"{label}: no documents"


def load_cache(
    spec: SourceSpec,
    reader,
    bad: BadDocuments,
    tok: DocumentTokenizer,
    cfg: DataConfig,
    *,
    part: str,
    builder: bool,
    progress: bool,
    log: Callable[[str], None],
) -> TokenCache:
    """The source's token cache: open it, build it (`builder`), or wait for the builder."""
    import torch.distributed as dist

    path = cache_root(cfg) / "tokens" / cache_key(spec, reader, tok, cfg, part)
    label = spec.label if part == "train" else f"{spec.label} held-out"
    if (path / "meta.json").is_file():
        return TokenCache.open(path)
    if builder or not (dist.is_available() and dist.is_initialized()):
        t0 = time.perf_counter()
        cache = build_cache(path, reader, tok, cfg, bad, label, progress)
        rate = cache.meta["tokens"] / max(time.perf_counter() - t0, 1e-9)
        log(
            f"{label}: tokenised {cache.meta['documents']:,} documents into {path} ({rate:,.0f} tokens/s)"
        )
        return cache
    waited = 0.0
    while not (path / "meta.json").is_file():  # local rank 0 is tokenising it
        time.sleep(1.0)
        waited += 1.0
        if waited % 300 == 0:
            log(f"{label}: still waiting for local rank 0 to tokenise into {path}")
    return TokenCache.open(path)
