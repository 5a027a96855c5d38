"""What the run does with a trained model: score it and export it.

The objective only computes losses; the run composes evaluation and export here, for
either objective: a two-tower model is scored by the retained-performance harness
(``eval/harness.py``) and released (``release/``); an AR backbone (``train.objective=ar``)
is scored by greedy exact match and saved as a Hugging Face folder.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from twotower_train.backbones import (
    build_two_tower,
    load_backbone,
    load_release,
    load_tokenizer,
    release_tokenizer_with_mask,
)
from twotower_train.config import Config, EvalConfig, ExportConfig, Objective
from twotower_train.console import info
from twotower_train.decoding import DecodeConfig, ar_generate
from twotower_train.devices import resolve_device, resolve_dtype
from twotower_train.eval import tasks
from twotower_train.eval.harness import answer_block_metrics, evaluate
from twotower_train.model import ContextTower
from twotower_train.release import save_release
from twotower_train.release.export import save_hf_model
from twotower_train.run.metrics import MetricsLogger

UNTRAINED = "untrained"  # eval.release: the backbone with an untrained denoiser copy
VALIDATE_EXAMPLES = 64  # per generation task, for the answer-block validation metrics


@torch.no_grad()
def backbone_task_scores(model: nn.Module, tokenizer, cfg: EvalConfig) -> dict[str, float]:
    """Greedy exact match of a trained AR backbone ``model`` on the generation tasks of
    ``cfg.tasks``, decoded with the project's one AR decoder: ``{"task/NAME": acc}``."""
    gen_tasks = tasks.of_kind(cfg.tasks, tasks.GenerationTask)
    if not gen_tasks:
        return {}
    decode = DecodeConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    examples = tasks.generation_examples(gen_tasks, cfg.max_examples_per_task)
    scores, _, _ = tasks.generation_scores(
        ar_generate, ContextTower.of(model), tokenizer, examples, decode
    )
    return {f"task/{name}": acc for name, acc in scores.items()}


def answer_metrics(model: nn.Module, tokenizer, cfg: EvalConfig) -> dict[str, float]:
    """The decode-mirroring validation metrics (``harness.answer_block_metrics``) of a
    two-tower ``model`` on the first ``VALIDATE_EXAMPLES`` held-out examples of each
    generation task: ``val_answer_ce``, ``val_answer_acc``, ``val_answer_exact``."""
    gen = tasks.of_kind(cfg.tasks, tasks.GenerationTask)
    limit = min(cfg.max_examples_per_task, VALIDATE_EXAMPLES)
    examples = tasks.generation_examples(gen, limit)
    metrics = answer_block_metrics(model, tokenizer, examples, cfg.batch_size)
    return {f"val_{k}": v for k, v in metrics.items()}


def evaluate_trained(
    objective: Objective, model: nn.Module, tokenizer, cfg: EvalConfig, out_dir: Path, logger, step
) -> dict[str, float]:
    """Score the trained ``model`` of a run (rank 0, on its device) and log the scores at
    ``step``: the harness's report into ``out_dir`` for a two-tower model."""
    if objective == Objective.ar:
        scores = backbone_task_scores(model, tokenizer, cfg)
        if scores:
            logger.log(step, scores)
        return scores
    answers = answer_metrics(model, tokenizer, cfg)
    if answers:
        logger.log(step, answers)
    report = evaluate(model, tokenizer, cfg, out_dir, logger, step)
    return {**answers, "retained": report["retained"]}


def export_trained(
    objective: Objective,
    model: nn.Module,
    tokenizer,
    out_dir: Path,
    cfg: ExportConfig,
    run_info: dict | None = None,
) -> Path:
    """The trained ``model`` as a release folder (two-tower) or an HF folder (AR)."""
    if objective == Objective.ar:
        return save_hf_model(model, tokenizer, out_dir, dtype=cfg.dtype.torch)
    return save_release(
        model,
        release_tokenizer_with_mask(tokenizer, model.mask_token_id),
        out_dir,
        dtype=cfg.dtype.torch,
        run_info=run_info,
        backbone=cfg.backbone.value,
        max_shard_size=cfg.max_shard_size,
    )


def evaluate_run(cfg: Config) -> dict:
    """``python -m twotower_train mode=eval``: score a released two-tower model (default
    ``run.dir/release``; ``eval.release=untrained``: the run's backbone with a fresh copy as
    denoiser, the baseline before training) against its backbone on ``eval.device`` in
    ``eval.dtype``; the report goes to ``run.dir/eval/``."""
    run_dir = Path(cfg.run.dir)
    device = resolve_device(cfg.eval.device)  # before loading: a missing GPU fails fast
    dtype = resolve_dtype(cfg.eval.dtype)
    if cfg.eval.release == UNTRAINED:  # the baseline before any training
        tokenizer = load_tokenizer(cfg.backbone)
        backbone = load_backbone(cfg.backbone, tokenizer)
        model = build_two_tower(backbone, tokenizer, cfg.denoiser).eval().to(dtype=dtype)
    else:
        release = Path(cfg.eval.release) if cfg.eval.release else run_dir / "release"
        model, tokenizer = load_release(release, dtype=dtype)
    model = model.to(device)
    run_dir.mkdir(parents=True, exist_ok=True)
    logger = MetricsLogger(run_dir, cfg.logger, total_steps=cfg.train.steps, run_config=asdict(cfg))
    try:
        report = evaluate(model, tokenizer, cfg.eval, run_dir / "eval", logger)
    finally:
        logger.close()
    # Any of these is None where the tasks cannot give it (no generation task, a backbone
    # that scores 0, no speed rows): the summary line says so instead of failing.
    retained, per_forward, speed = (
        report[k] for k in ("retained", "tokens_per_forward", "speedup_vs_ar")
    )
    info(
        f"retained {'n/a' if retained is None else f'{retained:.4f}'} at "
        f"{'n/a' if per_forward is None else f'{per_forward:.2f}'} tokens per denoiser forward"
        f"{'' if speed is None else f', {speed:.2f}x AR tokens/s'}; {run_dir / 'eval'}"
    )
    return report
