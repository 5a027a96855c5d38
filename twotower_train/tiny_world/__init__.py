"""The shipped "tiny world": a small synthetic corpus, its byte-level BPE tokenizer, and
the held-out tasks every recipe is scored on -- what a run loads.

The corpus has two kinds of documents:

- task examples with verifiable answers (``add``, ``copy``, ``reverse``, ``sort``,
  ``recall``): the document text is exactly ``prompt + answer``, so an evaluator can feed
  ``prompt`` and compare the greedy continuation with ``answer``;
- short story paragraphs from a small probabilistic grammar, for perplexity.

Files of this package: ``__init__.py`` (paths and loaders of the shipped assets),
``tasks.py`` (the evaluation tasks, registered in ``twotower_train.eval.tasks``),
``lm_eval_tasks/`` (the same tasks for lm-evaluation-harness) and ``build.py`` (the
generator, the BPE trainer and the build command -- never imported by a run)::

    python -m twotower_train.tiny_world.build build [--out DIR] [--seed N]
    python -m twotower_train.tiny_world.build stats    # sizes and token counts
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from twotower_train.errors import MissingFile

TASKS: tuple[str, ...] = ("add", "copy", "reverse", "sort", "recall")
ASSETS_DIR: Path = Path(__file__).resolve().parent.parent / "assets" / "tiny_world"
TOKENIZER_DIR: Path = ASSETS_DIR / "tokenizer"
CORPUS_DIR: Path = ASSETS_DIR / "corpus"

TRAIN_FILE = "train.jsonl.gz"
TEST_TASKS_FILE = "test_tasks.jsonl.gz"
TEST_TEXT_FILE = "test_text.jsonl.gz"

PAD_TOKEN, EOS_TOKEN, MASK_TOKEN = "<|pad|>", "<|eos|>", "<|mask|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, EOS_TOKEN, MASK_TOKEN)  # ids 0, 1, 2
VOCAB_SIZE = 2048

BUILD_COMMAND = "python -m twotower_train.tiny_world.build build"


def _read_jsonl_gz(path: Path) -> Iterator[dict]:
    if not path.is_file():
        raise MissingFile(f"tiny-world asset {path} is missing; rebuild it with `{BUILD_COMMAND}`")
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            yield json.loads(line)


# ---------------------------------------------------------------------------------------------
# Loaders.
# ---------------------------------------------------------------------------------------------


def load_train_documents(corpus_dir: Path = CORPUS_DIR) -> list[str]:
    """Texts of ``train.jsonl.gz`` in file order (tasks and story paragraphs, shuffled)."""
    return [record["text"] for record in _read_jsonl_gz(Path(corpus_dir) / TRAIN_FILE)]


def load_train_records(corpus_dir: Path = CORPUS_DIR) -> list[dict]:
    """Full records of ``train.jsonl.gz``: text, kind, and for tasks task/prompt/answer."""
    return list(_read_jsonl_gz(Path(corpus_dir) / TRAIN_FILE))


def load_test_tasks(task: str | None = None, corpus_dir: Path = CORPUS_DIR) -> list[dict]:
    """Held-out task examples ``{"task", "prompt", "answer"}``, all tasks or only `task`."""
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    records = _read_jsonl_gz(Path(corpus_dir) / TEST_TASKS_FILE)
    return [record for record in records if task is None or record["task"] == task]


def load_test_text(corpus_dir: Path = CORPUS_DIR) -> list[str]:
    """Held-out story paragraphs, for perplexity."""
    return [record["text"] for record in _read_jsonl_gz(Path(corpus_dir) / TEST_TEXT_FILE)]


def load_tokenizer(tokenizer_dir: Path = TOKENIZER_DIR):
    """The tiny-world ``PreTrainedTokenizerFast`` (pad=0, eos=1, mask=2; encode adds nothing)."""
    from transformers import PreTrainedTokenizerFast

    tokenizer_file = Path(tokenizer_dir) / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise MissingFile(
            f"tiny-world tokenizer {tokenizer_file} is missing; rebuild it with `{BUILD_COMMAND}`"
        )
    return PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))


def corpus_stats(assets_dir: Path = ASSETS_DIR) -> dict[str, float]:
    """File sizes (bytes) and token counts of the train split, for docs and sanity checks."""
    assets_dir = Path(assets_dir)
    tokenizer = load_tokenizer(assets_dir / "tokenizer")
    records = load_train_records(assets_dir / "corpus")
    stats: dict[str, float] = {}
    for name in (TRAIN_FILE, TEST_TASKS_FILE, TEST_TEXT_FILE):
        stats[f"bytes/{name}"] = (assets_dir / "corpus" / name).stat().st_size
    token_lengths = [
        len(ids)
        for ids in tokenizer([r["text"] for r in records], add_special_tokens=False)["input_ids"]
    ]
    task_lengths = [n for n, r in zip(token_lengths, records) if r["kind"] == "task"]
    text_lengths = [n for n, r in zip(token_lengths, records) if r["kind"] == "text"]
    stats["train/documents"] = len(records)
    stats["train/task_examples"] = len(task_lengths)
    stats["train/text_paragraphs"] = len(text_lengths)
    stats["train/text_words"] = sum(len(r["text"].split()) for r in records if r["kind"] == "text")
    stats["train/tokens"] = sum(token_lengths)
    stats["train/task_tokens"] = sum(task_lengths)
    stats["train/text_tokens"] = sum(text_lengths)
    stats["train/tokens_per_task_example"] = sum(task_lengths) / max(len(task_lengths), 1)
    stats["train/tokens_per_paragraph"] = sum(text_lengths) / max(len(text_lengths), 1)
    for task in TASKS:
        lengths = [n for n, r in zip(token_lengths, records) if r.get("task") == task]
        answers = [r["answer"] for r in records if r.get("task") == task]
        answer_lengths = [len(tokenizer.encode(a, add_special_tokens=False)) for a in answers]
        stats[f"{task}/examples"] = len(lengths)
        stats[f"{task}/tokens_per_example"] = sum(lengths) / max(len(lengths), 1)
        stats[f"{task}/max_answer_tokens"] = max(answer_lengths, default=0)
    return stats
