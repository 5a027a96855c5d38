"""The tiny world's evaluation tasks, registered in ``twotower_train.eval.tasks``:

* generation (``add``, ``copy``, ``reverse``, ``sort``, ``recall``): greedy continuation of
  ``prompt``, exact match against ``answer``;
* ``perplexity``: held-out story paragraphs packed like training (EOS after each, rows of
  ``seq_len`` tokens);
* ``tiny_world_mc``: multiple choice built here from the held-out task examples: the
  true answer and three near misses (an off-by-one sum, a copy for a reverse, one letter
  changed, ...), choice order shuffled with a fixed seed.

Everything is deterministic: the same examples, in the same order, on every call.
"""

from __future__ import annotations

import random

import torch

from twotower_train.data.packing import pack_documents
from twotower_train.eval.tasks import ChoiceTask, GenerationTask, PerplexityTask, register
from twotower_train.tiny_world import TASKS, load_test_tasks, load_test_text

PERPLEXITY = "perplexity"
MC_TASK = "tiny_world_mc"
MC_SEED = 1234
MC_PER_TASK = 40
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def generation_examples(task: str, limit: int | None = None) -> list[dict]:
    """Held-out ``{"task", "prompt", "answer"}`` examples of one tiny-world task."""
    examples = load_test_tasks(task)
    return examples[:limit] if limit is not None else examples


def perplexity_rows(tokenizer, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """Held-out story paragraphs, EOS after each, cut into rows ``[N, seq_len]`` (long)."""
    docs = [tokenizer.encode(text, add_special_tokens=False) for text in load_test_text()]
    rows, _ = pack_documents(docs, tokenizer.eos_token_id, seq_len)
    rows = torch.from_numpy(rows).long()
    return rows[:limit] if limit is not None else rows


def _words(answer: str) -> list[str]:
    return answer.split()


def _join(words: list[str]) -> str:
    return " " + " ".join(words)


def _change_one(words: list[str], rng: random.Random, alphabet: str) -> list[str]:
    out = list(words)
    i = rng.randrange(len(out))
    out[i] = rng.choice([c for c in alphabet if c != out[i]])
    return out


def _near_misses(example: dict, rng: random.Random) -> list[str]:
    """Wrong answers close to ``example["answer"]``, most telling first."""
    task, answer, prompt = example["task"], example["answer"], example["prompt"]
    words = _words(answer)
    if task == "add":
        s = int(answer)
        return [f" {s + d}" for d in (1, -1, 10, -10, 100, -100, 2) if s + d >= 0]
    if task == "recall":
        pairs = prompt.split("?")[0].split()[1:]
        values = [p.split(":")[1] for p in pairs]
        return [f" {v}" for v in values + list("0123456789") if v != answer.strip()]
    alphabet = "0123456789" if task == "sort" else _LETTERS
    args = prompt.split()[1:-1]  # the task's input, in prompt order
    out = []
    if task == "copy":
        out.append(_join(words[::-1]))
    elif task == "reverse":
        out.append(_join(args))
    elif task == "sort":
        out += [_join(args), _join(words[::-1])]
    for _ in range(8):
        out.append(_join(_change_one(words, rng, alphabet)))
        if len(words) > 1:
            i = rng.randrange(len(words) - 1)
            swapped = words[:i] + [words[i + 1], words[i]] + words[i + 2 :]
            out.append(_join(swapped))
            out.append(_join(words[:i] + words[i + 1 :]))
    return out


def mc_examples(limit: int | None = None, per_task: int = MC_PER_TASK) -> list[dict]:
    """``tiny_world_mc``: ``{"task", "prompt", "choices": [4 str], "label": int}``.

    ``per_task`` held-out examples of each tiny-world task (the first ones), each with the
    true answer and three distinct near misses, shuffled with a fixed seed; tasks
    interleaved so a ``limit`` keeps every task.
    """
    rng = random.Random(MC_SEED)
    per: dict[str, list[dict]] = {}
    for task in TASKS:
        items = []
        for ex in load_test_tasks(task)[:per_task]:
            wrong: list[str] = []
            for cand in _near_misses(ex, rng):
                if cand.strip() != ex["answer"].strip() and cand not in wrong:
                    wrong.append(cand)
                if len(wrong) == 3:
                    break
            choices = [ex["answer"], *wrong]
            order = list(range(len(choices)))
            rng.shuffle(order)
            items.append(
                {
                    "task": task,
                    "prompt": ex["prompt"],
                    "choices": [choices[i] for i in order],
                    "label": order.index(0),
                }
            )
        per[task] = items
    interleaved = [per[t][i] for i in range(per_task) for t in TASKS if i < len(per[t])]
    return interleaved[:limit] if limit is not None else interleaved


for _task in TASKS:
    register(GenerationTask(_task, lambda limit, _task=_task: generation_examples(_task, limit)))
register(PerplexityTask(PERPLEXITY, perplexity_rows))
register(ChoiceTask(MC_TASK, mc_examples))
