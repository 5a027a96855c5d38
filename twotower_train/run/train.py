"""Training: ``setup`` builds everything a run needs; ``train`` is the loop.

    run = setup(cfg, run_dir)      run folder checked (run_dir.py), environment, tokenizer,
                                   loader, objective, engine, checkpoints (resumed), logger
    train(cfg)                     step, log, checkpoint, evaluate, preempt, export

Every step that ends a checkpoint interval checkpoints *before* it evaluates or exports, so
a failure there costs no training; a rerun of a finished run redoes what is missing.
``python -m twotower_train.tools.bench`` reuses ``setup`` (without a run folder).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import resource
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from twotower_train.backbones import (
    backbone_name,
    build_two_tower,
    load_backbone,
    load_tokenizer,
)
from twotower_train.config import (
    Config,
    ContextPlacement,
    InitMode,
    Objective,
    batch_arithmetic,
    to_yaml,
)
from twotower_train.console import info
from twotower_train.data.loader import Loader, build_loader
from twotower_train.engine.activation_checkpointing import checkpoint_trained_tower
from twotower_train.engine.checkpoint import CheckpointError, CheckpointManager
from twotower_train.engine.deepspeed_engine import (
    build_engine,
    deepspeed_config,
    trainable_state_dict,
)
from twotower_train.engine.distributed import (
    DistEnv,
    all_reduce_mean,
    any_rank,
    barrier,
    device_for,
    init_distributed,
)
from twotower_train.engine.mfu import device_peak_tflops, mfu, training_flops_per_sequence
from twotower_train.engine.precision import (
    PrecisionPlan,
    apply_precision,
    effective_dtype,
    plan_precision,
)
from twotower_train.engine.slurm import (
    SlurmJob,
    check_restart_count,
    end_of_allocation,
    requeue,
)
from twotower_train.engine.zero_init import (
    clone_partitioned,
    fill_meta,
    full_numel,
    gathered_state,
    meta_copy,
    tower_parts,
    zero3_construction,
)
from twotower_train.errors import TwoTowerError
from twotower_train.files import atomic_write_text
from twotower_train.objectives import CausalLMObjective, TwoTowerObjective
from twotower_train.release import publish
from twotower_train.run.evaluate import evaluate_trained, export_trained
from twotower_train.run.metrics import MetricsLogger
from twotower_train.run.run_dir import prepare_run_dir


def build_objective(cfg: Config, backbone, tokenizer, clone=copy.deepcopy) -> nn.Module:
    """The objective module of ``cfg.train.objective`` around ``backbone`` (``clone``: how
    the denoiser copies it, ``build_two_tower``)."""
    head = dict(lm_head=cfg.train.lm_head.value, chunk=cfg.train.lm_head_chunk)
    if cfg.train.objective == Objective.ar:
        return CausalLMObjective(backbone, **head)
    return TwoTowerObjective(
        build_two_tower(backbone, tokenizer, cfg.denoiser, clone),
        cfg.diffusion,
        cfg.distill,
        doc_mask=cfg.data.doc_mask,
        eos_id=tokenizer.eos_token_id,
        **head,
    )


def build_partitioned(cfg: Config, tokenizer, ds_config: dict) -> tuple[nn.Module, nn.Module]:
    """``(objective, template)`` built under ZeRO-3 construction (``engine/zero_init.py``):
    every parameter a partition from the start, the template on the meta device."""
    from transformers import AutoModelForCausalLM

    replicate = cfg.deepspeed.context_placement == ContextPlacement.replicate
    # Built whole first: a replicated context tower (not DeepSpeed's), and a scratch one
    # (its random weights drawn as any build draws them, then partitioned).
    whole = replicate or cfg.backbone.init == InitMode.scratch
    backbone = load_backbone(cfg.backbone, tokenizer) if whole else None
    with zero3_construction(ds_config):
        if backbone is None:
            backbone = load_backbone(cfg.backbone, tokenizer)
        elif not replicate:
            backbone = clone_partitioned(backbone)
        config = copy.deepcopy(backbone.config)
        objective = build_objective(cfg, backbone, tokenizer, clone=clone_partitioned)
    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        template = build_objective(cfg, shell, tokenizer).model.eval()
    return objective, template


def run_deepspeed_config(cfg: Config, grad_accum: int, world_size: int) -> dict:
    """The DeepSpeed config dict of the run (the engine's, and ZeRO-3 construction's)."""
    return deepspeed_config(
        cfg.deepspeed,
        micro_batch_size=cfg.train.micro_batch_size,
        grad_accum=grad_accum,
        world_size=world_size,
        grad_clip=cfg.optim.grad_clip,
        dtype=cfg.precision.dtype,
    )


def engine_for(module: nn.Module, cfg: Config, grad_accum: int = 1, world_size: int = 1):
    """``build_engine`` with the sections of the run config it reads."""
    return build_engine(
        module,
        cfg.optim,
        cfg.deepspeed,
        run_deepspeed_config(cfg, grad_accum, world_size),
        dtype=cfg.precision.dtype,
        total_steps=cfg.train.steps,
    )


@dataclass
class Run:
    """Everything the loop touches, built by ``setup``."""

    cfg: Config
    env: DistEnv
    device: torch.device
    run_dir: Path | None
    tokenizer: object
    loader: Loader
    objective: nn.Module  # the module the engine wraps
    # plain copy of objective.model to load trained weights into: on the meta device (no
    # memory) when the model was built partitioned or trains in fp32; else a whole fp32
    # copy, so the frozen tower's weights come back unrounded from a bf16 run
    template: nn.Module
    engine: object
    scheduler: object
    grad_accum: int
    global_batch: int
    ckpt: CheckpointManager | None
    logger: MetricsLogger
    step: int = 0
    resumed: bool = False
    n_params: tuple[int, int] = (0, 0)  # trainable, all
    precision: PrecisionPlan | None = None  # what runs (engine/precision.py)
    flops_per_sequence: float = 0.0  # model FLOPs of one training row (mfu.py)
    peak_tflops: float | None = None  # one device's peak, for `mfu` (None: not logged)
    peak_source: str = ""
    final: dict = field(default_factory=dict)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.cfg.data.seq_len

    def next_batch(self) -> dict[str, torch.Tensor]:
        return {
            k: v.to(self.device, non_blocking=True) for k, v in self.loader.next_batch().items()
        }

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation at ``tokens_per_s`` (all ranks) of this run (mfu.py)."""
        return mfu(
            self.flops_per_sequence,
            tokens_per_s,
            self.cfg.data.seq_len,
            self.env.world_size,
            self.peak_tflops,
        )

    def trained_model(self) -> nn.Module | None:
        """A plain fp32 copy of the trained model (collective under ZeRO-3: call on every
        rank): the untrained template with the trained parameters loaded into it. Built
        partitioned, only rank 0 gets it (the others: None)."""
        if next(self.template.parameters()).is_meta:  # built partitioned: gather everything
            parts = tower_parts(self.engine.module.model)
            state = gathered_state(parts, keep=self.env.is_main)
            # only rank 0 evaluates and exports
            return fill_meta(self.template, parts, state).eval() if self.env.is_main else None
        state = {k.removeprefix("model."): v for k, v in trainable_state_dict(self.engine).items()}
        model = copy.deepcopy(self.template)
        missing, unexpected = model.load_state_dict(state, strict=False)
        frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
        # tied weights (a head tied to the embedding) are loaded under their first name
        tied = {k for k, _ in model.named_parameters(remove_duplicate=False)}
        tied -= {k for k, _ in model.named_parameters()}
        if unexpected or set(missing) - frozen - tied - _buffers(model):
            raise RuntimeError(f"trained state does not fit the model: {unexpected or missing}")
        return model.eval()

    def save_checkpoint(self) -> None:
        state = {"global_batch_size": self.global_batch, "data": self.loader.state_dict()}
        self.ckpt.save(self.engine, self.step, state)


