"""The data pipeline: every source kind, mixtures, SFT masks, packing, determinism,
rank sharding and exact resume in both modes (map-style cache and streaming)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from twotower_train.config import (
    DataConfig,
    DataSource,
    DataSourceConfig,
    SourceKind,
    TextUnit,
)
from twotower_train.data.loader import build_loader
from twotower_train.data.packing import IndexPermutation, MixtureSchedule
from twotower_train.tiny_world import load_tokenizer

L = 16  # row length in these tests


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def make_docs(n: int, seed: int = 0, word: str = "cat") -> list[str]:
    rng = random.Random(seed)
    words = ["the", word, "sat", "on", "a", "mat", "and", "ran", "home", "fast"]
    return [f"doc {i}: " + " ".join(rng.choices(words, k=rng.randint(1, 12))) for i in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def data_cfg(tmp_path: Path, *sources: DataSourceConfig, **kw) -> DataConfig:
    kw.setdefault("seq_len", L)
    kw.setdefault("val_sequences", 0)
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return DataConfig(source=DataSource.mixture, sources=list(sources), **kw)


def jsonl_source(path: Path, **kw) -> DataSourceConfig:
    return DataSourceConfig(kind=SourceKind.jsonl, path=str(path), **kw)


def make_loader(cfg: DataConfig, tok, *, seed=0, mb=2, rank=0, world=1, log=None, block=None):
    return build_loader(
        cfg,
        tok,
        seed=seed,
        micro_batch_size=mb,
        rank=rank,
        world_size=world,
        block_size=block,
        log=log or (lambda msg: None),
    )


def reference_rows(tok, docs: list[str], seq_len: int = L) -> list[tuple[int, ...]]:
    """Independent packing: each document's tokens + EOS, concatenated, cut every seq_len."""
    flat: list[int] = []
    for d in docs:
        flat += tok.encode(d, add_special_tokens=False) + [tok.eos_token_id]
    n = len(flat) // seq_len
    return [tuple(flat[i * seq_len : (i + 1) * seq_len]) for i in range(n)]


def batches(loader, n: int) -> list[dict[str, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


def rows(bs: list[dict[str, torch.Tensor]], key: str = "input_ids") -> list[tuple[int, ...]]:
    return [tuple(r) for b in bs for r in b[key].tolist()]


# -- every source kind ---------------------------------------------------------------------


def _write_source(kind: str, tmp_path: Path, docs: list[str]) -> DataSourceConfig:
    if kind == "jsonl":
        return jsonl_source(write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs]))
    if kind == "jsonl.gz":
        return jsonl_source(write_jsonl(tmp_path / "d.jsonl.gz", [{"text": d} for d in docs]))
    if kind == "jsonl-folder":  # two shards in a folder, read in name order
        (tmp_path / "shards").mkdir()
        write_jsonl(tmp_path / "shards" / "a.jsonl", [{"text": d} for d in docs[:20]])
        write_jsonl(tmp_path / "shards" / "b.jsonl", [{"text": d} for d in docs[20:]])
        return jsonl_source(tmp_path / "shards")
    if kind == "text-line":
        (tmp_path / "d.txt").write_text("".join(d + "\n" for d in docs))
        return DataSourceConfig(
            kind=SourceKind.text, path=str(tmp_path / "d.txt"), text_unit=TextUnit.line
        )
    if kind == "text-paragraph":
        (tmp_path / "d.txt").write_text("\n\n".join(docs) + "\n")
        return DataSourceConfig(kind=SourceKind.text, path=str(tmp_path / "d.txt"))
    if kind == "text-file":
        (tmp_path / "t").mkdir()
        for i, d in enumerate(docs):
            (tmp_path / "t" / f"{i:03d}.txt").write_text(d + "\n")
        return DataSourceConfig(
            kind=SourceKind.text, path=str(tmp_path / "t" / "*.txt"), text_unit=TextUnit.file
        )
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"id": list(range(len(docs))), "body": docs})
        pq.write_table(table, tmp_path / "d.parquet", row_group_size=7)
        return DataSourceConfig(
            kind=SourceKind.parquet, path=str(tmp_path / "d.parquet"), field="body"
        )
    if kind == "hub":  # the hub code path on a local folder of jsonl (no network)
        (tmp_path / "hub").mkdir()
        write_jsonl(tmp_path / "hub" / "train.jsonl", [{"text": d} for d in docs])
        return DataSourceConfig(kind=SourceKind.hub, path=str(tmp_path / "hub"), split="train")
    if kind == "hub-saved":  # a dataset saved with save_to_disk
        import datasets

        datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
        return DataSourceConfig(kind=SourceKind.hub, path=str(tmp_path / "saved"))
    raise AssertionError(kind)


