"""The shipped tiny world: corpus contents, splits, tokenizer, and exact match through the
project's one AR decoder on a plain HF model."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch

from twotower_train import tiny_world
from twotower_train.decoding import DecodeConfig, ar_generate
from twotower_train.eval import tasks
from twotower_train.model import ContextTower
from twotower_train.tiny_world import (
    CORPUS_DIR,
    TASKS,
    TOKENIZER_DIR,
    load_test_tasks,
    load_test_text,
    load_tokenizer,
    load_train_documents,
)
from twotower_train.tiny_world.build import build, make_task_example


def expected_answer(task: str, prompt: str) -> str:
    """Independent re-implementation of every task, parsed from the prompt text."""
    if task == "add":
        match = re.fullmatch(r"add (\d{1,3}) (\d{1,3}) =", prompt)
        assert match, prompt
        return f" {int(match[1]) + int(match[2])}"
    if task in ("copy", "reverse"):
        match = re.fullmatch(rf"{task} ((?:[a-z] ){{3,10}})=", prompt)
        assert match, prompt
        letters = match[1].split()
        return " " + " ".join(letters if task == "copy" else letters[::-1])
    if task == "sort":
        match = re.fullmatch(r"sort ((?:\d ){3,8})=", prompt)
        assert match, prompt
        return " " + " ".join(sorted(match[1].split(), key=int))
    if task == "recall":
        match = re.fullmatch(r"recall ((?:[a-z]:\d ){3,6})\? ([a-z]) =", prompt)
        assert match, prompt
        pairs = [pair.split(":") for pair in match[1].split()]
        keys = [key for key, _ in pairs]
        assert len(set(keys)) == len(keys), f"repeated key in {prompt!r}"
        return " " + dict(pairs)[match[2]]
    raise AssertionError(task)


@pytest.fixture(scope="module")
def train_records() -> list[dict]:
    return tiny_world.load_train_records()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


# --- corpus ---------------------------------------------------------------------------------


def test_corpus_files_fit_in_20_mb():
    sizes = {path.name: path.stat().st_size for path in CORPUS_DIR.glob("*.jsonl.gz")}
    assert set(sizes) == {"train.jsonl.gz", "test_tasks.jsonl.gz", "test_text.jsonl.gz"}
    assert sum(sizes.values()) <= 20 * 1024 * 1024, sizes


def test_train_split_sizes_and_balance(train_records):
    tasks = [r for r in train_records if r["kind"] == "task"]
    texts = [r for r in train_records if r["kind"] == "text"]
    assert 350_000 <= len(tasks) <= 450_000
    for task in TASKS:
        assert sum(r["task"] == task for r in tasks) == len(tasks) // len(TASKS)
    assert 3_000_000 <= sum(len(r["text"].split()) for r in texts) <= 5_000_000
    # Shuffled: both kinds appear early in the file.
    assert {r["kind"] for r in train_records[:100]} == {"task", "text"}
    assert load_train_documents()[:100] == [r["text"] for r in train_records[:100]]


def test_every_answer_is_correct(train_records):
    for record in train_records:
        if record["kind"] == "task":
            assert record["text"] == record["prompt"] + record["answer"]
            assert record["answer"] == expected_answer(record["task"], record["prompt"])
    for example in load_test_tasks():
        assert example["answer"] == expected_answer(example["task"], example["prompt"])


def test_test_splits_have_the_promised_shape():
    examples = load_test_tasks()
    assert len(examples) == 200 * len(TASKS)
    for task in TASKS:
        per_task = load_test_tasks(task)
        assert len(per_task) == 200 and {e["task"] for e in per_task} == {task}
        assert len({e["prompt"] for e in per_task}) == 200
    paragraphs = load_test_text()
    assert len(paragraphs) == 1000
    assert all(len(re.findall(r"[.!?]", p)) >= 3 and "\n" not in p for p in paragraphs)
    with pytest.raises(ValueError, match="unknown task"):
        load_test_tasks("multiply")


def test_train_and_test_splits_are_disjoint(train_records):
    train_prompts = {r["prompt"] for r in train_records if r["kind"] == "task"}
    train_texts = {r["text"] for r in train_records}
    assert not train_prompts & {e["prompt"] for e in load_test_tasks()}
    assert not train_texts & set(load_test_text())


def test_missing_assets_raise_file_not_found(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="test_text.jsonl.gz"):
        load_test_text(corpus_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tokenizer_dir=tmp_path)


def test_generators_are_deterministic():
    for task in TASKS:
        first = [make_task_example(task, random.Random(7)) for _ in range(3)]
        assert first[0] == first[1] == first[2]
    with pytest.raises(ValueError, match="unknown task"):
        make_task_example("multiply", random.Random(0))


def test_small_build_is_byte_identical_twice(tmp_path: Path):
    sizes = dict(
        train_examples_per_task=200,
        train_text_words=3000,
        test_examples_per_task=20,
        test_text_paragraphs=10,
    )
    for name in ("a", "b"):
        build(tmp_path / name, seed=3, **sizes)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    assert len(files) == 5
    for relative in files:
        assert (tmp_path / "a" / relative).read_bytes() == (tmp_path / "b" / relative).read_bytes()
    small_tokenizer = load_tokenizer(tmp_path / "a" / "tokenizer")
    assert len(small_tokenizer) == tiny_world.VOCAB_SIZE


# --- tokenizer ------------------------------------------------------------------------------


def test_tokenizer_special_ids_and_no_added_tokens(tokenizer):
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    for tok in (tokenizer, auto):
        assert (tok.pad_token, tok.eos_token, tok.mask_token) == ("<|pad|>", "<|eos|>", "<|mask|>")
        assert (tok.pad_token_id, tok.eos_token_id, tok.mask_token_id) == (0, 1, 2)
        assert tok.vocab_size == len(tok) == 2048
        assert (
            tok("add 1 2 =")["input_ids"] == tok("add 1 2 =", add_special_tokens=False)["input_ids"]
        )
        assert tok.encode("") == []


def test_tokenizer_round_trip(tokenizer, train_records):
    samples = [r["text"] for r in train_records[:2000]] + load_test_text()[:200]
    samples += [e["prompt"] + e["answer"] for e in load_test_tasks()]
    samples += ["the <|mask|><|mask|> sat on a <|mask|>.", "  two  spaces\nand a newline ü"]
    for text in samples:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    ids = tokenizer.encode("a <|mask|> b")
    assert ids.count(tokenizer.mask_token_id) == 1
    assert tokenizer.encode("<|mask|>") == [2]


def test_tokenizer_splits_digits_and_keeps_prompts_as_prefixes(tokenizer):
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode("add 123 45 ="))
    assert [t for t in tokens if t.isdigit()] == ["1", "2", "3", "4", "5"]
    # Feeding the prompt at evaluation must produce the same tokens as in training text.
    for example in load_test_tasks():
        prompt_ids = tokenizer.encode(example["prompt"])
        full_ids = tokenizer.encode(example["prompt"] + example["answer"])
        assert full_ids[: len(prompt_ids)] == prompt_ids


# --- AR exact-match evaluator ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def _ar(model, prompt_ids, n, batch_size=64, eos_id=None):
    cfg = DecodeConfig(max_new_tokens=n, batch_size=batch_size)
    return ar_generate(ContextTower.of(model), prompt_ids, cfg, eos_id)[0]


def test_ar_exact_match_batched_equals_unbatched(tiny_llama, tokenizer):
    examples = [e for task in TASKS for e in load_test_tasks(task)[:3]]
    tower = ContextTower.of(tiny_llama)
    scores = {}
    for batch in (1, 8):
        cfg = DecodeConfig(max_new_tokens=6, batch_size=batch)
        scores[batch], stats, prompt_ids = tasks.generation_scores(
            ar_generate, tower, tokenizer, examples, cfg
        )
        assert stats.sequences == len(examples)
    assert scores[1] == scores[8]
    assert set(scores[8]) == set(TASKS)
    assert all(0.0 <= score <= 1.0 for score in scores[8].values())
    assert _ar(tiny_llama, prompt_ids, 6, batch_size=1) == _ar(tiny_llama, prompt_ids, 6, 8)


def test_exact_match_scoring():
    """The one scorer: the decoded continuation (the decoder cuts it at EOS) must equal the
    answer, whitespace at either end ignored."""
    tokenizer = load_tokenizer()
    example = load_test_tasks("copy")[0]
    answer = tokenizer.encode(example["answer"], add_special_tokens=False)

    def fake_generate(model, prompt_ids, cfg, eos_id):
        return [answer, answer + [5], answer[:-1]], None

    examples = [{**example, "task": "copy"}] * 3
    scores, _, _ = tasks.generation_scores(fake_generate, None, tokenizer, examples, None)
    assert scores == {"copy": 1 / 3}
    assert tasks.exact_match("  a b \n", "a b") and not tasks.exact_match("a b c", "a b")


def test_generation_stops_at_eos(tiny_llama, tokenizer):
    prompt_ids = [tokenizer.encode(e["prompt"]) for e in load_test_tasks()[::200]]
    full = _ar(tiny_llama, prompt_ids, 6, eos_id=None)
    assert all(len(ids) == 6 for ids in full)
    # Pretend the third token of the first row is EOS: every row is cut at its first occurrence.
    eos_id = full[0][2]
    cut = _ar(tiny_llama, prompt_ids, 6, eos_id=eos_id)
    assert cut[0] == full[0][: full[0].index(eos_id)]
    for ids_full, ids_cut in zip(full, cut):
        expected = ids_full[: ids_full.index(eos_id)] if eos_id in ids_full else ids_full
        assert ids_cut == expected


def test_cached_generation_matches_full_recompute(tiny_llama, tokenizer):
    prompt_ids = [tokenizer.encode(e["prompt"]) for e in load_test_tasks()[::250]]
    cached = _ar(tiny_llama, prompt_ids, 5)
    for ids, generated in zip(prompt_ids, cached):
        sequence = list(ids)
        with torch.no_grad():
            for _ in range(5):
                logits = tiny_llama(torch.tensor([sequence]), use_cache=False).logits
                sequence.append(int(logits[0, -1].argmax()))
        assert generated == sequence[len(ids) :]
