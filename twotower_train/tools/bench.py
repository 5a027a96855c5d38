"""Micro-benchmarks: `python -m twotower_train.tools.bench COMMAND [options]`.

    data      packed tokens/s of the data loader: the shipped corpus (map-style cold and
              warm, streaming) and a generated 1 GB jsonl (streaming)
    doc-mask  two-tower training step time with and without document masking
    precision step time, MFU and loss parity of precision settings (TE / torchao FP8)
    decode    AR vs block-diffusion decoding: tokens/s, tokens per denoiser forward
    objectives  AR fine-tuning against the two-tower step of the same backbone, in turn
    memory    peak memory per rank (CPU: resident set) at setup and over training steps,
              beside `mode=plan`'s estimate; run it under torchrun for several ranks

Each command prints one line per measurement and a final JSON line. Add a command by
writing `add_X_args(parser)` and `run_X(args)` and listing them in COMMANDS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as the training CLI runs it


def _say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


# ---------------------------------------------------------------------------------------
# bench data
# ---------------------------------------------------------------------------------------


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seq-len", type=int, default=128, help="row length (tiny recipe: 128)")
    p.add_argument("--micro-batch-size", type=int, default=16, help="rows per batch")
    p.add_argument(
        "--tokens", type=float, default=10e6, help="packed tokens to time per streaming run"
    )
    p.add_argument("--jsonl-gb", type=float, default=1.0, help="size of the generated jsonl")
    p.add_argument("--jsonl", type=Path, default=None, help="time this jsonl instead")
    p.add_argument("--full", action="store_true", help="stream the whole jsonl, and cache it")
    p.add_argument("--skip-jsonl", action="store_true", help="only the shipped corpus")
    p.add_argument(
        "--train-tokens-per-s",
        type=float,
        default=None,
        help="training tokens/s to compare with (the tiny recipe's `tokens_per_s`)",
    )


def generate_jsonl(path: Path, size_bytes: int, seed: int = 0) -> None:
    """A jsonl of `size_bytes` whose documents are 1-30 tiny-world paragraphs/tasks each."""
    from twotower_train.tiny_world import load_train_documents

    pieces = load_train_documents()
    rng = random.Random(seed)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    written, i = 0, 0
    with open(tmp, "w", encoding="utf-8") as f:
        while written < size_bytes:
            lines = []
            for _ in range(1000):
                text = " ".join(rng.choices(pieces, k=rng.randint(1, 30)))
                lines.append(json.dumps({"id": i, "text": text}) + "\n")
                i += 1
            block = "".join(lines)
            f.write(block)
            written += len(block.encode())
    os.replace(tmp, path)


def _time_batches(loader, tokens: float, seq_len: int, b: int) -> tuple[float, int]:
    """Wall seconds and packed tokens of `next_batch` calls until `tokens` are produced."""
    n = max(1, int(tokens // (seq_len * b)))
    t0 = time.perf_counter()
    for _ in range(n):
        loader.next_batch()
    return time.perf_counter() - t0, n * seq_len * b


def _stream_all(loader, seq_len: int, b: int) -> tuple[float, int]:
    """Stream until the first source finishes one epoch."""
    source = loader.sources[0]
    t0 = time.perf_counter()
    n = 0
    while source.epoch == 0:
        loader.next_batch()
        n += 1
    return time.perf_counter() - t0, n * seq_len * b


def run_data(args: argparse.Namespace) -> dict:
    from twotower_train.config import DataConfig, DataSource, DataSourceConfig, SourceKind
    from twotower_train.data.loader import build_loader
    from twotower_train.data.sources import default_cache_dir
    from twotower_train.tiny_world import load_tokenizer

    tok = load_tokenizer()
    L, b = args.seq_len, args.micro_batch_size
    quiet = lambda msg: None  # noqa: E731
    results: dict[str, float] = {}

    def report(key: str, tokens: float, seconds: float, what: str) -> None:
        rate = tokens / seconds
        results[key] = rate
        extra = ""
        if args.train_tokens_per_s:
            extra = f" = {rate / args.train_tokens_per_s:.0f}x training"
        _say(f"{what}: {tokens / 1e6:.1f}M tokens in {seconds:.1f}s -> {rate:,.0f} tokens/s{extra}")

    kw = dict(seed=0, micro_batch_size=b, rank=0, world_size=1, log=quiet)
    with tempfile.TemporaryDirectory() as cache:
        cfg = DataConfig(seq_len=L, val_sequences=0, cache_dir=cache)
        t0 = time.perf_counter()
        loader = build_loader(cfg, tok, **kw)
        seconds = time.perf_counter() - t0
        rows = loader.sources[0]
        report(
            "tiny_world/map_cold",
            rows.num_rows * L,
            seconds,
            "shipped corpus, map-style, cold cache (tokenise + pack)",
        )
        loader = build_loader(cfg, tok, **kw)
        seconds, n = _time_batches(loader, args.tokens, L, b)
        report("tiny_world/map_warm", n, seconds, "shipped corpus, map-style, warm cache (batches)")
    cfg = DataConfig(seq_len=L, val_sequences=0, streaming=True)
    t0 = time.perf_counter()
    loader = build_loader(cfg, tok, **kw)
    seconds, n = _time_batches(loader, args.tokens, L, b)
    report("tiny_world/streaming", n, time.perf_counter() - t0, "shipped corpus, streaming")

    if not args.skip_jsonl:
        path = args.jsonl
        if path is None:
            size = int(args.jsonl_gb * 2**30)
            path = default_cache_dir() / "bench" / f"synthetic-{args.jsonl_gb:g}gb.jsonl"
            if not path.is_file() or path.stat().st_size < size:
                _say(f"generating {path} ({args.jsonl_gb:g} GB) ...")
                t0 = time.perf_counter()
                generate_jsonl(path, size)
                _say(f"generated in {time.perf_counter() - t0:.0f}s")
        src = DataSourceConfig(kind=SourceKind.jsonl, path=str(path))
        cfg = DataConfig(
            source=DataSource.mixture, sources=[src], seq_len=L, val_sequences=0, streaming=True
        )
        gb = path.stat().st_size / 2**30
        t0 = time.perf_counter()
        loader = build_loader(cfg, tok, **kw)
        if args.full:
            seconds, n = _stream_all(loader, L, b)
            what = f"{gb:.2f} GB jsonl, streaming, whole file"
        else:
            seconds, n = _time_batches(loader, args.tokens, L, b)
            what = f"{gb:.2f} GB jsonl, streaming, first {n / 1e6:.0f}M tokens"
        report("jsonl/streaming", n, time.perf_counter() - t0, what)
        if args.full:
            with tempfile.TemporaryDirectory() as cache:
                cfg.streaming, cfg.cache_dir = False, cache
                t0 = time.perf_counter()
                loader = build_loader(cfg, tok, **kw)
                seconds = time.perf_counter() - t0
                report(
                    "jsonl/map_cold",
                    loader.sources[0].num_rows * L,
                    seconds,
                    f"{gb:.2f} GB jsonl, map-style, cold cache",
                )
    return results


# ---------------------------------------------------------------------------------------
# bench doc-mask
# ---------------------------------------------------------------------------------------


def add_doc_mask_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="tiny")
    p.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--shape",
        default=None,
        help="a published architecture with random weights (as bench memory --shape)",
    )
    p.add_argument("overrides", nargs="*", help="key=value config overrides")


def _objective_run(args: argparse.Namespace):
    from twotower_train.config import compose
    from twotower_train.run.train import setup

    shape = shape_overrides(args.shape) if args.shape else []
    cfg = compose([f"recipe={args.recipe}", *shape, *args.overrides, "run.seed=0"])
    run = setup(cfg, run_dir=None)
    if not hasattr(run.objective, "doc_mask"):
        raise SystemExit(
            f"recipe {args.recipe}: objective {cfg.train.objective.value} is not two-tower"
        )
    return cfg, run


def _alternate(run, settings: dict[str, Callable], steps: int, warmup: int):
    """Median optimizer-step time per setting: every batch is run once under each setting
    (``settings[name](objective)`` switches it), round robin, on the same engine."""
    import torch

    engine, device = run.engine, run.device
    times: dict[str, list[float]] = {name: [] for name in settings}
    docs_per_row = []
    for i in range(warmup + steps):
        batch = {k: v.to(device) for k, v in run.loader.next_batch().items()}
        docs_per_row.append(float(batch["doc_ids"].max(dim=1).values.float().mean()) + 1)
        for name, switch in settings.items():
            switch(run.objective)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(run.grad_accum):
                out = engine(batch)
                engine.backward(out["loss"])
                engine.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return medians, statistics.mean(docs_per_row)


def _describe(args, cfg, run, docs: float) -> None:
    import torch

    _say(
        f"{args.recipe} on {run.device.type} ({torch.get_num_threads()} threads): seq_len "
        f"{cfg.data.seq_len}, block {cfg.denoiser.block_size}, micro batch "
        f"{cfg.train.micro_batch_size}, {docs:.1f} documents per row"
    )


def run_doc_mask(args: argparse.Namespace) -> dict:
    """Median optimizer-step time of the recipe's objective through its DeepSpeed engine,
    alternating doc_ids off / on every step (same batches, same engine)."""
    cfg, run = _objective_run(args)

    def doc_mask(on: bool):
        return lambda objective: setattr(objective, "doc_mask", on)

    medians, docs = _alternate(
        run, {"off": doc_mask(False), "on": doc_mask(True)}, args.steps, args.warmup
    )
    off, on = medians["off"], medians["on"]
    cost = on / off - 1
    _describe(args, cfg, run, docs)
    _say(f"step without doc mask: {off * 1e3:.1f} ms (median of {args.steps})")
    _say(f"step with doc mask:    {on * 1e3:.1f} ms (median of {args.steps}) -> {cost:+.1%}")
    return {"step_ms_off": off * 1e3, "step_ms_on": on * 1e3, "cost": cost}


# ---------------------------------------------------------------------------------------
# bench objectives
# ---------------------------------------------------------------------------------------


def run_objectives(args: argparse.Namespace) -> dict:
    """Median optimizer-step time of AR fine-tuning and the two-tower step of the same
    backbone, built side by side in one process and stepped in turn on the same batches, so
    load on a shared machine falls on both alike."""
    import torch

    from twotower_train.config import compose
    from twotower_train.run.train import setup

    shape = shape_overrides(args.shape) if args.shape else []
    runs = {}
    for objective in ("ar", "twotower"):
        overrides = [*shape, *args.overrides, f"train.objective={objective}", "run.seed=0"]
        runs[objective] = setup(compose([f"recipe={args.recipe}", *overrides]), run_dir=None)
    cfg = runs["twotower"].cfg
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(args.warmup + args.steps):
        batch = {k: v for k, v in runs["ar"].loader.next_batch().items()}
        for name, run in runs.items():
            step_batch = {k: v.to(run.device) for k, v in batch.items()}
            t0 = time.perf_counter()
            for _ in range(run.grad_accum):
                out = run.engine(step_batch)
                run.engine.backward(out["loss"])
                run.engine.step()
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    tokens = cfg.data.seq_len * cfg.train.micro_batch_size * runs["ar"].grad_accum
    rates = {name: tokens / statistics.median(t) for name, t in times.items()}
    _say(
        f"{args.shape or args.recipe} ({torch.get_num_threads()} threads, lm_head "
        f"{cfg.train.lm_head.value}): AR fine-tuning {rates['ar']:.1f} tokens/s, two-tower "
        f"{rates['twotower']:.1f} tokens/s, x{rates['twotower'] / rates['ar']:.2f} "
        f"(median of {args.steps})"
    )
    return {
        "shape": args.shape,
        "lm_head": cfg.train.lm_head.value,
        "tokens_per_s": rates,
        "ratio": rates["twotower"] / rates["ar"],
    }


# ---------------------------------------------------------------------------------------
# bench levers
# ---------------------------------------------------------------------------------------

add_levers_args = add_doc_mask_args


def _lever_settings(cfg) -> dict[str, Callable]:
    """The training levers of docs/objective.md, each as a switch on the objective (the rest
    of the recipe's config as it is)."""
    import copy

    base_diffusion, base_distill = copy.deepcopy(cfg.diffusion), copy.deepcopy(cfg.distill)
    bs = cfg.denoiser.block_size
    base_head = cfg.train.lm_head.value

    def setting(
        progress: float = 1.0, curriculum=(), distill_weight=None, lm_head=None, **diffusion
    ):
        def switch(objective) -> None:
            objective.lm_head = lm_head or base_head
            objective.diffusion = copy.deepcopy(base_diffusion)
            objective.distill = copy.deepcopy(base_distill)
            for key, value in diffusion.items():
                setattr(objective.diffusion, key, value)
            objective.diffusion.block_curriculum = list(curriculum)
            if distill_weight is not None:
                objective.distill.weight = distill_weight
            objective.progress = progress

        return switch

    settings = {
        "base": setting(),
        "suffix_prob=0.5": setting(suffix_prob=0.5),
        "complementary": setting(complementary=True),
        "distill weight 1": setting(distill_weight=1.0),
        f"lm_head={'full' if base_head == 'rows' else 'rows'}": setting(
            lm_head="full" if base_head == "rows" else "rows"
        ),
    }
    for small in (bs // 4, bs // 2):
        if small >= 1 and cfg.data.seq_len % small == 0:
            settings[f"block {small} (curriculum stage)"] = setting(0.0, (small,))
    return settings


def run_levers(args: argparse.Namespace) -> dict:
    """Median optimizer-step time of each training lever against the recipe as it is (same
    batches, same engine, round robin)."""
    cfg, run = _objective_run(args)
    medians, docs = _alternate(run, _lever_settings(cfg), args.steps, args.warmup)
    _describe(args, cfg, run, docs)
    base = medians["base"]
    for name, t in medians.items():
        _say(f"{name:<28s} {t * 1e3:8.1f} ms  x{t / base:.2f}  (median of {args.steps})")
    return {name: {"step_ms": t * 1e3, "ratio": t / base} for name, t in medians.items()}


# ---------------------------------------------------------------------------------------
# bench precision
# ---------------------------------------------------------------------------------------


def add_precision_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="tiny")
    p.add_argument("--steps", type=int, default=50, help="training steps per setting")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    p.add_argument(
        "--settings",
        nargs="+",
        default=["bf16", "te_bf16", "te_fp8", "torchao_fp8"],
        help="each a conf/precision option (te_fp8) or overrides (train.activation_checkpointing"
        "=true,precision=fp32); the first is the baseline",
    )
    p.add_argument(
        "--interleave", action="store_true", help="one step of each setting in turn (CPU)"
    )
    p.add_argument("overrides", nargs="*", help="key=value config overrides (all settings)")


def run_precision(args: argparse.Namespace) -> dict:
    """Each setting trains ``--steps`` steps from the same initial weights on the same batches
    and noise (same seed): median step time, tokens/s, MFU, peak GPU memory, and how far its
    losses stray from the first setting's. ``--interleave``: all settings built first, one
    step of each in turn (fair ratios on a machine whose load changes). A setting this
    machine cannot run stops the bench (one line) before any training."""
    import torch

    from twotower_train.config import ConfigError, compose
    from twotower_train.engine.distributed import device_for, init_distributed
    from twotower_train.engine.precision import plan_precision
    from twotower_train.run.train import setup

    if args.steps <= args.warmup:
        raise ConfigError(f"--steps {args.steps} must exceed --warmup {args.warmup}")

    def setting(name: str) -> list[str]:
        return name.split(",") if "=" in name else [f"precision={name}"]

    cfgs = {
        name: compose([f"recipe={args.recipe}", *args.overrides, *setting(name), "run.seed=0"])
        for name in args.settings
    }
    device = device_for(init_distributed())
    for cfg in cfgs.values():  # a setting this machine cannot run stops the bench here
        plan_precision(cfg.precision, device)
    cuda = device.type == "cuda"
    trace: dict[str, tuple[list[float], list[float]]] = {}  # name: (losses, step seconds)
    results: dict[str, dict] = {}
    if args.interleave:
        runs = {name: setup(cfg, run_dir=None) for name, cfg in cfgs.items()}
        rng = {name: _rng_state(cuda) for name in runs}  # each run draws its own noise
        for name in runs:
            trace[name] = ([], [])
        for i in range(args.steps):
            for name, run in runs.items():
                _set_rng_state(rng[name], cuda)
                loss, seconds = _precision_step(run, i, args.steps)
                rng[name] = _rng_state(cuda)
                trace[name][0].append(loss)
                trace[name][1].append(seconds)
        for name, run in runs.items():
            results[name] = _precision_result(args, name, run, *trace[name], trace, None)
        return results
    for name, cfg in cfgs.items():
        run = setup(cfg, run_dir=None)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        trace[name] = ([], [])
        for i in range(args.steps):
            loss, seconds = _precision_step(run, i, args.steps)
            trace[name][0].append(loss)
            trace[name][1].append(seconds)
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
        results[name] = _precision_result(args, name, run, *trace[name], trace, mem)
        del run
        if cuda:
            torch.cuda.empty_cache()
    return results


def _rng_state(cuda: bool):
    import torch

    return torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None


def _set_rng_state(state, cuda: bool) -> None:
    import torch

    torch.set_rng_state(state[0])
    if cuda:
        torch.cuda.set_rng_state(state[1])


def _precision_step(run, i: int, steps: int) -> tuple[float, float]:
    """One optimizer step of ``run``: (loss, wall seconds)."""
    import torch

    cuda = run.device.type == "cuda"
    run.objective.progress = i / steps
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = 0.0
    for _ in range(run.grad_accum):
        out = run.engine(run.next_batch())
        run.engine.backward(out["loss"])
        run.engine.step()
        loss += out["loss"].item() / run.grad_accum
    if cuda:
        torch.cuda.synchronize()
    return loss, time.perf_counter() - t0


def _precision_result(args, name, run, losses, seconds, trace, mem_gib) -> dict:
    step_s = statistics.median(seconds[args.warmup :])
    tokens_per_s = run.tokens_per_step / step_s
    base = trace[args.settings[0]][0]
    drift = max(abs(a - b) for a, b in zip(losses, base))
    r = {
        "backend": run.precision.backend.value,
        "fp8": run.precision.fp8,
        "step_ms": step_s * 1e3,
        "tokens_per_s": tokens_per_s,
        "mfu": run.mfu(tokens_per_s),
        "mem_gib": mem_gib,
        "final_loss": statistics.mean(losses[-5:]),
        "max_loss_diff_vs_baseline": drift,
    }
    mfu_text = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
    _say(
        f"{name} ({r['backend']}{' fp8' if r['fp8'] else ''}) on {run.device.type}: "
        f"{r['step_ms']:.1f} ms/step, {tokens_per_s:,.0f} tokens/s, mfu {mfu_text}, "
        f"last-5 loss {r['final_loss']:.4f}, max |loss - {args.settings[0]}| {drift:.4f}"
        + (f", peak {mem_gib:.2f} GiB" if mem_gib is not None else "")
    )
    return r


# ---------------------------------------------------------------------------------------
# bench decode (the code lives in twotower_train/eval/bench_decode.py)
# ---------------------------------------------------------------------------------------


def add_decode_args(p: argparse.ArgumentParser) -> None:
    from twotower_train.tools.bench_decode import add_args

    add_args(p)


def run_decode(args: argparse.Namespace) -> dict:
    """AR (context tower + KV cache) vs diffusion decoding on held-out tiny-world prompts."""
    from twotower_train.tools.bench_decode import run

    return run(args)


def add_compare_args(p: argparse.ArgumentParser) -> None:
    from twotower_train.tools.bench_compare import add_args

    add_args(p)


def run_compare(args: argparse.Namespace) -> dict:
    """This checkout against a git ref, in one process (twotower_train/bench_compare.py)."""
    from twotower_train.tools.bench_compare import run

    return run(args)


# ---------------------------------------------------------------------------------------
# bench memory
# ---------------------------------------------------------------------------------------


# Published architectures with random weights (``backbone.init=scratch``; tokens from the
# tiny world's tokenizer): what a step costs at a real shape, no download. ``micro_batch``
# x ``seq_len``: the shape this CPU measures (override with train.micro_batch_size= and
# data.seq_len=).
SHAPES: dict[str, dict] = {
    "smollm2_135m": dict(  # HuggingFaceTB/SmolLM2-135M
        config=dict(
            model_type="llama",
            hidden_size=576,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            intermediate_size=1536,
            vocab_size=49152,
            rope_theta=100000.0,
            rms_norm_eps=1.0e-5,
            tie_word_embeddings=True,
        ),
        micro_batch=4,
        seq_len=256,
    ),
    "qwen3_0_6b": dict(  # Qwen/Qwen3-0.6B (assets/configs/qwen3_0_6b)
        config=dict(
            model_type="qwen3",
            hidden_size=1024,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=3072,
            vocab_size=151936,
            rope_theta=1000000.0,
            rms_norm_eps=1.0e-6,
            tie_word_embeddings=True,
        ),
        micro_batch=1,
        seq_len=512,
    ),
    "gemma3_270m": dict(  # google/gemma-3-270m: 5 sliding-window layers to 1 global
        config=dict(
            model_type="gemma3_text",
            hidden_size=640,
            num_hidden_layers=18,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            intermediate_size=2048,
            vocab_size=262144,
            sliding_window=512,
            layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
            query_pre_attn_scalar=256,
            rope_theta=1000000.0,
            rms_norm_eps=1.0e-6,
            tie_word_embeddings=True,
        ),
        micro_batch=1,
        seq_len=512,
    ),
}

# ``--compare``: each a process of its own (a process's peak resident set is its own).
COMPARE_SETTINGS = {
    "AR fine-tuning, full logits": ["train.objective=ar", "train.lm_head=full"],
    "two-tower, full logits": ["train.objective=twotower", "train.lm_head=full"],
    "AR fine-tuning, scored rows": ["train.objective=ar", "train.lm_head=rows"],
    "two-tower, scored rows": ["train.objective=twotower", "train.lm_head=rows"],
}


def shape_overrides(name: str) -> list[str]:
    """Config overrides that train ``SHAPES[name]`` from scratch in fp32, ZeRO-0."""
    if name not in SHAPES:
        raise ValueError(f"unknown --shape {name!r}; expected one of {', '.join(SHAPES)}")
    shape = SHAPES[name]
    out = [
        "backbone.name_or_path=" + name + "_scratch",
        "backbone.init=scratch",
        "deepspeed=zero0",
        "precision=fp32",
        "data.val_sequences=0",
        f"data.seq_len={shape['seq_len']}",
        f"train.micro_batch_size={shape['micro_batch']}",
        "train.grad_accum_steps=1",
        "train.global_batch_size=null",
        "train.activation_checkpointing=false",
        "denoiser.block_size=16",
        "+backbone.config={}",
    ]
    for key, value in shape["config"].items():
        out.append(f"++backbone.config.{key}={json.dumps(value)}")
    return out


def add_memory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="qwen3_0_6b_smoke")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps measured")
    p.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default=None,
        help="a published architecture with random weights, fp32, ZeRO-0 (on --recipe tiny)",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="AR fine-tuning against the two-tower step, full logits against scored rows: "
        "one process per setting, then a table",
    )
    p.add_argument("overrides", nargs="*", help="key=value config overrides")


