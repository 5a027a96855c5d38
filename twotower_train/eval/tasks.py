"""Evaluation tasks: a small registry the harness reads, and the one exact-match scorer.

A task is one of four kinds:

* ``GenerationTask(name, examples)``: ``examples(limit)`` -> ``[{"prompt", "answer"}, ...]``;
  the continuation (greedy, cut at EOS) must equal the answer, whitespace at either end
  ignored (``exact_match``). Every exact-match figure -- the harness's, and the task scores
  logged while pretraining a backbone -- is counted by ``generation_scores``.
* ``PerplexityTask(name, rows)``: ``rows(tokenizer, seq_len, limit)`` -> ``[N, seq_len]`` ids.
* ``ChoiceTask(name, items)``: ``items(limit)`` -> ``[{"prompt", "choices", "label"}, ...]``,
  scored by the log-likelihood of each choice.
* ``LMEvalTask(name, metric)``: an lm-evaluation-harness task (``hellaswag``, ...), lm-eval's
  own definition on local data, scored by ``eval/lm_eval_suite.py``.

``register(task)`` adds one; the tiny world's tasks (``twotower_train/eval/tiny_world_tasks.py``)
and the lm-eval suite's are registered on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from twotower_train.errors import TwoTowerError

BUILTIN_TASK_MODULES = (
    "twotower_train.eval.tiny_world_tasks",
    "twotower_train.eval.lm_eval_suite",
    "twotower_train.eval.agreement",
)


class UnknownTask(TwoTowerError, ValueError):
    """An eval task name nobody registered; the message is one line with the known names."""


@dataclass(frozen=True)
class GenerationTask:
    name: str
    examples: Callable[[int | None], list[dict]]
    metric: str = "exact_match"


@dataclass(frozen=True)
class PerplexityTask:
    name: str
    rows: Callable[..., torch.Tensor]  # (tokenizer, seq_len, limit) -> [N, seq_len]
    metric: str = "perplexity (two-tower: ELBO bound)"


@dataclass(frozen=True)
class ChoiceTask:
    name: str
    items: Callable[[int | None], list[dict]]
    metric: str = "acc (loglikelihood)"


@dataclass(frozen=True)
class LMEvalTask:
    name: str
    metric: str = "acc"  # the lm-eval metric the report quotes


@dataclass(frozen=True)
class AgreementTask:
    """Agreement of the two-tower decoding modes with the backbone's greedy output on
    held-out text (``eval/agreement.py``); reported beside the summary, not in it."""

    name: str
    metric: str = "agreement with AR greedy (first 64 tokens)"


Task = GenerationTask | PerplexityTask | ChoiceTask | LMEvalTask | AgreementTask
_REGISTRY: dict[str, Task] = {}
_builtins_loaded = False


def register(task: Task) -> Task:
    """Add ``task`` (its name must be new)."""
    if task.name in _REGISTRY and _REGISTRY[task.name] is not task:
        raise ValueError(f"an eval task named {task.name!r} is already registered")
    _REGISTRY[task.name] = task
    return task


def registry() -> dict[str, Task]:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN_TASK_MODULES:
            importlib.import_module(module)
    return _REGISTRY


def get(name: str) -> Task:
    tasks = registry()
    if name not in tasks:
        raise UnknownTask(f"unknown eval task {name!r}; expected one of {sorted(tasks)}")
    return tasks[name]


def check_tasks(names: list[str]) -> None:
    unknown = [n for n in names if n not in registry()]
    if unknown:
        raise UnknownTask(f"unknown eval task(s) {unknown}; expected some of {sorted(registry())}")


def of_kind(names: list[str], kind: type) -> list:
    """The registered tasks among ``names`` of one kind, in order."""
    return [get(n) for n in names if isinstance(get(n), kind)]


# -- the exact-match scorer --------------------------------------------------------------------


def generation_examples(tasks: list[GenerationTask], limit: int | None) -> list[dict]:
    """``{"task", "prompt", "answer"}`` examples of several generation tasks, task by task."""
    return [{**ex, "task": t.name} for t in tasks for ex in t.examples(limit)]


def generation_scores(
    generate, model, tokenizer, examples: list[dict], decode
) -> tuple[dict[str, float], object, list[list[int]]]:
    """Decode every example's prompt with ``generate`` (``generate.ar_generate`` or
    ``generate.diffusion_generate``, with ``decode``, a ``DecodeConfig``) and score it.

    Returns ``({task: exact-match accuracy}, GenerationStats, prompt ids)``."""
    prompt_ids = [tokenizer.encode(ex["prompt"], add_special_tokens=False) for ex in examples]
    outputs, stats = generate(model, prompt_ids, decode, tokenizer.eos_token_id)
    hits: dict[str, list[int]] = {}
    for ex, p, o in zip(examples, prompt_ids, outputs):
        text = continuation_text(tokenizer, p, o)
        hits.setdefault(ex["task"], []).append(int(exact_match(text, ex["answer"])))
    return {t: sum(h) / len(h) for t, h in hits.items()}, stats, prompt_ids


def exact_match(continuation: str, answer: str) -> bool:
    return continuation.strip() == answer.strip()


def continuation_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """Decode prompt + continuation together and strip the decoded prompt (a tokenizer may
    merge a leading space into the first new token)."""
    full = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=False)
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=False)
    if full.startswith(prompt):
        return full[len(prompt) :]
    return tokenizer.decode(new_ids, skip_special_tokens=False)


def split_continuation(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` after it, from the encoding of the
    whole string (so a space that BPE glues to the next word stays with the continuation).
    A trailing space of the context moves to the continuation, as lm-eval does."""
    n_space = len(context) - len(context.rstrip(" "))
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    if whole[: len(ctx)] != ctx:  # the boundary merged: fall back to separate encodings
        return ctx, tokenizer.encode(continuation, add_special_tokens=False)
    return ctx, whole[len(ctx) :]