def _buffers(model: nn.Module) -> set[str]:
    return {k for k, _ in model.named_buffers()}


def setup(cfg: Config, run_dir: Path | None) -> Run:
    """Build a run. With ``run_dir``: check it against the config (``run.resume``,
    ``run_dir.py``), write ``config.yaml``, resume from its latest checkpoint, log to
    ``metrics.jsonl``; None: nothing is written."""
    env = init_distributed(timeout_s=cfg.run.dist_timeout_s)
    device = device_for(env)
    # The dtype this machine trains in (bf16 on a CPU without native bf16 runs fp32).
    dtype, dtype_note = effective_dtype(cfg.precision, device)
    if dtype != cfg.precision.dtype:
        cfg = dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, dtype=dtype))
        if env.is_main:
            info(dtype_note)
    # Before anything is built or written: a rerun that trains differently is refused here.
    folder = prepare_run_dir(cfg, run_dir) if run_dir is not None else None
    # What this machine runs for `precision`: FP8 it cannot run stops here, before any work.
    precision = plan_precision(cfg.precision, device)
    if precision.note and env.is_main:
        info(precision.note)
    grad_accum, global_batch = batch_arithmetic(cfg.train, env.world_size)

    torch.manual_seed(cfg.run.seed)  # identical init on every rank
    tokenizer = load_tokenizer(cfg.backbone)
    # Data first: bad input fails in seconds, before the model is built.
    two_tower = cfg.train.objective == Objective.twotower
    loader = build_loader(
        cfg.data,
        tokenizer,
        seed=cfg.run.seed,
        micro_batch_size=cfg.train.micro_batch_size,
        rank=env.rank,
        world_size=env.world_size,
        block_size=cfg.denoiser.block_size if two_tower else None,
        log=info if env.is_main else None,
    )
    template = None
    if cfg.deepspeed.stage == 3 and cfg.deepspeed.zero_init:
        ds_config = run_deepspeed_config(cfg, grad_accum, env.world_size)
        objective, template = build_partitioned(cfg, tokenizer, ds_config)
    else:
        objective = build_objective(cfg, load_backbone(cfg.backbone, tokenizer), tokenizer)
    # Written once tokenizer, data and model are built: a run that cannot start leaves nothing.
    if folder is not None and env.is_main:
        folder.commit(to_yaml(cfg))
    barrier()
    if template is None and cfg.precision.dtype.torch == torch.float32:
        template = meta_copy(objective.model).eval()  # the live weights are exact: no copy
    elif template is None:
        template = copy.deepcopy(objective.model).eval()  # fp32 (context_dtype kept), CPU
    n_params = (
        sum(full_numel(p) for p in objective.parameters() if p.requires_grad),
        sum(full_numel(p) for p in objective.parameters()),
    )
    passes = 2 if two_tower and cfg.diffusion.complementary else 1
    flops = training_flops_per_sequence(template, cfg.data.seq_len, passes)
    # Applied to the model from outside, after the plain template copy, before DeepSpeed.
    objective.to(device)
    autocast = apply_precision(objective.model, cfg.precision, precision)
    if cfg.train.activation_checkpointing:
        checkpoint_trained_tower(objective.model, autocast)
    peak, peak_source = None, ""
    if env.is_main:
        peak, peak_source = device_peak_tflops(
            device, cfg.precision.dtype.torch, precision.fp8, cfg.train.peak_tflops
        )
    engine, _, scheduler = engine_for(objective, cfg, grad_accum, env.world_size)
    torch.manual_seed(cfg.run.seed + 1000 * env.rank)  # per-rank noise from here on

    run = Run(
        cfg=cfg,
        env=env,
        device=device,
        run_dir=run_dir,
        tokenizer=tokenizer,
        loader=loader,
        objective=objective,
        template=template,
        engine=engine,
        scheduler=scheduler,
        grad_accum=grad_accum,
        global_batch=global_batch,
        ckpt=None,
        logger=MetricsLogger(
            run_dir or Path("."),
            cfg.logger,
            total_steps=cfg.train.steps,
            run_config=asdict(cfg),
            enabled=env.is_main and run_dir is not None,
        ),
        n_params=n_params,
        precision=precision,
        flops_per_sequence=flops,
        peak_tflops=peak,
        peak_source=peak_source,
    )
    if run_dir is not None:
        run.ckpt = CheckpointManager(run_dir / "checkpoints", env, cfg.train.keep_last)
        _resume(run)
    return run


