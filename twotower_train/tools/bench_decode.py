"""Decoding benchmark: AR (context tower + KV cache) vs block diffusion, tokens/s and tokens
per denoiser forward on the tiny world's held-out prompts.

    python -m twotower_train.tools.bench decode --backbone tiny_llama --batch-sizes 1 8
    python -m twotower_train.tools.bench_decode ...            (the same, standalone)

``--release PATH`` benchmarks a released two-tower model (``python -m twotower_train``
writes one to ``runs/<recipe>/release``). Without it the denoiser is a fresh copy of
``--backbone``: the speed is real, the tokens per forward are those of an untrained
denoiser.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--release", default=None, help="a released two-tower model folder")
    p.add_argument(
        "--backbone", default="tiny_llama", help="without --release: shipped name or local folder"
    )
    p.add_argument("--block-size", type=int, default=16, help="without --release")
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts per setting")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.8, 0.95])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    p.add_argument(
        "--order", choices=["prefix", "any"], default="prefix", help="diffusion commit order"
    )
    p.add_argument("--verify", action="store_true", help="also time verified decoding")
    p.add_argument(
        "--prompt-order",
        choices=["tasks", "round-robin"],
        default="tasks",
        help="which prompts: the first of each task in turn (tasks), or taken round-robin "
        "over the tasks, the harness's speed subset (round-robin)",
    )
    p.add_argument(
        "--text",
        default=None,
        help="prompts from held-out text instead of the tiny world's tasks: a jsonl file of "
        '{"text": ...} passages, each cut to its first --prompt-tokens tokens',
    )
    p.add_argument("--prompt-tokens", type=int, default=32, help="with --text")
    p.add_argument(
        "--hf-baseline",
        action="store_true",
        help="also time transformers' own cached greedy loop on the backbone (batch 1, "
        "alternating with AR through the framework): the framework's overhead",
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="where each decoder's time goes: prompt prefill, context-tower extensions, "
        "denoiser forwards, and the decoding loop around them",
    )


def _build(args):
    from twotower_train.backbones import load_release, load_two_tower
    from twotower_train.devices import resolve_device
    from twotower_train.model import TwoTowerConfig

    if args.release:
        model, tokenizer = load_release(args.release)
    else:
        model, tokenizer = load_two_tower(args.backbone, TwoTowerConfig(block_size=args.block_size))
    device = resolve_device(None)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    return model.to(device=device, dtype=dtype).eval(), tokenizer, device


class ForwardTimer:
    """Wraps ``model.context_extend`` and ``model.denoise_block`` on one model instance and
    adds up their wall time (synchronised on GPU) and calls by kind: ``prefill`` (a context
    pass from an empty cache: the prompt), ``context`` (extending a cache: AR's next token,
    a committed or verified block), ``denoiser``. The rest of a decoder's time is its loop."""

    KINDS = ("prefill", "context", "denoiser")

    def __init__(self, model) -> None:
        self.model = model
        self.reset()
        self._extend, self._denoise = model.context_extend, model.denoise_block
        model.context_extend = self._timed(
            self._extend, lambda a: "prefill" if a[0] is None else "context"
        )
        model.denoise_block = self._timed(self._denoise, lambda a: "denoiser")

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.KINDS, 0.0)
        self.calls = dict.fromkeys(self.KINDS, 0)

    def _timed(self, fn, kind_of):
        from twotower_train.decoding import _sync

        device = next(self.model.parameters()).device

        def timed(*args, **kwargs):
            _sync(device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync(device)
            kind = kind_of(args)
            self.seconds[kind] += time.perf_counter() - t0
            self.calls[kind] += 1
            return out

        return timed

    def close(self) -> None:
        del self.model.context_extend, self.model.denoise_block  # the class's own again


def _breakdown(timer: ForwardTimer, wall: float, tokens: int) -> dict:
    """Shares of ``wall`` by kind (and the loop), per-call milliseconds, calls per token."""
    spent = sum(timer.seconds.values())
    out = {"loop_share": (wall - spent) / wall}
    for kind in timer.KINDS:
        calls = timer.calls[kind]
        out[f"{kind}_share"] = timer.seconds[kind] / wall
        out[f"{kind}_ms_per_call"] = 1e3 * timer.seconds[kind] / calls if calls else 0.0
        out[f"{kind}_calls_per_token"] = calls / max(tokens, 1)
    return out


@torch.no_grad()
def hf_greedy(backbone, prompt: list[int], new_tokens: int, device) -> list[int]:
    """Transformers' own cached greedy decoding of one prompt (no EOS stop): the backbone's
    forward with a ``DynamicCache`` and ``logits_to_keep=1``, one token per step."""
    from transformers import DynamicCache

    ids = torch.tensor([prompt], device=device)
    cache = DynamicCache(config=backbone.config)
    out = []
    for _ in range(new_tokens):
        logits = backbone(
            input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1
        ).logits
        token = logits[:, -1].argmax(-1)
        out.append(int(token))
        ids = token[:, None]
    return out


def _hf_baseline(model, prompts, args, device) -> dict:
    """AR through the framework against ``hf_greedy``, prompt by prompt, alternating, at
    batch 1 with no EOS stop: tokens/s of each (median of ``--repeats``) and whether they
    decoded the same tokens."""
    from twotower_train.decoding import DecodeConfig, _sync, ar_generate

    cfg = DecodeConfig(max_new_tokens=args.max_new_tokens, batch_size=1, stop_at_eos=False)
    ours, theirs, same = [], [], True
    ar_generate(model, prompts[:1], cfg, None)
    hf_greedy(model.backbone, prompts[0], 2, device)  # warm-up
    for _ in range(args.repeats):
        t_ours = t_hf = 0.0
        for prompt in prompts:
            _sync(device)
            t0 = time.perf_counter()
            got = ar_generate(model, [prompt], cfg, None)[0][0]
            _sync(device)
            t_ours += time.perf_counter() - t0
            t0 = time.perf_counter()
            ref = hf_greedy(model.backbone, prompt, args.max_new_tokens, device)
            _sync(device)
            t_hf += time.perf_counter() - t0
            same = same and got == ref
        tokens = len(prompts) * args.max_new_tokens
        ours.append(tokens / t_ours)
        theirs.append(tokens / t_hf)
    row = {
        "framework_ar_tokens_per_s": statistics.median(ours),
        "transformers_tokens_per_s": statistics.median(theirs),
        "same_tokens": same,
    }
    row["ratio"] = row["framework_ar_tokens_per_s"] / row["transformers_tokens_per_s"]
    print(
        f"[bench] batch 1, AR through the framework {row['framework_ar_tokens_per_s']:.1f} "
        f"tokens/s, transformers' own cached loop {row['transformers_tokens_per_s']:.1f} "
        f"tokens/s: x{row['ratio']:.2f}, same tokens: {same}",
        flush=True,
    )
    return row


def run(args: argparse.Namespace) -> dict:
    from twotower_train.decoding import DecodeConfig, ar_generate, diffusion_generate
    from twotower_train.eval import tasks
    from twotower_train.eval.agreement import agreement_prompts, load_passages
    from twotower_train.eval.harness import round_robin

    model, tokenizer, device = _build(args)
    if args.text:
        passages = load_passages(args.text)
        prompts = agreement_prompts(passages, tokenizer, args.prompt_tokens, args.prompts)
    else:
        gen_tasks = tasks.of_kind(list(tasks.registry()), tasks.GenerationTask)
        examples = tasks.generation_examples(gen_tasks, -(-args.prompts // len(gen_tasks)))
        prompts = [tokenizer.encode(ex["prompt"], add_special_tokens=False) for ex in examples]
        if args.prompt_order == "round-robin":
            prompts = round_robin(examples, prompts)
    prompts = prompts[: args.prompts]
    eos = tokenizer.eos_token_id
    results = []
    for batch in args.batch_sizes:
        kinds = ["diffusion", "verified"] if args.verify else ["diffusion"]
        settings = [("ar", None)] + [(k, th) for th in args.thresholds for k in kinds]
        for kind, th in settings:
            cfg = DecodeConfig(
                threshold=th or 0.0,
                max_new_tokens=args.max_new_tokens,
                batch_size=batch,
                order=args.order,
                verify=kind == "verified",
            )
            gen = ar_generate if kind == "ar" else diffusion_generate
            calls = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
            gen(model, calls[0], cfg, eos)  # warm-up
            rates, stats, shares = [], None, []
            timer = ForwardTimer(model) if args.breakdown else None
            for _ in range(args.repeats):
                if timer:
                    timer.reset()
                parts = [gen(model, c, cfg, eos)[1] for c in calls]
                wall = sum(p.wall_s for p in parts)
                tokens = sum(p.new_tokens for p in parts)
                rates.append(tokens / wall)
                stats = parts
                if timer:
                    shares.append(_breakdown(timer, wall, tokens))
            if timer:
                timer.close()
            forwards = sum(
                p.context_forwards if kind == "ar" else p.denoiser_forwards for p in stats
            )
            row = {
                "decoder": kind,
                "threshold": th,
                "batch_size": batch,
                "tokens_per_s": statistics.median(rates),
                "tokens_per_forward": sum(p.new_tokens for p in stats) / max(forwards, 1),
                "new_tokens": sum(p.new_tokens for p in stats),
            }
            if shares:  # the repeat with the median rate
                row["breakdown"] = shares[rates.index(statistics.median_low(rates))]
            results.append(row)
            label = "AR" if kind == "ar" else f"{kind} gamma={th}"
            print(
                f"[bench] decode batch {batch:>3d} {label:<22s} "
                f"{row['tokens_per_s']:>9.1f} tokens/s  "
                f"{row['tokens_per_forward']:.2f} tokens/forward",
                flush=True,
            )
            if shares:
                b = row["breakdown"]
                print(
                    "[bench]   time: "
                    + ", ".join(
                        f"{k} {100 * b[f'{k}_share']:.0f}% ({b[f'{k}_ms_per_call']:.1f} ms x "
                        f"{b[f'{k}_calls_per_token']:.2f}/token)"
                        for k in ForwardTimer.KINDS
                    )
                    + f", loop {100 * b['loop_share']:.0f}%",
                    flush=True,
                )
    hf = _hf_baseline(model, prompts, args, device) if args.hf_baseline else None
    for row in results:
        ar = next(
            r["tokens_per_s"]
            for r in results
            if r["decoder"] == "ar" and r["batch_size"] == row["batch_size"]
        )
        row["speedup_vs_ar"] = row["tokens_per_s"] / ar
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "model": args.release or f"{args.backbone} (untrained denoiser)",
        "block_size": model.block_size,
        "dtype": args.dtype,
        "order": args.order,
        "prompts": len(prompts),
        "prompt_order": "text" if args.text else args.prompt_order,
        "max_new_tokens": args.max_new_tokens,
        "results": results,
        **({"transformers_baseline": hf} if hf else {}),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m twotower_train.tools.bench_decode")
    add_args(parser)
    print(json.dumps({"bench": "decode", **run(parser.parse_args(argv))}))


if __name__ == "__main__":
    main()
