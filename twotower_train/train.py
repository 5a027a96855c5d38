"""The training loop: build, resume, step, log, evaluate, checkpoint, export."""

from __future__ import annotations

import copy
import json
import math
import resource
import signal
import time
from pathlib import Path

import torch

from twotower_train.backbones import load_backbone, load_tokenizer
from twotower_train.config import Config, DType, Objective, batch_arithmetic, to_yaml
from twotower_train.data.loader import build_loader
from twotower_train.engine.checkpoint import CheckpointManager
from twotower_train.engine.deepspeed_engine import build_engine, trainable_state_dict
from twotower_train.engine.distributed import (
    all_reduce_mean,
    any_rank,
    barrier,
    device_for,
    init_distributed,
)
from twotower_train.metrics import MetricsLogger, info
from twotower_train.model import TwoTowerModel
from twotower_train.objectives import CausalLMObjective, TwoTowerObjective


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1 (Slurm preemption); checked once per step."""

    def __init__(self) -> None:
        self.raised: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.raised = signal.Signals(signum).name


DTYPES = {DType.bf16: torch.bfloat16, DType.fp32: torch.float32}


def build_two_tower(cfg: Config, backbone, tokenizer) -> TwoTowerModel:
    """The two-tower model of a backbone, as the `denoiser` config section describes it."""
    if tokenizer.mask_token_id is None:
        raise ValueError("the tokenizer has no mask token; the denoiser needs one for [MASK]")
    d = cfg.denoiser
    return TwoTowerModel.from_backbone(
        backbone,
        block_size=d.block_size,
        mask_token_id=tokenizer.mask_token_id,
        denoiser_layers=d.layers,
        tie_denoiser_head=d.tie_head,
        mamba_bidirectional=d.mamba_bidirectional,
        time_conditioning=d.time_conditioning,
        context_dtype=DTYPES[d.context_dtype] if d.context_dtype else None,
        attn_impl=d.attn_impl,
        shift_logits=d.shift_logits,
    )


def build_objective(cfg: Config, backbone, tokenizer) -> torch.nn.Module:
    if cfg.train.objective == Objective.ar:
        return CausalLMObjective(backbone)
    return TwoTowerObjective(
        build_two_tower(cfg, backbone, tokenizer), cfg, eos_id=tokenizer.eos_token_id
    )


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _truncate_metrics(path: Path, step: int) -> None:
    """After a resume, drop the records a killed run logged past its checkpoint."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


@torch.no_grad()
def validation_metrics(engine, loader, cfg: Config, device) -> dict[str, float]:
    """Objective metrics on held-out rows, with fixed noise (same masks every time)."""
    batches = loader.validation_batches(cfg.data.val_sequences, cfg.train.micro_batch_size)
    if not batches:
        return {}
    engine.eval()
    sums: dict[str, float] = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.run.seed + 7)
        for batch in batches:
            out = engine({k: v.to(device) for k, v in batch.items()})
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v.float().item() / len(batches)
    engine.train()
    keys = sorted(sums)
    return dict(zip([f"val_{k}" for k in keys], all_reduce_mean([sums[k] for k in keys], device)))


def snapshot_backbone(engine, template):
    """A plain (non-DeepSpeed) fp32 copy of the trained HF model, for eval and export.

    Collective under ZeRO-3 (parameters are gathered): call on every rank.
    """
    state = trainable_state_dict(engine)
    model = copy.deepcopy(template).float()
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    return model.eval()


def trained_two_tower(engine, cfg: Config, tokenizer) -> TwoTowerModel:
    """A plain fp32 copy of the trained two-tower model (collective under ZeRO-3)."""
    state = trainable_state_dict(engine)
    model = build_two_tower(cfg, load_backbone(cfg.backbone, tokenizer), tokenizer)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    return model.eval()


def export_release(engine, cfg: Config, tokenizer, out: Path, env) -> None:
    from twotower_train.release import save_release

    model = trained_two_tower(engine, cfg, tokenizer)
    if env.is_main:
        dtype = torch.bfloat16 if cfg.precision.dtype == DType.bf16 else None
        save_release(model, tokenizer, out, dtype=dtype)
        info(f"released the two-tower model to {out}")


def task_metrics(model, tokenizer, device) -> dict[str, float]:
    """Held-out greedy exact match on the tiny world's tasks."""
    from twotower_train.data.tiny_world import load_test_tasks
    from twotower_train.eval.tiny_tasks import ar_exact_match

    acc = ar_exact_match(model.to(device), tokenizer, load_test_tasks())
    return {f"task/{k}": v for k, v in acc.items()}