def _resume(run: Run) -> None:
    tag = run.ckpt.latest_tag()  # none after run.resume=restart: the old run was moved aside
    if tag is not None:
        state = run.ckpt.load(run.engine, tag)
        if state["global_batch_size"] != run.global_batch:
            raise CheckpointError(
                f"checkpoint {tag} was trained with global batch {state['global_batch_size']}, "
                f"this run has {run.global_batch}"
            )
        run.step, run.resumed = state["step"], True
        run.loader.load_state_dict(state["data"])
    if run.env.is_main:
        _truncate_metrics(run.run_dir / "metrics.jsonl", run.step)
        run.logger.reopen()  # the file may have been replaced


def train(cfg: Config) -> dict[str, float]:
    preempt = PreemptionFlag()  # before setup: a signal during setup stops at the first step
    job = SlurmJob.from_env()
    check_restart_count(job, cfg.slurm.max_requeues)
    run = setup(cfg, Path(cfg.run.dir))
    engine, t = run.engine, cfg.train
    _announce(run)
    meter = StepMeter(run.step)
    over_time = stop = False
    if run.step == t.steps and t.eval_at_end and not _evaluated(run):
        _evaluate(run, last=True)  # a finished run whose final evaluation did not complete
    engine.train()
    while run.step < t.steps:
        run.objective.progress = run.step / t.steps  # a function of the step: resumes exactly
        for _ in range(run.grad_accum):
            out = engine(run.next_batch())
            engine.backward(out["loss"])
            engine.step()
            meter.add(out, run.grad_accum)
        run.step += 1

        if run.step % t.log_every == 0 or run.step == t.steps:
            _log_step(run, meter)
        over_time = bool(t.time_limit_s) and any_rank(meter.elapsed() > t.time_limit_s, run.device)
        last = run.step == t.steps or over_time
        stop = any_rank(preempt.raised is not None, run.device)
        # Checkpoint first: an evaluation or export that fails costs no training.
        if run.step % t.ckpt_every == 0 or last or stop:
            run.save_checkpoint()
        if (t.eval_every and run.step % t.eval_every == 0 and not stop) or (last and t.eval_at_end):
            _evaluate(run, last)
            meter.restart_window()  # evaluation time is not training throughput
        if stop:
            if run.env.is_main:
                info(f"{preempt.raised or 'signal'}: checkpoint saved at step {run.step}, exiting")
            break
        if t.stop_after and run.step - meter.start_step >= t.stop_after:
            break
        if over_time:
            if run.env.is_main:
                info(f"train.time_limit_s={t.time_limit_s:g} reached at step {run.step}")
            break

    finished = run.step == t.steps or over_time
    if finished:
        _export(run)
    barrier()
    if run.env.is_main:
        run.logger.summary(run.final)
        info(f"done: {run.step} steps in {meter.elapsed():.1f}s, run dir {run.run_dir}")
    run.logger.close()
    if stop:
        _come_back(run, preempt, job, finished)
    return run.final


