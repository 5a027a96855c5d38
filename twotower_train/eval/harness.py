"""The retained-performance harness: the same tasks for the backbone (AR decoding through the
context tower) and the two-tower model (block-diffusion decoding), side by side.

    from twotower_train.eval.harness import EvalConfig, evaluate
    report = evaluate(model, tokenizer, EvalConfig(max_examples_per_task=50), run_dir / "eval")
    report["retained"], report["tokens_per_forward"], report["speedup_vs_ar"]

What each task measures and how: docs/evaluation.md.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from twotower_train.config import EvalConfig as _EvalConfig
from twotower_train.console import progress, progress_bar
from twotower_train.decoding import (
    DecodeConfig,
    GenerationStats,
    ar_generate,
    diffusion_generate,
    length_groups,
)
from twotower_train.eval import likelihood, lm_eval_suite, tasks
from twotower_train.eval.agreement import agreement_prompts, load_passages, score_agreement
from twotower_train.eval.report import TaskScore, build_report, log_report, write_report
from twotower_train.model import TwoTowerModel
from twotower_train.model.mask_embedding import forbid_mask

EvalConfig = _EvalConfig  # the `eval:` section of the Hydra schema (config.py)


def _decode_cfg(
    cfg: EvalConfig, threshold: float, batch_size: int, verify: bool = False
) -> DecodeConfig:
    return DecodeConfig(
        threshold=threshold,
        steps_per_block=cfg.steps_per_block,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=batch_size,
        verify=verify,
        score=cfg.score.value,
        adjacent_threshold=cfg.adjacent_threshold,
        order=cfg.order.value,
    )


@torch.no_grad()
def answer_block_metrics(
    model: TwoTowerModel, tokenizer, examples: list[dict], batch_size: int = 32
) -> dict[str, float]:
    """How the denoiser does on the step decoding starts from: the prompt clean in the
    context tower's cache, the answer (+ EOS) opening a fully masked block. One denoiser
    forward per example; over the answer's first ``block_size`` positions:

    ``answer_ce`` (mean CE per position), ``answer_acc`` (argmax accuracy per position) and
    ``answer_exact`` (share of examples whose whole answer is the argmax at once).
    Training packs documents anywhere, so a prompt and its answer usually share a noisy
    block; this metric shows what decoding sees instead (docs/evaluation.md)."""
    was_training = model.training
    model.eval()
    bs, mask_id = model.block_size, model.mask_token_id
    device = next(model.parameters()).device
    pairs = []
    for ex in examples:
        prompt, answer = tasks.split_continuation(tokenizer, ex["prompt"], ex["answer"])
        pairs.append((prompt, (answer + [tokenizer.eos_token_id])[:bs]))
    ce_sum, hits, n_pos, exact = 0.0, 0, 0, 0
    for idx in length_groups([prompt for prompt, _ in pairs], batch_size):
        cache, _ = model.context_extend(
            None, torch.tensor([pairs[i][0] for i in idx], device=device), last_only=True
        )
        block = torch.full((len(idx), bs), mask_id, dtype=torch.long, device=device)
        t = torch.ones(len(idx), device=device) if model.config.time_conditioning else None
        logits = model.denoise_block(cache, block, t=t).float()
        logits = forbid_mask(logits, mask_id)
        logp = logits.log_softmax(-1)
        for row, i in enumerate(idx):
            target = torch.tensor(pairs[i][1], device=device)
            k = len(target)
            ce_sum -= float(logp[row, :k].gather(-1, target[:, None]).sum())
            right = logp[row, :k].argmax(-1) == target
            hits += int(right.sum())
            n_pos += k
            exact += int(right.all())
    model.train(was_training)
    if not pairs:
        return {}
    return {
        "answer_ce": ce_sum / n_pos,
        "answer_acc": hits / n_pos,
        "answer_exact": exact / len(pairs),
    }


def _generation(model, tokenizer, cfg: EvalConfig, gen_tasks: list[tasks.GenerationTask]):
    """Exact match per task for both towers, the threshold sweep, and the prompts used."""
    examples = tasks.generation_examples(gen_tasks, cfg.max_examples_per_task)
    thresholds = list(dict.fromkeys([cfg.threshold, *cfg.threshold_sweep]))
    desc = f"generation, {len(examples)} prompts: backbone, then {len(thresholds)} threshold(s)"
    runs: dict[float, tuple[dict[str, float], GenerationStats]] = {}
    # One step per whole decoding pass: a pass is not split, so its batches (and with them
    # its tokens) are those of a run without a bar.
    with progress_bar(desc, total=len(thresholds) + 1) as bar:
        backbone, _, prompt_ids = tasks.generation_scores(
            ar_generate, model, tokenizer, examples, _decode_cfg(cfg, cfg.threshold, cfg.batch_size)
        )
        bar.update()
        for th in thresholds:
            scores, stats, _ = tasks.generation_scores(
                diffusion_generate, model, tokenizer, examples, _decode_cfg(cfg, th, cfg.batch_size)
            )
            runs[th] = (scores, stats)
            bar.update()
    return backbone, runs, examples, prompt_ids


def _perplexity(model, tokenizer, cfg: EvalConfig, task: tasks.PerplexityTask) -> TaskScore:
    bs = model.block_size
    seq_len = -(-cfg.perplexity_seq_len // bs) * bs
    rows = task.rows(tokenizer, seq_len, cfg.max_examples_per_task)
    desc = f"{task.name}, {len(rows)} rows: backbone NLL, then {cfg.elbo_samples} ELBO draw(s)"
    per_sample: list[float] = []
    with progress_bar(desc, total=cfg.elbo_samples + 1) as bar:
        nll, n_tok = likelihood.ar_nll(model, rows, cfg.batch_size)
        bar.update()
        # Draw s depends on seed + s alone: one draw per call gives the values one call for
        # all of them would, and the mean below sums them in the same order.
        for s in range(cfg.elbo_samples):
            _, (draw,) = likelihood.diffusion_elbo(
                model,
                rows,
                samples=1,
                seed=cfg.seed + s,
                batch_size=cfg.batch_size,
                schedule=cfg.elbo_schedule.value,
            )
            per_sample.append(draw)
            bar.update()
    bound = sum(per_sample) / len(per_sample)
    ar_nll = nll / n_tok
    return TaskScore(
        task.name,
        task.metric,
        float(torch.tensor(ar_nll).exp()),
        float(torch.tensor(bound).exp()),
        higher_is_better=False,
        n=len(rows),
        extra={
            "backbone_nll_per_token": ar_nll,
            "twotower_elbo_per_token": bound,
            "twotower_elbo_samples": per_sample,
            "tokens": n_tok,
        },
    )


def _multiple_choice(model, tokenizer, cfg: EvalConfig, task: tasks.ChoiceTask) -> TaskScore:
    items = task.items(cfg.max_examples_per_task)
    requests = [
        tasks.split_continuation(tokenizer, item["prompt"], choice)
        for item in items
        for choice in item["choices"]
    ]
    accs = {}
    towers = (
        ("backbone", likelihood.ar_loglikelihood),
        ("twotower", likelihood.denoiser_loglikelihood),
    )
    # One step per tower: splitting the requests would change how they are batched.
    desc = f"{task.name}, {len(requests)} choices: backbone, then two-tower"
    for tower, fn in progress(towers, desc, total=len(towers)):
        scores = iter(fn(model, requests, cfg.batch_size))
        correct = 0
        for item in items:
            lps = [next(scores)[0] for _ in item["choices"]]
            correct += max(range(len(lps)), key=lps.__getitem__) == item["label"]
        accs[tower] = correct / len(items)
    return TaskScore(task.name, task.metric, accs["backbone"], accs["twotower"], n=len(items))


def _lm_eval_tasks(
    model, tokenizer, cfg: EvalConfig, suite: lm_eval_suite.Prepared
) -> list[TaskScore]:
    """The lm-eval tasks (``eval/lm_eval_suite.py``): lm-eval's definitions and metrics on
    local data, both towers through ``TwoTowerLM``; generation at the main threshold."""
    docs = sum(suite.n.values())
    desc = f"lm-eval {', '.join(suite.tasks)}, {docs} docs: backbone, then two-tower"
    with progress_bar(desc, total=2) as bar:
        return lm_eval_suite.score(
            model,
            tokenizer,
            suite,
            batch_size=cfg.batch_size,
            decode=_decode_cfg(cfg, cfg.threshold, cfg.batch_size),
            on_tower=lambda _: bar.update(),
        )


def _agreement(model, tokenizer, cfg: EvalConfig) -> tuple[TaskScore, dict, list[list[int]]]:
    """AR agreement on held-out text (``eval/agreement.py``) at the main threshold, and of
    the verified mode with ``eval.verify``."""
    passages = load_passages(cfg.agreement_data)
    prompts = agreement_prompts(
        passages, tokenizer, cfg.agreement_prompt_tokens, cfg.max_examples_per_task
    )
    verify = None
    if cfg.verify:
        verify = _decode_cfg(cfg, _verify_threshold(cfg), 1, verify=True)
    with progress_bar(f"ar_agreement on {len(prompts)} held-out prompts", total=1) as bar:
        row, out = score_agreement(
            model, tokenizer, prompts, _decode_cfg(cfg, cfg.threshold, cfg.batch_size), verify
        )
        bar.update()
    return row, out, prompts


def _verified_on_text(model, cfg: EvalConfig, agreement: dict, prompts, eos: int) -> dict:
    """Verified decoding where the suite has no generation task: its agreement with AR on
    the held-out prompts (1 by construction), tokens per step, and batch-1 speed vs AR."""
    row = agreement["verified"]
    speed = _speed(model, prompts, cfg, eos, verify=True)
    speedup = None
    if speed and speed["ar"]["tokens_per_s"] > 0:
        speedup = speed["diffusion"]["tokens_per_s"] / speed["ar"]["tokens_per_s"]
    return {
        "retained": row["agreement"],
        "tokens_per_step": row["tokens_per_step"],
        "mean_accepted": row["mean_accepted"],
        "speedup_vs_ar": speedup,
        "tokens_per_forward": row["tokens_per_forward"],
        "threshold": row["threshold"],
        "tasks": {"ar_agreement": row["agreement"]},
        "speed": speed,
    }


def _speed(
    model, prompt_ids: list[list[int]], cfg: EvalConfig, eos: int, verify: bool = False
) -> dict | None:
    """tokens/s of both decoders at batch 1 on the same prompts, interleaved (same machine
    state for both), after one warm-up call each. ``verify``: the diffusion side decodes
    verified."""
    prompts = prompt_ids[: cfg.speed_examples]
    if not prompts:
        return None
    dcfg = _decode_cfg(cfg, cfg.threshold, 1)
    vcfg = _decode_cfg(cfg, _verify_threshold(cfg) if verify else cfg.threshold, 1, verify=verify)
    ar_generate(model, prompts[:1], dcfg, eos)
    diffusion_generate(model, prompts[:1], vcfg, eos)
    ar_stats, dif_stats = [], []
    desc = f"speed{' (verified)' if verify else ''}, batch 1: AR and diffusion per prompt"
    for p in progress(prompts, desc, total=len(prompts)):
        ar_stats.append(ar_generate(model, [p], dcfg, eos)[1])
        dif_stats.append(diffusion_generate(model, [p], vcfg, eos)[1])
    return {
        "examples": len(prompts),
        "device": str(next(model.parameters()).device),
        "ar": GenerationStats.combine(ar_stats, ar=True).to_dict(),
        "diffusion": GenerationStats.combine(dif_stats).to_dict(),
    }


def _verify_threshold(cfg: EvalConfig) -> float:
    """The drafting threshold of verified decoding (a speed knob only: the output is the
    backbone's whatever the draft)."""
    return cfg.threshold if cfg.verify_threshold is None else cfg.verify_threshold


def _verified(model, tokenizer, cfg: EvalConfig, examples, backbone, prompt_ids) -> dict:
    """Verified decoding of the generation tasks: its scores (equal to the backbone's, by
    construction), tokens per step, accepted tokens, and batch-1 speed vs AR."""
    from twotower_train.eval.report import TaskScore, retained_ratios

    with progress_bar(f"verified decoding, {len(examples)} prompts", total=1) as bar:
        scores, stats, _ = tasks.generation_scores(
            diffusion_generate,
            model,
            tokenizer,
            examples,
            _decode_cfg(cfg, _verify_threshold(cfg), cfg.batch_size, verify=True),
        )
        bar.update()
    retained, _ = retained_ratios([TaskScore(t, "em", backbone[t], scores[t]) for t in scores])
    speed = _speed(model, prompt_ids, cfg, tokenizer.eos_token_id, verify=True)
    speedup = None
    if speed and speed["ar"]["tokens_per_s"] > 0:
        speedup = speed["diffusion"]["tokens_per_s"] / speed["ar"]["tokens_per_s"]
    return {
        "retained": retained,
        "tokens_per_step": stats.tokens_per_step,
        "mean_accepted": stats.mean_accepted,
        "speedup_vs_ar": speedup,
        "tokens_per_forward": stats.tokens_per_forward,
        "threshold": _verify_threshold(cfg),
        "tasks": scores,
        "speed": speed,
    }


def round_robin(examples: list[dict], prompt_ids: list[list[int]]) -> list[list[int]]:
    """Prompts taken round-robin over tasks, so a short speed subset covers every task."""
    per: dict[str, list[list[int]]] = {}
    for ex, p in zip(examples, prompt_ids):
        per.setdefault(ex["task"], []).append(p)
    lists = list(per.values())
    longest = max((len(x) for x in lists), default=0)
    return [x[i] for i in range(longest) for x in lists if i < len(x)]


@torch.no_grad()
def evaluate(
    model: TwoTowerModel,
    tokenizer,
    cfg: EvalConfig,
    out_dir: Path,
    logger=None,
    step: int | None = None,
) -> dict:
    """Score ``cfg.tasks`` for both towers; write ``report.json``, ``report.md`` and the
    sweep plot into ``out_dir``; log the summary through ``logger`` (``.log(step, dict)``,
    and W&B if ``logger.wandb``). Returns the report dict. Single process: call it on one
    rank with a plain (non-DeepSpeed) model."""
    tasks.check_tasks(cfg.tasks)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; decoding needs one to stop")
    t0 = time.perf_counter()
    # lm-eval's tasks on their local data, built first: missing data stops before any scoring
    lm_names = [t.name for t in tasks.of_kind(cfg.tasks, tasks.LMEvalTask)]
    suite = lm_eval_suite.prepare(lm_names, cfg.max_examples_per_task) if lm_names else None
    was_training = model.training
    model.eval()
    try:
        scores: list[TaskScore] = []
        gen_tasks = tasks.of_kind(cfg.tasks, tasks.GenerationTask)
        runs, speed, verified = {}, None, None
        if gen_tasks:
            backbone, runs, examples, prompt_ids = _generation(model, tokenizer, cfg, gen_tasks)
            main_scores = runs[cfg.threshold][0]
            for t in gen_tasks:
                n = sum(ex["task"] == t.name for ex in examples)
                scores.append(
                    TaskScore(t.name, t.metric, backbone[t.name], main_scores[t.name], n=n)
                )
            speed_prompts = round_robin(examples, prompt_ids)
            if cfg.speed_examples > 0:
                speed = _speed(model, speed_prompts, cfg, tokenizer.eos_token_id)
            if cfg.verify:
                verified = _verified(model, tokenizer, cfg, examples, backbone, speed_prompts)
        for task in tasks.of_kind(cfg.tasks, tasks.ChoiceTask):
            scores.append(_multiple_choice(model, tokenizer, cfg, task))
        if suite is not None:
            scores.extend(_lm_eval_tasks(model, tokenizer, cfg, suite))
        agreement = None
        if tasks.of_kind(cfg.tasks, tasks.AgreementTask):
            row, agreement, held_out = _agreement(model, tokenizer, cfg)
            scores.append(row)
            if not gen_tasks:  # speed and verified decoding on the held-out prompts
                eos = tokenizer.eos_token_id
                if cfg.speed_examples > 0:
                    speed = _speed(model, held_out, cfg, eos)
                if cfg.verify:
                    verified = _verified_on_text(model, cfg, agreement, held_out, eos)
        for task in tasks.of_kind(cfg.tasks, tasks.PerplexityTask):
            scores.append(_perplexity(model, tokenizer, cfg, task))
        sweep = _sweep_rows(scores, runs, cfg)
    finally:
        model.train(was_training)
    tokens_per_forward = runs[cfg.threshold][1].tokens_per_forward if runs else None
    if tokens_per_forward is None and agreement is not None:
        tokens_per_forward = agreement["diffusion"]["tokens_per_forward"]
    report = build_report(
        scores,
        tokens_per_forward=tokens_per_forward,
        speed=speed,
        sweep=sweep,
        decode={
            "threshold": cfg.threshold,
            "order": cfg.order.value,
            "score": cfg.score.value,
            "adjacent_threshold": cfg.adjacent_threshold,
            "block_size": model.block_size,
            "steps_per_block": cfg.steps_per_block or model.block_size,
            "max_new_tokens": cfg.max_new_tokens,
        },
        config=asdict(cfg),
        wall_s=time.perf_counter() - t0,
        verified=verified,
    )
    if agreement is not None:
        report["ar_agreement"] = agreement
    paths = write_report(report, Path(out_dir))
    log_report(report, paths, logger, step)
    return report


def _sweep_rows(scores: list[TaskScore], runs: dict, cfg: EvalConfig) -> list[dict]:
    """Retained at every swept threshold: generation scores from that threshold's decoding,
    the other ratio tasks (multiple choice) as they are -- decoding does not change them."""
    from twotower_train.eval.report import retained_ratios

    rows = []
    for th in sorted(set(cfg.threshold_sweep) | ({cfg.threshold} if runs else set())):
        if th not in runs:
            continue
        gen, stats = runs[th]
        swapped = [
            TaskScore(s.name, s.metric, s.backbone, gen.get(s.name, s.twotower), s.higher_is_better)
            for s in scores
        ]
        retained, mean_of_ratios = retained_ratios(swapped)
        rows.append(
            {
                "threshold": th,
                "tokens_per_forward": stats.tokens_per_forward,
                "retained": retained,
                "retained_mean_of_ratios": mean_of_ratios,
                "denoiser_forwards": stats.denoiser_forwards,
                "new_tokens": stats.new_tokens,
                "tasks": gen,
            }
        )
    return rows
