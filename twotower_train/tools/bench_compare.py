"""``python -m twotower_train.tools.bench compare --ref REF``: this checkout against a git ref, in one
process.

A shared machine's background load moves step times by tens of percent between runs, so
before/after figures of a refactor are taken in ONE process, round robin on the same
inputs: the ref's ``twotower_train`` is extracted with ``git archive`` and imported under
another name (``twotower_train_ref``), both build the same model from the same backbone,
and each measurement alternates between them. Measured: the two-tower training forward +
backward (bf16 autocast, documents) and the decoding forwards at batch 1 (prompt prefill,
one AR step, one denoiser block, one context chunk).
"""

from __future__ import annotations

import argparse
import importlib
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

PACKAGE = "twotower_train"
REF_PACKAGE = "twotower_train_ref"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ref", required=True, help="git ref to compare against (e.g. a commit)")
    p.add_argument("--backbone", default="tiny_llama", help="shipped name or local folder")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--batch", type=int, default=16, help="training rows")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed training steps per side")
    p.add_argument("--calls", type=int, default=25, help="decoding calls per timed round")
    p.add_argument("--rounds", type=int, default=6, help="timed decoding rounds per side")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: as is)")


def extract_ref(ref: str, into: Path) -> None:
    """``twotower_train/`` of ``ref`` as ``into/twotower_train_ref`` with its own imports renamed."""
    repo = Path(__file__).resolve().parents[2]  # the checkout (this file: tools/ of the package)
    archive = into / "ref.tar"
    try:
        subprocess.run(
            ["git", "-C", str(repo), "archive", "--format=tar", "-o", str(archive), ref, PACKAGE],
            check=True,
            capture_output=True,
            text=True,
        )
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise ValueError(f"cannot extract {PACKAGE}/ at ref {ref!r}: {detail.strip()}") from None
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    (into / PACKAGE).rename(into / REF_PACKAGE)
    pattern = re.compile(rf"\b{PACKAGE}\b(?=[. ])")
    for path in (into / REF_PACKAGE).rglob("*.py"):
        path.write_text(pattern.sub(REF_PACKAGE, path.read_text()))


def _alternate(fns: dict, rounds: int, repeat: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, round robin (first round not timed)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(rounds + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(repeat):
                fn()
            if i:
                times[name].append((time.perf_counter() - start) / repeat)
    return {k: statistics.median(v) for k, v in times.items()}


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        extract_ref(args.ref, Path(tmp))
        sys.path.insert(0, tmp)
        try:
            return _compare(args)
        finally:
            sys.path.remove(tmp)
            for name in [m for m in sys.modules if m.split(".")[0] == REF_PACKAGE]:
                del sys.modules[name]


def _compare(args: argparse.Namespace) -> dict:
    sides = {}
    for name, package in (("ref", REF_PACKAGE), ("now", PACKAGE)):
        backbones = importlib.import_module(f"{package}.backbones")
        config = importlib.import_module(f"{package}.model").TwoTowerConfig
        torch.manual_seed(0)
        sides[name], _ = backbones.load_two_tower(
            args.backbone, config(block_size=args.block_size, context_dtype="bf16")
        )
    vocab = sides["now"].backbone.get_input_embeddings().num_embeddings
    mask = sides["now"].mask_token_id
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(3, vocab, (args.batch, args.seq_len), generator=g)
    noisy = torch.where(torch.rand(clean.shape, generator=g) < 0.5, mask, clean)
    docs = torch.cumsum((torch.rand(clean.shape, generator=g) < 0.05).long(), dim=1)

    def train_step(model):
        def step():
            with torch.autocast(clean.device.type, dtype=torch.bfloat16):
                out = model(clean, noisy, doc_ids=docs)
            out.float().logsumexp(-1).mean().backward()
            for p in model.denoiser.parameters():
                p.grad = None

        return step

    for model in sides.values():
        model.train()
    step = _alternate({k: train_step(m) for k, m in sides.items()}, args.steps)
    tokens = args.batch * args.seq_len
    result = {
        "ref": args.ref,
        "train_step_ms": {k: v * 1e3 for k, v in step.items()},
        "train_tokens_per_s": {k: tokens / v for k, v in step.items()},
        "train_ratio": step["now"] / step["ref"],
        "decode_ms": {},
    }
    _say(
        f"training fwd+bwd {args.batch} x {args.seq_len}, bf16, documents (median of {args.steps}):"
    )
    _say(
        f"  ref {step['ref'] * 1e3:.1f} ms, now {step['now'] * 1e3:.1f} ms -> x{result['train_ratio']:.3f}"
    )

    prompt = clean[:1, :24]
    block = torch.full((1, args.block_size), mask)
    with torch.no_grad():
        for model in sides.values():
            model.eval()
        caches = {k: m.context_extend(None, prompt, last_only=True)[0] for k, m in sides.items()}
        calls = {
            "prefill 24": lambda k: sides[k].context_extend(None, prompt, last_only=True),
            "AR step": lambda k: sides[k].context_extend(caches[k], prompt[:, :1], last_only=True),
            "denoiser block": lambda k: sides[k].denoise_block(caches[k], block),
            "context chunk": lambda k: sides[k].context_extend(
                caches[k], prompt[:, : args.block_size], last_only=True
            ),
        }
        _say(f"decoding forwards at batch 1 (median of {args.rounds} x {args.calls} calls):")
        for name, call in calls.items():
            t = _alternate({k: (lambda k=k, c=call: c(k)) for k in sides}, args.rounds, args.calls)
            ratio = t["now"] / t["ref"]
            result["decode_ms"][name] = {
                "ref": t["ref"] * 1e3,
                "now": t["now"] * 1e3,
                "ratio": ratio,
            }
            _say(
                f"  {name:<15s} ref {t['ref'] * 1e3:6.2f} ms, now {t['now'] * 1e3:6.2f} ms -> x{ratio:.2f}"
            )
    return result


def _say(msg: str) -> None:
    print(f"[bench compare] {msg}", file=sys.stderr, flush=True)
