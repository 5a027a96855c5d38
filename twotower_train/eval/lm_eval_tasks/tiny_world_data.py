"""Datasets of the local lm-eval tasks, built from the shipped tiny world (no network).

Referenced from the YAMLs next to this file as ``custom_dataset: !function
tiny_world_data.<name>``; lm-eval calls them with the task's metadata as keywords.
"""

from __future__ import annotations


def multiple_choice(**_) -> dict:
    """``tiny_world_mc``: the same items the built-in harness scores (``eval/tiny_world_tasks.py``)."""
    from datasets import Dataset, DatasetDict

    from twotower_train.eval.tiny_world_tasks import mc_examples

    return DatasetDict({"test": Dataset.from_list(mc_examples())})


def generation(**_) -> dict:
    """``tiny_world_gen``: held-out ``{task, prompt, answer}`` examples, tasks interleaved."""
    from datasets import Dataset, DatasetDict

    from twotower_train.tiny_world import TASKS, load_test_tasks

    per = {t: load_test_tasks(t) for t in TASKS}
    rows = [per[t][i] for i in range(max(map(len, per.values()))) for t in TASKS if i < len(per[t])]
    return DatasetDict({"test": Dataset.from_list(rows)})