# -- the loop's parts ------------------------------------------------------------------------


class PreemptionFlag:
    """Set by SIGTERM (preemption) / SIGUSR1 (Slurm's time-limit warning); checked once per
    step. ``raised``: the first signal's name; ``received``: every one's."""

    def __init__(self) -> None:
        self.raised: str | None = None
        self.received: set[str] = set()
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.raised = self.raised or signal.Signals(signum).name
        self.received.add(signal.Signals(signum).name)


def _come_back(run: Run, preempt: PreemptionFlag, job: SlurmJob | None, finished: bool) -> None:
    """After a signal's checkpoint (complete on every rank): requeue the Slurm job on the
    time-limit warning, from rank 0 (engine/slurm.py); raises ``RequeueError`` at the limit."""
    signals = {s for s in ("SIGTERM", "SIGUSR1") if any_rank(s in preempt.received, run.device)}
    if end_of_allocation(signals, job, run.cfg.slurm.max_requeues, finished=finished):
        if run.env.is_main:
            requeue(job)
            info(
                f"requeued Slurm job {job.job_id} (requeue {job.restart_count + 1} of at most "
                f"{run.cfg.slurm.max_requeues}); it resumes from step {run.step}"
            )
        barrier()  # no rank exits before the requeue: srun may end the step when one does