def _proc_status_gib(key: str) -> float | None:
    """``VmHWM`` (peak) or ``VmRSS`` (now) of this process from /proc (Linux), in GiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Restart this process's peak resident set (``VmHWM``) from its current size."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_gib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return _proc_status_gib("VmHWM") or 0.0


def run_memory(args: argparse.Namespace) -> dict:
    """Peak memory of each rank while building the run (model, template copy, engine) and
    while training ``--steps`` steps (peak restarted after setup), the median step time, and
    the plan's estimate for the same configuration at this world size."""
    import dataclasses

    import torch

    from twotower_train.config import PlanDevice, compose
    from twotower_train.run.plan import estimate, meta_model, model_shape
    from twotower_train.run.train import setup

    if args.compare:
        return _compare_memory(args)
    shape = shape_overrides(args.shape) if args.shape else []
    recipe = "tiny" if args.shape and args.recipe == "qwen3_0_6b_smoke" else args.recipe
    cfg = compose([f"recipe={recipe}", *shape, *args.overrides])
    before = _proc_status_gib("VmRSS") or 0.0  # libraries, before any model exists
    run = setup(cfg, run_dir=None)
    device = run.device
    setup_peak = _peak_gib(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif not _reset_peak():
        raise ValueError("bench memory needs /proc/self/clear_refs (Linux) on CPU")
    times = []
    run.engine.train()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        for _ in range(run.grad_accum):
            batch = run.next_batch()
            out = run.engine(batch)
            run.engine.backward(out["loss"])
            run.engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    mine = {
        "rank": run.env.rank,
        "libraries_gib": round(before, 3),
        "setup_peak_gib": round(setup_peak, 3),
        "step_peak_gib": round(_peak_gib(device), 3),
        "step_s": round(statistics.median(times), 3),
        "tokens_per_s": round(
            cfg.data.seq_len
            * cfg.train.micro_batch_size
            * run.grad_accum
            / statistics.median(times),
            1,
        ),
        "loss": float(out["loss"].detach()),
    }
    ranks = [mine]
    if torch.distributed.is_initialized():
        ranks = [None] * run.env.world_size
        torch.distributed.all_gather_object(ranks, mine)
    if run.env.rank != 0:
        return {"rank": run.env.rank}
    plan_cfg = dataclasses.replace(
        cfg,
        plan=dataclasses.replace(
            cfg.plan,
            gpus=run.env.world_size,
            device=PlanDevice.cuda if device.type == "cuda" else PlanDevice.cpu,
        ),
    )
    shape = model_shape(meta_model(plan_cfg))
    ckpt = cfg.train.activation_checkpointing
    planned = estimate(shape, plan_cfg, cfg.deepspeed.stage, checkpointing=ckpt).total / 2**30
    for r in ranks:
        net = r["step_peak_gib"] - (r["libraries_gib"] if device.type != "cuda" else 0.0)
        _say(
            f"rank {r['rank']}: setup peak {r['setup_peak_gib']:.2f} GiB, step peak "
            f"{r['step_peak_gib']:.2f} GiB ({net:.2f} above the {r['libraries_gib']:.2f} GiB "
            f"of libraries), plan {planned:.2f} GiB ({net / planned - 1:+.0%}), median step "
            f"{r['step_s']:.2f} s"
        )
    return {
        "recipe": recipe,
        "shape": args.shape,
        "objective": cfg.train.objective.value,
        "lm_head": cfg.train.lm_head.value,
        "world_size": run.env.world_size,
        "zero_stage": cfg.deepspeed.stage,
        "context_placement": cfg.deepspeed.context_placement.value,
        "plan_gib": round(planned, 3),
        "ranks": ranks,
    }


def _compare_memory(args: argparse.Namespace) -> dict:
    """``bench memory`` once per ``COMPARE_SETTINGS`` entry, each in its own process."""
    import subprocess

    base = [sys.executable, "-m", "twotower_train.tools.bench", "memory"]
    base += ["--recipe", args.recipe, "--steps", str(args.steps)]
    if args.shape:
        base += ["--shape", args.shape]
    # glibc returns freed tensors to the system: the resident set is the memory in use.
    # Each setting is a one-process run of its own: no rendezvous inherited from this one.
    rendezvous = (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    )
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", **os.environ}
    for key in rendezvous:
        env.pop(key, None)
    rows = {}
    for name, settings in COMPARE_SETTINGS.items():
        cmd = [*base, *args.overrides, *settings]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise ValueError(f"bench memory ({name}) failed (exit {proc.returncode}): {tail}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        rank = result["ranks"][0]
        rows[name] = {
            "step_peak_gib": rank["step_peak_gib"],
            "above_libraries_gib": round(rank["step_peak_gib"] - rank["libraries_gib"], 3),
            "tokens_per_s": rank["tokens_per_s"],
        }
        _say(
            f"{name:<28s} peak {rank['step_peak_gib']:6.2f} GiB  "
            f"{rank['tokens_per_s']:8.1f} tokens/s"
        )
    for head in ("full logits", "scored rows"):
        ar, tt = rows[f"AR fine-tuning, {head}"], rows[f"two-tower, {head}"]
        _say(
            f"two-tower / AR, {head}: peak x{tt['step_peak_gib'] / ar['step_peak_gib']:.2f}, "
            f"tokens/s x{tt['tokens_per_s'] / ar['tokens_per_s']:.2f}"
        )
    recipe = "tiny" if args.shape and args.recipe == "qwen3_0_6b_smoke" else args.recipe
    return {"shape": args.shape, "recipe": recipe, "settings": rows}


# ---------------------------------------------------------------------------------------

COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "data": ("packed tokens/s of the data loader", add_data_args, run_data),
    "doc-mask": ("step time with and without document masking", add_doc_mask_args, run_doc_mask),
    "levers": ("step time of each training lever (docs/objective.md)", add_levers_args, run_levers),
    "objectives": (
        "AR fine-tuning against the two-tower step, stepped in turn in one process",
        add_doc_mask_args,
        run_objectives,
    ),
    "precision": (
        "step time, MFU and loss parity of precision settings (TE, torchao FP8)",
        add_precision_args,
        run_precision,
    ),
    "decode": ("AR vs block-diffusion decoding tokens/s", add_decode_args, run_decode),
    "memory": ("peak memory per rank beside the plan's estimate", add_memory_args, run_memory),
    "compare": (
        "this checkout vs a git ref in one process: training step, decoding forwards",
        add_compare_args,
        run_compare,
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m twotower_train.tools.bench", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, run) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text)
        add_args(sub)
        sub.set_defaults(run=run)
    args = parser.parse_args(argv)
    from twotower_train.config import ConfigError

    try:
        result = args.run(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"twotower_train.tools.bench: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"bench": args.command, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