KINDS = [
    "jsonl",
    "jsonl.gz",
    "jsonl-folder",
    "text-line",
    "text-paragraph",
    "text-file",
    "parquet",
    "hub",
    "hub-saved",
]


@pytest.mark.parametrize("kind", KINDS)
def test_every_source_kind_packs_its_documents(kind: str, tmp_path: Path, tok) -> None:
    docs = make_docs(40)
    src = _write_source(kind, tmp_path, docs)
    expected = reference_rows(tok, docs)
    # map-style: one epoch is every packed row exactly once, in a seeded order
    loader = make_loader(data_cfg(tmp_path, src), tok, mb=1)
    assert loader.sources[0].num_rows == len(expected)
    got = rows(batches(loader, len(expected)))
    assert sorted(got) == sorted(expected)
    assert got != expected  # shuffled
    # streaming with no shuffle (window of 1 document): exactly the reference order
    loader = make_loader(data_cfg(tmp_path, src, streaming=True, shuffle_window=1), tok, mb=1)
    assert rows(batches(loader, len(expected))) == expected


def test_batch_contract(tmp_path: Path, tok) -> None:
    docs = make_docs(30)
    src = _write_source("jsonl", tmp_path, docs)
    loader = make_loader(data_cfg(tmp_path, src, val_sequences=2), tok, mb=3)
    b = loader.next_batch()
    assert set(b) == {"input_ids", "loss_mask", "doc_ids"}
    assert b["input_ids"].shape == b["loss_mask"].shape == b["doc_ids"].shape == (3, L)
    assert (b["input_ids"].dtype, b["loss_mask"].dtype, b["doc_ids"].dtype) == (
        torch.long,
        torch.bool,
        torch.long,
    )
    assert b["loss_mask"].all()  # no prompts: every token carries loss
    eos = tok.eos_token_id
    for ids, docs_row in zip(b["input_ids"].tolist(), b["doc_ids"].tolist()):
        expect, d = [], 0
        for t in ids:  # an EOS closes its document; the next token starts a new one
            expect.append(d)
            d += t == eos
        assert docs_row == expect
    json.dumps(loader.state_dict())  # JSON-serialisable


def test_document_ids_come_from_boundaries_not_eos_text(tmp_path: Path, tok) -> None:
    """A document whose text contains the EOS string is still one document."""
    eos_text = tok.eos_token
    docs = [f"one {eos_text} two three four five six seven eight nine ten"] * 4
    src = _write_source("jsonl", tmp_path, docs)
    loader = make_loader(data_cfg(tmp_path, src, streaming=True, shuffle_window=1), tok, mb=1)
    b = loader.next_batch()
    ids = b["input_ids"][0].tolist()
    first_end = len(tok.encode(docs[0], add_special_tokens=False))  # the real EOS
    assert ids.count(tok.eos_token_id) >= 2  # the literal one and the real one
    assert b["doc_ids"][0, : first_end + 1].eq(0).all()
    assert b["doc_ids"][0, first_end + 1 :].eq(1).all()


# -- mixtures ------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
def test_mixture_respects_weights(streaming: bool, tmp_path: Path, tok) -> None:
    rng = random.Random(0)
    a_docs = [" ".join(["red"] * rng.randint(1, 9)) for _ in range(60)]
    b_docs = [" ".join(["blue"] * rng.randint(1, 9)) for _ in range(60)]
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in a_docs])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": d} for d in b_docs])
    cfg = data_cfg(
        tmp_path,
        jsonl_source(a, weight=3.0),
        jsonl_source(b, weight=1.0),
        streaming=streaming,
        shuffle_window=8,
    )
    loader = make_loader(cfg, tok, mb=4)
    vocab_a = {t for d in a_docs for t in tok.encode(d, add_special_tokens=False)}
    vocab_b = {t for d in b_docs for t in tok.encode(d, add_special_tokens=False)}
    assert not vocab_a & vocab_b
    got = rows(batches(loader, 50))  # 200 rows: several epochs of both sources
    from_a = sum(bool(set(r) & vocab_a) and not set(r) & vocab_b for r in got)
    from_b = sum(bool(set(r) & vocab_b) and not set(r) & vocab_a for r in got)
    assert from_a + from_b == 200  # a row never mixes sources
    assert from_a == 150 and from_b == 50  # shares of rows = shares of tokens
    assert loader.schedule.drawn == [150, 50]


def test_mixture_schedule_tracks_weights() -> None:
    s = MixtureSchedule([0.5, 0.3, 0.2])
    picks = [s.next() for _ in range(1000)]
    for g in range(1, 1001):
        counts = np.bincount(picks[:g], minlength=3)
        assert np.all(np.abs(counts - np.array([0.5, 0.3, 0.2]) * g) <= 1.0)