def train(cfg: Config) -> dict[str, float]:
    env = init_distributed()
    device = device_for(env)
    run_dir = Path(cfg.run.dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    barrier()
    grad_accum, global_batch = batch_arithmetic(cfg.train, env.world_size)

    torch.manual_seed(cfg.run.seed)  # identical init on every rank
    tokenizer = load_tokenizer(cfg.backbone)
    # Data first: bad input fails in seconds, before the model is built.
    loader = build_loader(
        cfg.data,
        tokenizer,
        seed=cfg.run.seed,
        micro_batch_size=cfg.train.micro_batch_size,
        rank=env.rank,
        world_size=env.world_size,
        block_size=cfg.denoiser.block_size if cfg.train.objective == Objective.twotower else None,
    )
    backbone = load_backbone(cfg.backbone, tokenizer)
    template = copy.deepcopy(backbone) if cfg.train.objective == Objective.ar else None
    module = build_objective(cfg, backbone, tokenizer)
    n_train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in module.parameters())
    engine, _, scheduler = build_engine(module.to(device), cfg, grad_accum, env.world_size)
    torch.manual_seed(cfg.run.seed + 1000 * env.rank)  # per-rank noise from here on

    ckpt = CheckpointManager(run_dir / "checkpoints", env, cfg.train.keep_last)
    step = 0
    tag = ckpt.latest_tag() if cfg.run.resume else None
    if tag is not None:
        state = ckpt.load(engine, tag)
        if state["global_batch_size"] != global_batch:
            raise ValueError(
                f"checkpoint {tag} was trained with global batch {state['global_batch_size']}, "
                f"this run has {global_batch}"
            )
        step = state["step"]
        loader.load_state_dict(state["data"])
    logger = MetricsLogger(cfg, run_dir, enabled=env.is_main)
    if env.is_main:
        _truncate_metrics(run_dir / "metrics.jsonl", step)
        info(
            f"{cfg.recipe}: {cfg.train.objective.value} objective, {env.launcher} "
            f"x{env.world_size} on {device.type}, ZeRO-{cfg.deepspeed.stage} "
            f"{cfg.precision.dtype.value}, {n_train / 1e6:.2f}M of {n_all / 1e6:.2f}M params "
            f"trainable, seq_len {cfg.data.seq_len}, global batch {global_batch} "
            f"({cfg.train.micro_batch_size} x {grad_accum} x {env.world_size})"
            + (f", resumed at step {step}" if tag else "")
        )

    if env.is_main and (cfg.precision.te or cfg.precision.fp8):
        info(
            "precision.te/fp8: Transformer Engine linears are not wired into the model yet; "
            f"training with torch linears in {cfg.precision.dtype.value}"
        )
    preempt = PreemptionFlag()
    tokens_per_step = global_batch * cfg.data.seq_len
    start_step, t_start = step, time.perf_counter()
    sums: dict[str, float] = {}
    window_t0, window_steps = time.perf_counter(), 0
    final: dict[str, float] = {}
    over_time = False
    engine.train()
    while step < cfg.train.steps:
        for _ in range(grad_accum):
            batch = {k: v.to(device, non_blocking=True) for k, v in loader.next_batch().items()}
            out = engine(batch)
            engine.backward(out["loss"])
            engine.step()
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float().item() / grad_accum
        step += 1
        window_steps += 1

        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            elapsed = time.perf_counter() - window_t0
            keys = sorted(sums)
            avg = dict(zip(keys, all_reduce_mean([sums[k] / window_steps for k in keys], device)))
            grad_norm = engine.get_global_grad_norm()
            sec_per_step = (time.perf_counter() - t_start) / (step - start_step)
            metrics = {
                **avg,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": window_steps * tokens_per_step / elapsed,
                "tokens": step * tokens_per_step,
                "eta_s": sec_per_step * (cfg.train.steps - step),
                "mem_gib": _memory_gib(device),
            }
            if not math.isfinite(avg["loss"]):
                raise FloatingPointError(f"loss is {avg['loss']} at step {step}")
            logger.log(step, metrics)
            final.update(loss=avg["loss"])
            sums, window_t0, window_steps = {}, time.perf_counter(), 0

        over_time = bool(cfg.train.time_limit_s) and any_rank(
            time.perf_counter() - t_start > cfg.train.time_limit_s, device
        )
        last = step == cfg.train.steps or over_time
        eval_due = cfg.train.eval_every and step % cfg.train.eval_every == 0
        if eval_due or (last and cfg.train.eval_at_end):
            evals = validation_metrics(engine, loader, cfg, device)
            if cfg.data.source == "tiny_world" and template is not None:
                model = snapshot_backbone(engine, template)
                if env.is_main:
                    evals.update(task_metrics(model, tokenizer, device))
                del model
            logger.log(step, evals)
            final.update(evals)
            if template is None and cfg.eval.tasks:  # retained performance, tracked over training
                model = trained_two_tower(engine, cfg, tokenizer)
                if env.is_main:
                    from twotower_train.eval.harness import evaluate

                    out = run_dir / "eval" if last else run_dir / "eval" / f"step_{step:08d}"
                    report = evaluate(model.to(device), tokenizer, cfg.eval, out, logger, step)
                    final["retained"] = report["retained"]
                del model
            window_t0 = time.perf_counter()

        stop = any_rank(preempt.raised is not None, device)
        halt = cfg.train.stop_after and step - start_step >= cfg.train.stop_after
        if step % cfg.train.ckpt_every == 0 or last or stop:
            state = {"global_batch_size": global_batch, "data": loader.state_dict()}
            ckpt.save(engine, step, state)
        if stop:
            if env.is_main:
                info(f"{preempt.raised or 'signal'}: checkpoint saved at step {step}, exiting")
            break
        if halt:
            break
        if over_time:
            if env.is_main:
                info(f"train.time_limit_s={cfg.train.time_limit_s:g} reached at step {step}")
            break

    finished = step == cfg.train.steps or over_time
    if finished and cfg.export.hf and template is not None:
        model = snapshot_backbone(engine, template)
        if env.is_main:
            out = run_dir / "hf"
            if cfg.precision.dtype == DType.bf16:  # trained weights are bf16: store them so
                model = model.to(torch.bfloat16)
            model.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
            info(f"exported the trained model to {out}")
    if finished and cfg.export.release and template is None:
        export_release(engine, cfg, tokenizer, run_dir / "release", env)
    barrier()
    if env.is_main:
        logger.summary(final)
        info(f"done: {step} steps in {time.perf_counter() - t_start:.1f}s, run dir {run_dir}")
    logger.close()
    return final
