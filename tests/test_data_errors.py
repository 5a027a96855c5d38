"""Bad data input: one clear error naming the file and line, or (on_bad_document=skip)
an explicit skip counted in the log. Nothing is dropped silently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli
from test_data import data_cfg, jsonl_source, make_loader, reference_rows, rows, write_jsonl

from twotower_train.config import DataSourceConfig, SourceKind, TextUnit
from twotower_train.data.documents import DataError
from twotower_train.tiny_world import load_tokenizer

GOOD = [f"good document number {i} with several words in it" for i in range(12)]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _jsonl_with(tmp_path: Path, bad_line: bytes, at: int = 2) -> Path:
    lines = [json.dumps({"text": d}).encode() for d in GOOD]
    lines.insert(at - 1, bad_line)
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


BAD_LINES = {
    "not_json": (b'{"text": "unterminated', r"d\.jsonl:2: not valid JSON"),
    "not_utf8": (b'{"text": "caf\xff"}', r"d\.jsonl:2: not valid UTF-8 \(byte 0xff at column 14\)"),
    "missing_field": (b'{"body": "x"}', r"d\.jsonl:2: no field 'text'"),
    "not_object": (b'["text"]', r"d\.jsonl:2: not a JSON object"),
    "null": (b'{"text": null}', r"d\.jsonl:2: field 'text' is null, not a string"),
    "empty": (b'{"text": "  "}', r"d\.jsonl:2: field 'text' is empty"),
}


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_jsonl_line_is_one_error_with_file_and_line(
    case: str, streaming: bool, tmp_path: Path, tok
) -> None:
    bad, pattern = BAD_LINES[case]
    cfg = data_cfg(tmp_path, jsonl_source(_jsonl_with(tmp_path, bad)), streaming=streaming)
    with pytest.raises(DataError, match=pattern) as info:
        make_loader(cfg, tok, mb=1).next_batch()
    assert "\n" not in str(info.value)
    assert "data.on_bad_document=skip" in str(info.value)  # says how to skip instead


@pytest.mark.parametrize("streaming", [False, True])
def test_skip_counts_bad_documents_in_the_log(streaming: bool, tmp_path: Path, tok) -> None:
    lines = [json.dumps({"text": d}).encode() for d in GOOD]
    lines[1:1] = [b"not json", b'{"body": 1}', b"also not json"]
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    cfg = data_cfg(
        tmp_path, jsonl_source(path), streaming=streaming, on_bad_document="skip", shuffle_window=1
    )
    logs: list[str] = []
    loader = make_loader(cfg, tok, mb=1, log=logs.append)
    expected = reference_rows(tok, GOOD)
    got = rows([loader.next_batch() for _ in range(len(expected))])
    assert sorted(got) == sorted(expected)  # exactly the good documents
    text = "\n".join(logs)
    assert "skipping " + str(path) + ":2: not valid JSON" in text
    assert "skipping " + str(path) + ":3: no field 'text'" in text
    if not streaming:  # the build reports the totals
        assert (
            f"skipped 3 bad documents: 1 missing field (first at {path}:3), "
            f"2 not valid JSON (first at {path}:2)"
        ) in text
    else:  # streaming reports them at the end of each epoch
        while loader.sources[0].epoch == 0:
            loader.next_batch()
        assert f"2 not valid JSON (first at {path}:2)" in "\n".join(logs)


@pytest.mark.parametrize("streaming", [False, True])
def test_dataset_empty_after_filtering(streaming: bool, tmp_path: Path, tok) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "a"}\n{"body": "b"}\n')
    cfg = data_cfg(tmp_path, jsonl_source(path), streaming=streaming, on_bad_document="skip")
    with pytest.raises(DataError, match=r"no documents left after skipping 2 bad ones: 2 missing"):
        make_loader(cfg, tok, mb=1).next_batch()


def test_missing_paths(tmp_path: Path, tok) -> None:
    with pytest.raises(FileNotFoundError, match=r"data.sources\[0\] .*nope\.jsonl does not exist"):
        make_loader(data_cfg(tmp_path, jsonl_source(tmp_path / "nope.jsonl")), tok)
    with pytest.raises(FileNotFoundError, match=r"no file matches .*\*\.jsonl"):
        make_loader(data_cfg(tmp_path, jsonl_source(tmp_path / "x" / "*.jsonl")), tok)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \.jsonl/.* files in .*empty_dir"):
        make_loader(data_cfg(tmp_path, jsonl_source(tmp_path / "empty_dir")), tok)
    hub = DataSourceConfig(kind=SourceKind.hub, path=str(tmp_path / "no_dataset"))
    with pytest.raises(FileNotFoundError, match="no_dataset does not exist"):
        make_loader(data_cfg(tmp_path, hub), tok)


@pytest.mark.parametrize("kind", ["jsonl", "text", "parquet"])
def test_empty_file(kind: str, tmp_path: Path, tok) -> None:
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "e.parquet"
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    else:
        path = tmp_path / f"e.{'jsonl' if kind == 'jsonl' else 'txt'}"
        path.write_text("\n" if kind == "jsonl" else "")
    src = DataSourceConfig(kind=SourceKind(kind), path=str(path))
    with pytest.raises(DataError, match=rf"{path.name}: empty file"):
        make_loader(data_cfg(tmp_path, src), tok)
    # with skip, an empty shard among good ones is counted and the rest trains
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": d} for d in GOOD])
    if kind == "jsonl":
        logs: list[str] = []
        cfg = data_cfg(tmp_path, jsonl_source(tmp_path / "*.jsonl"), on_bad_document="skip")
        make_loader(cfg, tok, log=logs.append).next_batch()
        assert any(f"{path}: empty file" in m for m in logs), logs
    good.unlink()


def test_non_utf8_text_names_the_line(tmp_path: Path, tok) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes(b"first paragraph\n\nsecond \xc3\x28 broken\nstill second\n\nthird\n")
    src = DataSourceConfig(kind=SourceKind.text, path=str(path))
    with pytest.raises(DataError, match=r"t\.txt:3: not valid UTF-8 \(byte 0xc3 at column 8\)"):
        make_loader(data_cfg(tmp_path, src, seq_len=4), tok, mb=1)
    whole = DataSourceConfig(kind=SourceKind.text, path=str(path), text_unit=TextUnit.file)
    with pytest.raises(DataError, match=r"t\.txt:3: not valid UTF-8"):
        make_loader(data_cfg(tmp_path, whole, seq_len=4), tok, mb=1)
    logs: list[str] = []
    cfg = data_cfg(tmp_path, src, seq_len=4, on_bad_document="skip")
    loader = make_loader(cfg, tok, mb=1, log=logs.append)
    assert loader.sources[0].cache.meta["documents"] == 2  # the broken paragraph is skipped
    assert any("skipped 1 bad documents: 1 not valid UTF-8" in m for m in logs)


def test_document_shorter_than_one_block(tmp_path: Path, tok) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in GOOD[:3]] + [{"text": "hi"}])
    cfg = data_cfg(tmp_path, jsonl_source(path), min_doc_tokens=8)
    with pytest.raises(DataError, match=r"d\.jsonl:4: 2 tokens, fewer than data.min_doc_tokens=8"):
        make_loader(cfg, tok, block=8)
    # by default short documents are kept (packed with their neighbours) and counted
    logs: list[str] = []
    make_loader(data_cfg(tmp_path, jsonl_source(path)), tok, block=8, log=logs.append)
    assert any("1 documents shorter than one block (8 tokens)" in m for m in logs), logs


def test_missing_column(tmp_path: Path, tok) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": GOOD}), tmp_path / "d.parquet")
    src = DataSourceConfig(kind=SourceKind.parquet, path=str(tmp_path / "d.parquet"), field="body")
    with pytest.raises(DataError, match=r"d\.parquet: no column 'body' \(columns: text\)"):
        make_loader(data_cfg(tmp_path, src), tok)
    (tmp_path / "hub").mkdir()
    write_jsonl(tmp_path / "hub" / "train.jsonl", [{"text": d} for d in GOOD])
    hub = DataSourceConfig(kind=SourceKind.hub, path=str(tmp_path / "hub"), field="body")
    with pytest.raises(DataError, match=r"no column 'body' \(columns: text\)"):
        make_loader(data_cfg(tmp_path, hub), tok)


def test_source_too_small_for_held_out_rows(tmp_path: Path, tok) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in GOOD[:2]])
    for streaming in (False, True):
        cfg = data_cfg(tmp_path, jsonl_source(path), val_sequences=50, streaming=streaming)
        with pytest.raises(DataError, match="lower data.val_sequences"):
            make_loader(cfg, tok)


def test_cli_prints_a_data_error_as_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    proc = run_cli(
        [
            "data.source=mixture",
            f"data.sources=[{{kind: jsonl, path: '{bad}'}}]",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"run.dir={tmp_path / 'run'}",
        ],
        timeout=120,
    )
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("twotower_train: error:")]
    assert len(lines) == 1, proc.stderr
    assert f"{bad}:2: not valid JSON" in lines[0]
