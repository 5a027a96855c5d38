"""``python -m twotower_train.generate RELEASE [PROMPT ...]``: decode from a released
two-tower model (diffusion, verified, or the backbone's AR) and print the decode stats."""

from __future__ import annotations

import torch

from twotower_train.decoding import ORDERS, DecodeConfig, ar_generate, diffusion_generate


def main(argv: list[str] | None = None) -> int:
    """``python -m twotower_train.generate RELEASE [PROMPT ...]``: continuations of the
    prompts (or of each line of stdin) from a released two-tower model, and the decode stats
    (stderr, or in each JSON line with ``--json``)."""
    import argparse
    import json
    import sys

    p = argparse.ArgumentParser(
        prog="python -m twotower_train.generate", description=main.__doc__.split("\n")[0]
    )
    p.add_argument("release", help="a released two-tower model folder")
    p.add_argument("prompts", nargs="*", help="prompts (none: one per line of stdin)")
    p.add_argument("--threshold", type=float, help="default: the release's (config.json)")
    p.add_argument("--max-new-tokens", type=int, help="default: the release's")
    p.add_argument("--order", choices=ORDERS, help="default: the release's")
    p.add_argument(
        "--backbone-path", help="a reference-only release's backbone folder (default: found)"
    )
    p.add_argument(
        "--device", help="cpu, cuda, cuda:N, mps (default: cuda when available, else cpu)"
    )
    p.add_argument("--dtype", default="fp32", help="weights: fp32 (default) or bf16")
    p.add_argument("--verify", action="store_true", help="lossless: the backbone verifies")
    p.add_argument("--ar", action="store_true", help="decode with the backbone (AR) instead")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    args = p.parse_intermixed_args(argv)

    from twotower_train.backbones import load_release
    from twotower_train.devices import resolve_device, resolve_dtype
    from twotower_train.errors import first_line
    from twotower_train.release import decoding_defaults

    prompts = args.prompts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    saved = decoding_defaults(args.release)
    chosen = {"threshold": args.threshold, "max_new_tokens": args.max_new_tokens}
    chosen["order"] = args.order
    cfg = DecodeConfig(
        **{
            k: saved.get(k, getattr(DecodeConfig, k)) if v is None else v for k, v in chosen.items()
        },
        verify=args.verify,
    )
    try:
        if not prompts:
            raise ValueError("no prompts (give them as arguments or one per line on stdin)")
        cfg.validate()
        device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
        model, tokenizer = load_release(args.release, dtype=dtype, backbone_path=args.backbone_path)
        model = model.to(device)
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"twotower_train.generate: error: {first_line(exc)}", file=sys.stderr)
        return 2
    ids = [tokenizer.encode(text) for text in prompts]
    with torch.no_grad():
        if args.ar:
            outs, stats = ar_generate(model, ids, cfg, tokenizer.eos_token_id)
        else:
            outs, stats = diffusion_generate(model, ids, cfg, tokenizer.eos_token_id)
    for prompt, out in zip(prompts, outs):
        text = tokenizer.decode(out)
        if args.json:
            print(json.dumps({"prompt": prompt, "continuation": text, "tokens": out}))
        else:
            print(text)
    mode = "AR" if args.ar else ("verified" if args.verify else f"diffusion γ {cfg.threshold}")
    summary = {
        "decoder": mode,
        **{k: round(v, 3) if isinstance(v, float) else v for k, v in stats.to_dict().items()},
    }
    if args.json:
        print(json.dumps({"stats": summary}))
    else:
        print(
            f"[{mode}] {stats.new_tokens} tokens, {stats.tokens_per_forward:.2f} per forward, "
            f"{stats.tokens_per_s:.1f} tokens/s",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
