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
from twotower_train.data.packing import BatchOrder
from twotower_train.data.sources import build_token_data
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
from twotower_train.objectives import CausalLMObjective


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1 (Slurm preemption); checked once per step."""

    def __init__(self) -> None:
        self.raised: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.raised = signal.Signals(signum).name


def build_objective(cfg: Config, backbone, tokenizer) -> torch.nn.Module:
    if cfg.train.objective == Objective.ar:
        return CausalLMObjective(backbone)
    raise ValueError(f"train.objective={cfg.train.objective.value} is not available yet")


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
def validation_loss(engine, rows, cfg: Config, env, device) -> float | None:
    """Mean loss over held-out rows; every rank runs the same number of forwards."""
    n = min(len(rows), cfg.data.val_sequences)
    per_rank = n // env.world_size
    if per_rank == 0:
        return None
    mine = rows[env.rank * per_rank : (env.rank + 1) * per_rank]
    engine.eval()
    total, count = 0.0, 0
    for i in range(0, per_rank, cfg.train.micro_batch_size):
        batch = torch.from_numpy(mine[i : i + cfg.train.micro_batch_size]).long().to(device)
        total += engine(batch)["loss"].float().item() * len(batch)
        count += len(batch)
    engine.train()
    return all_reduce_mean([total / count], device)[0]


def snapshot_backbone(engine, template):
    """A plain (non-DeepSpeed) fp32 copy of the trained HF model, for eval and export.

    Collective under ZeRO-3 (parameters are gathered): call on every rank.
    """
    state = trainable_state_dict(engine)
    model = copy.deepcopy(template).float()
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    return model.eval()


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
    backbone = load_backbone(cfg.backbone, tokenizer)
    template = copy.deepcopy(backbone) if cfg.train.objective == Objective.ar else None
    module = build_objective(cfg, backbone, tokenizer)
    n_train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in module.parameters())
    engine, _, scheduler = build_engine(module.to(device), cfg, grad_accum, env.world_size)
    torch.manual_seed(cfg.run.seed + 1000 * env.rank)  # per-rank noise from here on

    data = build_token_data(cfg.data, tokenizer, is_main=env.is_main)
    order = BatchOrder(
        len(data.train), cfg.run.seed, cfg.train.micro_batch_size, env.rank, env.world_size
    )
    ckpt = CheckpointManager(run_dir / "checkpoints", env, cfg.train.keep_last)
    step, position = 0, 0
    tag = ckpt.latest_tag() if cfg.run.resume else None
    if tag is not None:
        state = ckpt.load(engine, tag)
        if state["global_batch_size"] != global_batch:
            raise ValueError(
                f"checkpoint {tag} was trained with global batch {state['global_batch_size']}, "
                f"this run has {global_batch}"
            )
        step, position = state["step"], state["samples_consumed"]
    logger = MetricsLogger(cfg, run_dir, enabled=env.is_main)
    if env.is_main:
        _truncate_metrics(run_dir / "metrics.jsonl", step)
        info(
            f"{cfg.recipe}: {env.launcher} x{env.world_size} on {device.type}, "
            f"ZeRO-{cfg.deepspeed.stage} {cfg.precision.dtype.value}, {n_train / 1e6:.2f}M of "
            f"{n_all / 1e6:.2f}M params trainable, {len(data.train):,} sequences x "
            f"{cfg.data.seq_len}, global batch {global_batch} "
            f"({cfg.train.micro_batch_size} x {grad_accum} x {env.world_size})"
            + (f", resumed at step {step}" if tag else "")
        )

    preempt = PreemptionFlag()
    tokens_per_step = global_batch * cfg.data.seq_len
    start_step, t_start = step, time.perf_counter()
    window = {"loss": 0.0, "n": 0, "t0": time.perf_counter(), "steps": 0}
    final: dict[str, float] = {}
    engine.train()
    while step < cfg.train.steps:
        for _ in range(grad_accum):
            rows = order.indices(position)
            position += order.samples_per_micro_step
            batch = torch.from_numpy(data.train[rows]).long().to(device)
            out = engine(batch)
            engine.backward(out["loss"])
            engine.step()
            window["loss"] += out["loss"].detach().float().item()
            window["n"] += 1
        step += 1
        window["steps"] += 1

        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            elapsed = time.perf_counter() - window["t0"]
            (loss,) = all_reduce_mean([window["loss"] / window["n"]], device)
            grad_norm = engine.get_global_grad_norm()
            rate = window["steps"] * tokens_per_step / elapsed
            sec_per_step = (time.perf_counter() - t_start) / (step - start_step)
            metrics = {
                "loss": loss,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": rate,
                "tokens": step * tokens_per_step,
                "eta_s": sec_per_step * (cfg.train.steps - step),
                "mem_gib": _memory_gib(device),
            }
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}")
            logger.log(step, metrics)
            final.update(loss=loss)
            window = {"loss": 0.0, "n": 0, "t0": time.perf_counter(), "steps": 0}

        eval_due = cfg.train.eval_every and step % cfg.train.eval_every == 0
        if eval_due or (step == cfg.train.steps and cfg.train.eval_at_end):
            evals = {"val_loss": validation_loss(engine, data.val, cfg, env, device)}
            if cfg.data.source == "tiny_world" and template is not None:
                model = snapshot_backbone(engine, template)
                if env.is_main:
                    evals.update(task_metrics(model, tokenizer, device))
                del model
            logger.log(step, evals)
            final.update({k: v for k, v in evals.items() if v is not None})
            window["t0"] = time.perf_counter()

        stop = any_rank(preempt.raised is not None, device)
        halt = cfg.train.stop_after and step - start_step >= cfg.train.stop_after
        if step % cfg.train.ckpt_every == 0 or step == cfg.train.steps or stop:
            ckpt.save(
                engine,
                step,
                {"samples_consumed": position, "global_batch_size": global_batch},
            )
        if stop:
            if env.is_main:
                info(f"{preempt.raised or 'signal'}: checkpoint saved at step {step}, exiting")
            break
        if halt:
            break

    if step == cfg.train.steps and cfg.export.hf and template is not None:
        model = snapshot_backbone(engine, template)
        if env.is_main:
            out = run_dir / "hf"
            if cfg.precision.dtype == DType.bf16:  # trained weights are bf16: store them so
                model = model.to(torch.bfloat16)
            model.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
            info(f"exported the trained model to {out}")
    barrier()
    if env.is_main:
        logger.summary(final)
        info(f"done: {step} steps in {time.perf_counter() - t_start:.1f}s, run dir {run_dir}")
    logger.close()
    return final
