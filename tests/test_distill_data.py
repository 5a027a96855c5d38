"""The backbone's greedy continuations as a data source (twotower_train/distill_data.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_data import data_cfg, jsonl_source, make_loader, write_jsonl
from tiny_models import tiny_backbone

from twotower_train.tiny_world import load_tokenizer
from twotower_train.tools import distill_data

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def hf_greedy(model, tok, prompt: str, max_new_tokens: int) -> list[int]:
    """Slow reference: one token at a time with the full prefix, no cache."""
    ids = tok.encode(prompt, add_special_tokens=False)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids + out])).logits[0, -1]
            nxt = int(logits.argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
    return out


@pytest.mark.parametrize("family", ["llama", "nemotron_h"])
def test_greedy_continuations_equal_step_by_step_argmax(family, tok):
    model = tiny_backbone(family, vocab_size=len(tok), eos_token_id=tok.eos_token_id).eval()
    # An EOS-prone head: some continuations end early, others run to the limit.
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] *= 3.0
    prompts = ["add 1 2 =", "copy a b c =", "add 10 20 =", "the cat", "sort 3 1 2 ="]
    got = distill_data.greedy_continuations(model, tok, prompts, max_new_tokens=6, batch_size=2)
    assert {finished for _, finished in got} == {True, False}  # both cases are exercised
    for prompt, (ids, finished) in zip(prompts, got):
        want = hf_greedy(model, tok, prompt, 6)
        assert ids == want
        assert finished == (len(want) < 6)


def write_input(tmp_path: Path) -> Path:
    return write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"task": "add", "prompt": "add 1 2 =", "answer": " 3"},
            {"text": "a story paragraph without a prompt"},
            {"task": "add", "prompt": "add 20 5 =", "answer": " 25"},
            {"task": "copy", "prompt": "copy d t z m i =", "answer": " d t z m i"},
        ],
    )


def test_cli_writes_a_data_source(tmp_path: Path, tok, capsys):
    out = tmp_path / "greedy.jsonl"
    code = distill_data.main(
        ["--backbone", "tiny_llama", "--input", str(write_input(tmp_path)), "--out", str(out)]
    )
    assert code == 0
    line = capsys.readouterr().out
    assert "3 continuations by tiny_llama" in line and "1 records without a prompt" in line
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["add 1 2 =", "add 20 5 =", "copy d t z m i ="]
    for r in records:
        assert r["text"] == r["prompt"] + r["answer"]
        assert "corpus_answer" in r and r["task"] in ("add", "copy")
    # The shipped backbone solves these: its greedy answers are the corpus's.
    assert [r["answer"] for r in records] == [" 3", " 25", " d t z m i"]
    assert "same as the corpus: add 100.0%, copy 100.0%" in line
    assert not list(tmp_path.glob("*.tmp"))
    # It is a data source: plain documents through `field: text`.
    loader = make_loader(data_cfg(tmp_path, jsonl_source(out, field="text")), tok, mb=1)
    row = loader.next_batch()["input_ids"][0].tolist()
    flat = []
    for r in records:
        flat += tok.encode(r["text"], add_special_tokens=False) + [tok.eos_token_id]
    assert row == flat[: len(row)]


def test_limit_and_unfinished(tmp_path: Path, capsys):
    src = write_input(tmp_path)
    out = tmp_path / "one.jsonl"
    args = ["--backbone", "tiny_llama", "--input", str(src), "--out", str(out)]
    assert distill_data.main([*args, "--limit", "1"]) == 0
    assert len(out.read_text().splitlines()) == 1
    # One new token cannot reach the EOS after " 3": every continuation is unfinished.
    out.unlink()
    assert distill_data.main([*args, "--max-new-tokens", "1"]) == 1
    assert "no continuation ended within --max-new-tokens 1" in capsys.readouterr().err
    assert not out.exists()
    assert distill_data.main([*args, "--max-new-tokens", "1", "--keep-unfinished"]) == 0
    assert len(out.read_text().splitlines()) == 3


@pytest.mark.parametrize(
    "records, extra, message",
    [
        (None, [], "no such file"),
        ([{"text": "no prompt here"}], [], "no record with a non-empty 'prompt' field"),
        ("bad", [], "in.jsonl:2: not valid JSON"),
        ([{"prompt": "add 1 2 ="}], ["--limit", "0"], "--limit must be >= 1"),
        ([{"prompt": "add 1 2 ="}], ["--backbone", "/nope/model"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, records, extra, message):
    src = tmp_path / "in.jsonl"
    if records == "bad":
        src.write_text('{"prompt": "add 1 2 ="}\n{"prompt": \n')
    elif records is not None:
        write_jsonl(src, records)
    out = tmp_path / "out.jsonl"
    argv = ["--backbone", "tiny_llama", "--input", str(src), "--out", str(out), *extra]
    code = distill_data.main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0 and message in err and len(err.splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_out_must_be_jsonl(tmp_path, capsys):
    argv = ["--backbone", "tiny_llama", "--input", "tiny_world", "--out", str(tmp_path / "x.txt")]
    assert distill_data.main(argv) == 1
    assert "must end in .jsonl" in capsys.readouterr().err


def test_input_files_take_a_file_folder_glob_or_the_tiny_world(tmp_path: Path, monkeypatch):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "x"}])
    b = write_jsonl(tmp_path / "b.jsonl.gz", [{"prompt": "y"}])
    (tmp_path / "notes.txt").write_text("not data")
    assert distill_data.input_files(str(a)) == [a]
    assert distill_data.input_files(str(tmp_path)) == [a, b]
    assert distill_data.input_files(str(tmp_path / "*.jsonl*")) == [a, b]
    monkeypatch.chdir(tmp_path)
    assert [p.name for p in distill_data.input_files("*.jsonl")] == ["a.jsonl"]
    assert distill_data.input_files("tiny_world")[0].name.startswith("train.jsonl")
    records, skipped = distill_data.read_prompts([a, b], "prompt", None)
    assert [r["prompt"] for r in records] == ["x", "y"] and skipped == 0
    with pytest.raises(distill_data.DistillDataError, match="no such file"):
        distill_data.input_files(str(tmp_path / "*.parquet"))


def test_prompts_cut_from_running_text(tmp_path: Path, tok, capsys):
    passages = [
        {"text": "the cat sat on the mat and the dog ran", "id": 0},
        {"text": "short", "id": 1},  # no longer than the cut: skipped
        {"text": "add 1 2 = 3 and add 4 5 = 9", "id": 2, "prompt": "kept aside"},
        {"text": "copy a b c = a b c", "id": 3},
    ]
    src = write_jsonl(tmp_path / "passages.jsonl", passages)
    out = tmp_path / "greedy.jsonl"
    argv = ["--backbone", "tiny_llama", "--input", str(src), "--out", str(out)]
    argv += ["--prompt-field", "text", "--max-new-tokens", "5"]
    assert (
        distill_data.main([*argv, "--prompt-tokens", "4", "--keep-unfinished", "--limit", "2"]) == 0
    )
    line = capsys.readouterr().out
    assert "2 continuations" in line and "1 too short to cut" in line
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [0, 2]  # the limit counts records that were cut
    for r, p in zip(records, [passages[0], passages[2]]):
        ids = tok.encode(p["text"], add_special_tokens=False)
        assert r["prompt"] == tok.decode(ids[:4])
        assert r["text"] == r["prompt"] + r["answer"] and r["corpus_text"] == p["text"]
    assert records[1]["corpus_prompt"] == "kept aside"
    # Nothing long enough: one line, nothing written.
    out.unlink()
    assert distill_data.main([*argv, "--prompt-tokens", "50"]) == 1
    err = capsys.readouterr().err.strip()
    assert "no 'text' field is longer than --prompt-tokens 50 tokens" in err
    assert len(err.splitlines()) == 1 and not out.exists()
    assert distill_data.main([*argv, "--prompt-tokens", "0"]) == 2
    assert "--prompt-tokens must be >= 1" in capsys.readouterr().err