def test_index_permutation_is_a_permutation() -> None:
    for n in (1, 2, 3, 5, 16, 17, 1000, 4097):
        out = IndexPermutation(n, 7, "rows", 0, 1)(np.arange(n))
        assert sorted(out.tolist()) == list(range(n))
    a = IndexPermutation(100, 1)(np.arange(100))
    assert not np.array_equal(a, IndexPermutation(100, 2)(np.arange(100)))
    assert np.array_equal(a, IndexPermutation(100, 1)(np.arange(100)))


# -- prompt / completion ------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
def test_sft_prompt_tokens_carry_no_loss(streaming: bool, tmp_path: Path, tok) -> None:
    rng = random.Random(0)
    records = [
        {"prompt": f"add {rng.randint(0, 99)} {rng.randint(0, 99)} =", "answer": f" {i}"}
        for i in range(40)
    ]
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    src = jsonl_source(path, prompt_field="prompt", completion_field="answer")
    cfg = data_cfg(tmp_path, src, streaming=streaming, shuffle_window=1)
    flat_ids, flat_mask = [], []
    for r in records:
        p = tok.encode(r["prompt"], add_special_tokens=False)
        c = tok.encode(r["answer"], add_special_tokens=False) + [tok.eos_token_id]
        flat_ids += p + c
        flat_mask += [False] * len(p) + [True] * len(c)
    n = len(flat_ids) // L
    expected = {
        (tuple(flat_ids[i * L : (i + 1) * L]), tuple(flat_mask[i * L : (i + 1) * L]))
        for i in range(n)
    }
    loader = make_loader(cfg, tok, mb=1)
    got = batches(loader, n)
    pairs = {(tuple(i), tuple(m)) for i, m in zip(rows(got), rows(got, "loss_mask"))}
    assert pairs == expected
    assert not all(all(m) for _, m in pairs)  # some prompt positions exist


# -- determinism, ranks, resume -------------------------------------------------------------


def _mixed_cfg(tmp_path: Path, streaming: bool) -> DataConfig:
    """Two sources (one SFT, one hub/local) and a held-out split: the hardest case."""
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in make_docs(50, 3)])
    records = [{"q": f"q{i} the cat", "a": f" a{i} sat"} for i in range(30)]
    b = write_jsonl(tmp_path / "b.jsonl", records)
    (tmp_path / "hub").mkdir(exist_ok=True)
    write_jsonl(tmp_path / "hub" / "train.jsonl", [{"text": d} for d in make_docs(30, 4, "dog")])
    return data_cfg(
        tmp_path,
        jsonl_source(a, weight=2.0),
        jsonl_source(b, prompt_field="q", completion_field="a", weight=1.0),
        DataSourceConfig(kind=SourceKind.hub, path=str(tmp_path / "hub"), weight=1.0),
        streaming=streaming,
        shuffle_window=5,
        val_sequences=4,
    )


def _triples(bs):
    return list(zip(rows(bs), rows(bs, "loss_mask"), rows(bs, "doc_ids")))


@pytest.mark.parametrize("streaming", [False, True])
def test_order_is_a_function_of_the_seed(streaming: bool, tmp_path: Path, tok) -> None:
    cfg = _mixed_cfg(tmp_path, streaming)
    first = _triples(batches(make_loader(cfg, tok, seed=5), 12))
    assert first == _triples(batches(make_loader(cfg, tok, seed=5), 12))
    assert first != _triples(batches(make_loader(cfg, tok, seed=6), 12))


@pytest.mark.parametrize("streaming", [False, True])
def test_two_ranks_split_the_one_rank_stream(streaming: bool, tmp_path: Path, tok) -> None:
    """Rank 0's rows then rank 1's rows = the single-rank stream, step by step: no overlap,
    no gap; the validation rows split the same way."""
    cfg = _mixed_cfg(tmp_path, streaming)
    one = make_loader(cfg, tok, mb=4, world=1)
    r0 = make_loader(cfg, tok, mb=2, rank=0, world=2)
    r1 = make_loader(cfg, tok, mb=2, rank=1, world=2)
    for _ in range(40):  # past several epochs of the small sources
        whole, a, b = one.next_batch(), r0.next_batch(), r1.next_batch()
        for key in whole:
            assert torch.equal(whole[key], torch.cat([a[key], b[key]])), key
    assert r0.state_dict() == r1.state_dict()  # rank 0's state serves every rank
    v0, v1 = r0.validation_batches(4, 8), r1.validation_batches(4, 8)
    assert len(v0) == len(v1) == 1
    (vall,) = one.validation_batches(4, 8)
    assert torch.equal(vall["input_ids"], torch.cat([v0[0]["input_ids"], v1[0]["input_ids"]]))