class StepMeter:
    """Sums of the objective's outputs over a logging window, and the time it took."""

    def __init__(self, start_step: int) -> None:
        self.start_step = start_step
        self.t_start = time.perf_counter()
        self.restart_window()

    def restart_window(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.t0 = time.perf_counter()

    def add(self, out: dict[str, torch.Tensor], grad_accum: int) -> None:
        """One micro-batch's outputs (averaged over the accumulation steps), summed on their
        device: no host sync per micro-step (``means`` reads them, at log steps only)."""
        for k, v in out.items():
            v = v.detach().float() / grad_accum
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.steps += 1 / grad_accum

    def means(self) -> dict[str, float]:
        """The window's mean of each output: one device-to-host copy for all of them."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        steps = round(self.steps)
        values = torch.stack([self.sums[k] for k in keys]).div(steps).tolist()
        return dict(zip(keys, values))

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start


def _announce(run: Run) -> None:
    if not run.env.is_main:
        return
    cfg, env = run.cfg, run.env
    trainable, total = run.n_params
    info(
        f"{cfg.recipe}: {cfg.train.objective.value} objective, {env.launcher} "
        f"x{env.world_size} on {run.device.type}, ZeRO-{cfg.deepspeed.stage} "
        f"{_precision_text(run)}, {trainable / 1e6:.2f}M of {total / 1e6:.2f}M params "
        f"trainable, seq_len {cfg.data.seq_len}, global batch {run.global_batch} "
        f"({cfg.train.micro_batch_size} x {run.grad_accum} x {env.world_size})"
        + (", activation checkpointing" if cfg.train.activation_checkpointing else "")
        + (f", resumed at step {run.step}" if run.resumed else "")
    )
    peak = f"{run.peak_tflops:.3g} TFLOP/s, " if run.peak_tflops else ""
    info(
        f"mfu: {run.flops_per_sequence / cfg.data.seq_len / 1e6:.3g} MFLOP per token over "
        f"{peak}{run.peak_source}"
    )


def _precision_text(run: Run) -> str:
    p, plan = run.cfg.precision, run.precision
    if plan is None or plan.backend.value == "torch":
        return p.dtype.value
    if not plan.fp8:
        return f"{p.dtype.value} {plan.backend.value}"
    recipe = p.recipe.value + (", context fp8" if p.context_fp8 else "")
    return f"{p.dtype.value} {plan.backend.value} fp8 ({recipe})"


def _log_step(run: Run, meter: StepMeter) -> None:
    steps = round(meter.steps)
    local = meter.means()
    avg = dict(zip(local, all_reduce_mean(list(local.values()), run.device)))
    if not math.isfinite(avg["loss"]):
        raise FloatingPointError(f"loss is {avg['loss']} at step {run.step}")
    grad_norm = run.engine.get_global_grad_norm()
    window = time.perf_counter() - meter.t0
    tokens_per_s = steps * run.tokens_per_step / window
    sec_per_step = meter.elapsed() / (run.step - meter.start_step)
    metrics = {
        **avg,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "lr": run.scheduler.get_last_lr()[0],
        "tokens_per_s": tokens_per_s,
        "mfu": run.mfu(tokens_per_s),
        "tokens": run.step * run.tokens_per_step,
        "eta_s": sec_per_step * (run.cfg.train.steps - run.step),
        "mem_gib": _memory_gib(run.device),
    }
    run.logger.log(run.step, metrics)
    run.final["loss"] = avg["loss"]
    meter.restart_window()


def _evaluate(run: Run, last: bool) -> None:
    """Validation loss, then the scores of the trained model (``run/evaluate.py``)."""
    cfg = run.cfg
    run.objective.progress = 1.0  # validate at the block size decoding uses
    evals = validation_metrics(
        run.engine,
        run.loader,
        sequences=cfg.data.val_sequences,
        micro_batch_size=cfg.train.micro_batch_size,
        seed=cfg.run.seed,
        device=run.device,
    )
    run.logger.log(run.step, evals)
    run.final.update(evals)
    if not cfg.eval.tasks:
        return
    model = run.trained_model()
    if run.env.is_main:
        out = run.run_dir / "eval"
        if not last:
            out = out / f"step_{run.step:08d}"
        scores = evaluate_trained(
            cfg.train.objective,
            model.to(run.device),
            run.tokenizer,
            cfg.eval,
            out,
            run.logger,
            run.step,
        )
        run.final.update(scores)


def _evaluated(run: Run) -> bool:
    """Whether the final evaluation's report is in the run folder (two-tower runs)."""
    if not run.cfg.eval.tasks or run.cfg.train.objective == Objective.ar:
        return True
    return (run.run_dir / "eval" / "report.json").is_file()


def _export(run: Run) -> None:
    cfg = run.cfg
    wanted = cfg.export.hf if cfg.train.objective == Objective.ar else cfg.export.release
    if not wanted:
        return
    model = run.trained_model()
    if run.env.is_main:
        out = run.run_dir / ("hf" if cfg.train.objective == Objective.ar else "release")
        export_trained(
            cfg.train.objective, model, run.tokenizer, out, cfg.export, run_info=_run_info(run)
        )
        info(f"exported the trained model to {out}")
        publish(out, cfg.export)


def _run_info(run: Run) -> dict:
    return run_info(run.cfg, run.run_dir, run.step, run.tokens_per_step, run.logger.wandb_url())


def run_info(cfg: Config, run_dir: Path, step: int, tokens_per_step: int, wandb_url=None) -> dict:
    """What a release's model card and backbone reference say about the run."""
    from omegaconf import OmegaConf

    evaluated = run_dir / "eval"
    return {
        "backbone": backbone_name(cfg.backbone),
        "revision": cfg.backbone.revision,
        "config": OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True),
        "steps": step,
        "tokens": step * tokens_per_step,
        "report": evaluated / "report.json",
        "plot": evaluated / "retained_vs_tokens_per_forward.png",
        "wandb_url": wandb_url,
    }


