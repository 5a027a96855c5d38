"""Decoding benchmark: AR (context tower + KV cache) vs block diffusion, tokens/s and tokens
per denoiser forward on the tiny world's held-out prompts.

    python -m twotower_train.bench decode --backbone tiny_llama --batch-sizes 1 8
    python -m twotower_train.eval.bench_decode ...            (the same, standalone)

The denoiser is a fresh copy of the backbone unless ``--denoiser-state`` points at a
safetensors file of trained ``denoiser.*`` weights, so by default the speed is real but
the tokens per forward are those of an untrained denoiser.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="tiny_llama", help="shipped name or local folder")
    p.add_argument("--denoiser-state", default=None, help="safetensors of denoiser weights")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts per setting")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.8, 0.95])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")


def _build(args):
    from twotower_train.backbones import load_backbone, load_tokenizer
    from twotower_train.config import BackboneConfig
    from twotower_train.model import TwoTowerModel

    bcfg = BackboneConfig(name_or_path=args.backbone)
    tokenizer = load_tokenizer(bcfg)
    model = TwoTowerModel.from_backbone(
        load_backbone(bcfg, tokenizer),
        block_size=args.block_size,
        mask_token_id=tokenizer.mask_token_id,
    )
    if args.denoiser_state:
        from safetensors.torch import load_file

        state = load_file(args.denoiser_state)
        model.load_state_dict(state, strict=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    return model.to(device=device, dtype=dtype).eval(), tokenizer, device


def run(args: argparse.Namespace) -> dict:
    from twotower_train.eval.tasks import GENERATION_TASKS, generation_examples
    from twotower_train.generate import DecodeConfig, ar_generate, diffusion_generate

    model, tokenizer, device = _build(args)
    per_task = -(-args.prompts // len(GENERATION_TASKS))
    examples = [ex for t in GENERATION_TASKS for ex in generation_examples(t, per_task)]
    prompts = [tokenizer.encode(ex["prompt"], add_special_tokens=False) for ex in examples]
    prompts = prompts[: args.prompts]
    eos = tokenizer.eos_token_id
    results = []
    for batch in args.batch_sizes:
        settings = [("ar", None)] + [("diffusion", th) for th in args.thresholds]
        for kind, th in settings:
            cfg = DecodeConfig(
                threshold=th or 0.0, max_new_tokens=args.max_new_tokens, batch_size=batch
            )
            gen = ar_generate if kind == "ar" else diffusion_generate
            calls = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
            gen(model, calls[0], cfg, eos)  # warm-up
            rates, stats = [], None
            for _ in range(args.repeats):
                parts = [gen(model, c, cfg, eos)[1] for c in calls]
                wall = sum(p.wall_s for p in parts)
                tokens = sum(p.new_tokens for p in parts)
                rates.append(tokens / wall)
                stats = parts
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
            results.append(row)
            label = "AR" if kind == "ar" else f"diffusion gamma={th}"
            print(
                f"[bench] decode batch {batch:>3d} {label:<22s} "
                f"{row['tokens_per_s']:>9.1f} tokens/s  "
                f"{row['tokens_per_forward']:.2f} tokens/forward",
                flush=True,
            )
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
        "backbone": args.backbone,
        "block_size": args.block_size,
        "dtype": args.dtype,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "results": results,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m twotower_train.eval.bench_decode")
    add_args(parser)
    print(json.dumps({"bench": "decode", **run(parser.parse_args(argv))}))


if __name__ == "__main__":
    main()