def test_map_epoch_covers_every_row_once_across_ranks(tmp_path: Path, tok) -> None:
    docs = make_docs(60)
    src = _write_source("jsonl", tmp_path, docs)
    cfg = data_cfg(tmp_path, src)
    n = make_loader(cfg, tok).sources[0].num_rows
    steps = n // 4
    r0 = make_loader(cfg, tok, mb=2, rank=0, world=2)
    r1 = make_loader(cfg, tok, mb=2, rank=1, world=2)
    got = rows(batches(r0, steps)) + rows(batches(r1, steps))
    assert len(set(got)) == len(got) == steps * 4  # no row twice within an epoch
    assert set(got) <= set(reference_rows(tok, docs))


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("world", [1, 2])
def test_resume_continues_exactly(streaming: bool, world: int, tmp_path: Path, tok) -> None:
    cfg = _mixed_cfg(tmp_path, streaming)
    for stop in (3, 17):  # inside the first window / epoch, and well past them
        for rank in range(world):
            straight = make_loader(cfg, tok, mb=2, rank=rank, world=world)
            batches(straight, stop)
            state = json.loads(json.dumps(straight.state_dict()))  # as the checkpoint stores it
            expected = _triples(batches(straight, 15))
            resumed = make_loader(cfg, tok, mb=2, rank=rank, world=world)
            resumed.load_state_dict(state)
            assert _triples(batches(resumed, 15)) == expected, (stop, rank)


def test_resume_refuses_changed_data(tmp_path: Path, tok) -> None:
    from twotower_train.data.documents import DataError

    cfg = _mixed_cfg(tmp_path, False)
    state = make_loader(cfg, tok).state_dict()
    with pytest.raises(DataError, match="seed differ"):
        make_loader(cfg, tok, seed=1).load_state_dict(state)
    cfg.sources[0].weight = 5.0
    with pytest.raises(DataError, match="weights differ"):
        make_loader(cfg, tok).load_state_dict(state)


@pytest.mark.parametrize("streaming", [False, True])
def test_held_out_rows_are_never_trained_on(streaming: bool, tmp_path: Path, tok) -> None:
    docs = [f"unique{i} " + d for i, d in enumerate(make_docs(60))]
    src = _write_source("jsonl", tmp_path, docs)
    loader = make_loader(data_cfg(tmp_path, src, val_sequences=3, streaming=streaming), tok)
    (val,) = loader.validation_batches(3, 3)
    assert val["input_ids"].shape == (3, L)
    assert val["input_ids"].flatten().tolist() == [
        t for r in reference_rows(tok, docs)[:3] for t in r
    ]
    held = tok.decode(val["input_ids"].flatten())
    held_docs = [d for d in docs if d.split()[0] in held.split()]
    trained = tok.decode(torch.cat([b["input_ids"].flatten() for b in batches(loader, 60)]))
    assert held_docs and not any(d.split()[0] + " " in trained for d in held_docs)


def test_map_style_cache_is_reused_and_invalidated(tmp_path: Path, tok) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in make_docs(30)])
    cfg = data_cfg(tmp_path, jsonl_source(path))
    logs: list[str] = []
    make_loader(cfg, tok, log=logs.append)
    make_loader(cfg, tok, log=logs.append)
    assert sum("tokenised" in m for m in logs) == 1
    write_jsonl(path, [{"text": d} for d in make_docs(31)])  # the file changed
    make_loader(cfg, tok, log=logs.append)
    assert sum("tokenised" in m for m in logs) == 2


def test_tiny_world_default_still_works(tmp_path: Path, tok) -> None:
    """`data.source=tiny_world` (the default) and the same corpus as a mixture entry."""
    cfg = DataConfig(seq_len=32, val_sequences=4, streaming=True)
    loader = make_loader(cfg, tok, mb=2)
    b = loader.next_batch()
    assert b["input_ids"].shape == (2, 32)
    (val,) = loader.validation_batches(4, 4)
    assert "=" in tok.decode(val["input_ids"].flatten())  # held-out tasks come first
    sft = DataConfig(
        source=DataSource.mixture,
        sources=[
            DataSourceConfig(
                kind=SourceKind.tiny_world, prompt_field="prompt", completion_field="answer"
            )
        ],
        seq_len=32,
        val_sequences=2,
        streaming=True,
        on_bad_document="skip",
    )
    logs: list[str] = []
    b = make_loader(sft, tok, mb=4, log=logs.append).next_batch()
    assert not b["loss_mask"].all() and b["loss_mask"].any()
    assert any("no field 'prompt'" in m for m in logs)  # story paragraphs are skipped, said so


def test_seq_len_must_be_a_multiple_of_the_block(tmp_path: Path, tok) -> None:
    from twotower_train.data.documents import DataError

    src = _write_source("jsonl", tmp_path, make_docs(10))
    with pytest.raises(DataError, match="multiple of denoiser.block_size=5"):
        make_loader(data_cfg(tmp_path, src), tok, block=5)