def release_from_checkpoint(cfg: Config) -> Path:
    """``mode=release``: the run's latest checkpoint (any ZeRO stage, written by any number
    of ranks) consolidated on one process and exported as ``run.dir/release`` (two-tower)
    or ``run.dir/hf`` (AR), as the end of training would."""
    from twotower_train.engine.checkpoint import consolidated_state

    run_dir = Path(cfg.run.dir)
    root = run_dir / "checkpoints"
    tag = CheckpointManager(root, DistEnv(0, 1, 0, "single")).latest_tag()
    if tag is None:
        raise CheckpointError(f"no checkpoint under {root} to release (train first)")
    trainer = json.loads((root / tag / "trainer_state.json").read_text())
    state = consolidated_state(root, tag)
    tokenizer = load_tokenizer(cfg.backbone)
    objective = build_objective(cfg, load_backbone(cfg.backbone, tokenizer), tokenizer)
    model = objective.model
    trained = {k.removeprefix("model."): v for k, v in state.items()}
    wanted = {k for k, p in model.named_parameters() if p.requires_grad}
    missing = wanted - set(trained)
    if missing:
        raise CheckpointError(
            f"checkpoint {root / tag} lacks trained weights: {sorted(missing)[:3]}"
        )
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name in wanted:
            params[name].copy_(trained[name].to(params[name].dtype))
    out = run_dir / ("hf" if cfg.train.objective == Objective.ar else "release")
    tokens_per_step = trainer.get("global_batch_size", 0) * cfg.data.seq_len
    info_ = run_info(cfg, run_dir, trainer["step"], tokens_per_step)
    export_trained(cfg.train.objective, model.eval(), tokenizer, out, cfg.export, run_info=info_)
    info(f"released step {trainer['step']} of {run_dir} to {out}")
    publish(out, cfg.export)
    return out


@torch.no_grad()
def validation_metrics(
    engine, loader: Loader, *, sequences: int, micro_batch_size: int, seed: int, device
) -> dict[str, float]:
    """Objective metrics on held-out rows, with fixed noise (same masks every time)."""
    batches = loader.validation_batches(sequences, micro_batch_size)
    if not batches:
        return {}
    engine.eval()
    sums: dict[str, float] = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + 7)
        for batch in batches:
            out = engine({k: v.to(device) for k, v in batch.items()})
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v.float().item() / len(batches)
    engine.train()
    keys = sorted(sums)
    return dict(zip([f"val_{k}" for k in keys], all_reduce_mean([sums[k] for k in keys], device)))


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _truncate_metrics(path: Path, step: int) -> None:
    """After a resume, drop the records a killed run logged past its checkpoint. A torn last
    line (the process died while writing it) is dropped too; a torn line elsewhere is not
    this run's file any more and is refused."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                info(f"{path}: dropped a torn last line (the previous process died writing it)")
                break
            raise TwoTowerError(f"{path}: line {i + 1} is not JSON; fix or move the file") from None
        if record.get("step", 0) <= step:
            keep.append(line)
    if len(keep) != len(lines):
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))
