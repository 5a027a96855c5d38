"""The backbone's own greedy continuations, cached as a data source.

Distillation on sequences the AR model itself would write: for every prompt of a jsonl
source, the frozen backbone (the context tower) decodes greedily, and the prompt with its
continuation is written as a new jsonl record. Training on that file (a `data.sources`
entry, alone or mixed with the corpus) teaches the denoiser the backbone's mode rather than
the corpus's: where the two differ (a fact the backbone gets wrong, a style of its own),
the denoiser learns to agree with the model it is meant to speed up.

    python -m twotower_train.tools.distill_data --backbone tiny_nemotron_h --input tiny_world \\
        --out data/nh_greedy.jsonl --limit 50000

Each output record keeps the input record's fields, puts the continuation under
``--completion-field`` (default ``answer``; the input's value, if any, moves to
``corpus_<field>``), and sets ``text`` = prompt + continuation (a plain document; an input
``text`` that differs moves to ``corpus_text``), so the
file serves as plain documents (``field: text``) or as SFT pairs (``prompt_field`` /
``completion_field``). With ``--prompt-tokens N`` the prompts are cut from running text instead: the first ``N``
tokens of each record's ``--prompt-field`` (e.g. ``text`` of a corpus of passages; records
no longer than ``N`` tokens are skipped, as they leave nothing to continue), stored under
``prompt`` (an input ``prompt`` moves to ``corpus_prompt``).
Continuations that hit ``--max-new-tokens`` before the backbone's EOS
are dropped (``--keep-unfinished`` keeps them): packed with an EOS after them, they would
teach the denoiser to stop where the backbone does not. The file is written to a temporary
name and renamed, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from twotower_train.devices import resolve_device
from twotower_train.errors import TwoTowerError, first_line

TINY_WORLD = "tiny_world"


class DistillDataError(TwoTowerError, ValueError):
    """Bad input to ``distill_data`` (a one-line message for the command line)."""


def input_files(spec: str) -> list[Path]:
    """``tiny_world`` (the shipped corpus), or a file, folder or glob as a jsonl source takes
    them (``data.documents.resolve_files``)."""
    from twotower_train.config import SourceKind
    from twotower_train.data.documents import resolve_files

    if spec == TINY_WORLD:
        from twotower_train import tiny_world

        return [Path(tiny_world.CORPUS_DIR) / tiny_world.TRAIN_FILE]
    try:
        return resolve_files(spec, SourceKind.jsonl, "--input")
    except FileNotFoundError:
        raise DistillDataError(f"--input {spec}: no such file, or no .jsonl files there") from None


def read_prompts(files: list[Path], prompt_field: str, limit: int | None) -> tuple[list, int]:
    """The records holding ``prompt_field`` (at most ``limit``), and how many were skipped."""
    records, skipped = [], 0
    for path in files:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DistillDataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
                prompt = record.get(prompt_field) if isinstance(record, dict) else None
                if not isinstance(prompt, str) or not prompt:
                    skipped += 1
                    continue
                records.append(record)
                if limit is not None and len(records) >= limit:
                    return records, skipped
    if not records:
        raise DistillDataError(
            f"no record with a non-empty '{prompt_field}' field in {', '.join(map(str, files))}"
        )
    return records, skipped


@torch.no_grad()
def greedy_continuations(
    model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int
) -> list[tuple[list[int], bool]]:
    """``(token ids, finished)`` of the backbone's greedy continuation of each prompt
    (``finished``: it emitted EOS within ``max_new_tokens``; the EOS is not in the ids)."""
    from twotower_train.decoding import DecodeConfig, ar_generate
    from twotower_train.model.towers import ContextTower

    tower = ContextTower.of(model).eval()
    cfg = DecodeConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=0.0)
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    outs, _ = ar_generate(tower, ids, cfg, tokenizer.eos_token_id)
    return [(out, len(out) < max_new_tokens) for out in outs]


def cut_prompts(
    records: list[dict], tokenizer, prompt_field: str, prompt_tokens: int, limit: int | None
) -> tuple[list[dict], int]:
    """Records whose ``prompt_field`` is longer than ``prompt_tokens`` tokens, each with
    ``prompt`` = the text of its first ``prompt_tokens`` tokens (at most ``limit`` of them),
    and how many were too short."""
    out, short = [], 0
    for record in records:
        ids = tokenizer.encode(record[prompt_field], add_special_tokens=False)
        if len(ids) <= prompt_tokens:
            short += 1
            continue
        new = dict(record)
        if "prompt" in record and prompt_field != "prompt":
            new["corpus_prompt"] = record["prompt"]
        new["prompt"] = tokenizer.decode(ids[:prompt_tokens])
        out.append(new)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DistillDataError(
            f"no '{prompt_field}' field is longer than --prompt-tokens {prompt_tokens} tokens"
        )
    return out, short


def distill_records(
    records: list[dict],
    continuations: list[tuple[list[int], bool]],
    tokenizer,
    *,
    prompt_field: str,
    completion_field: str,
    keep_unfinished: bool,
) -> tuple[list[dict], dict]:
    """Output records and a summary (dropped, agreement with the input's completions)."""
    out, dropped = [], 0
    agree, total = Counter(), Counter()
    for record, (ids, finished) in zip(records, continuations):
        if not finished and not keep_unfinished:
            dropped += 1
            continue
        text = tokenizer.decode(ids)
        new = dict(record)
        if completion_field in record:
            corpus = record[completion_field]
            new[f"corpus_{completion_field}"] = corpus
            group = str(record.get("task", "all"))
            total[group] += 1
            agree[group] += int(corpus == text)
        new[completion_field] = text
        document = record[prompt_field] + text
        if "text" in record and record["text"] != document:
            new["corpus_text"] = record["text"]
        new["text"] = document
        out.append(new)
    agreement = {g: agree[g] / total[g] for g in sorted(total)}
    return out, {"dropped_unfinished": dropped, "agreement_with_corpus": agreement}


def write_jsonl(records: list[dict], path: Path) -> None:
    """All records, or nothing: written beside ``path`` and renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> dict:
    from twotower_train.backbones import load_backbone, load_tokenizer
    from twotower_train.config import BackboneConfig

    out = Path(args.out)
    if out.suffix != ".jsonl":
        raise DistillDataError(f"--out {out}: must end in .jsonl")
    cut = args.prompt_tokens is not None
    limit = None if cut else args.limit  # cutting skips short records: limit after it
    records, skipped = read_prompts(input_files(args.input), args.prompt_field, limit)
    cfg = BackboneConfig(name_or_path=args.backbone, revision=args.revision)
    tokenizer = load_tokenizer(cfg)
    short, prompt_field = 0, args.prompt_field
    if cut:
        records, short = cut_prompts(
            records, tokenizer, args.prompt_field, args.prompt_tokens, args.limit
        )
        prompt_field = "prompt"
    device = resolve_device(args.device)
    model = load_backbone(cfg, tokenizer).to(device)
    t0 = time.perf_counter()
    continuations = greedy_continuations(
        model,
        tokenizer,
        [r[prompt_field] for r in records],
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    seconds = time.perf_counter() - t0
    written, summary = distill_records(
        records,
        continuations,
        tokenizer,
        prompt_field=prompt_field,
        completion_field=args.completion_field,
        keep_unfinished=args.keep_unfinished,
    )
    if not written:
        raise DistillDataError(
            f"no continuation ended within --max-new-tokens {args.max_new_tokens}; raise it "
            "or pass --keep-unfinished"
        )
    write_jsonl(written, out)
    tokens = sum(len(ids) + int(done) for ids, done in continuations)
    return {
        "out": str(out),
        "backbone": args.backbone,
        "records": len(written),
        "skipped_without_prompt": skipped,
        "skipped_short": short,
        "new_tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "device": str(device),
        **summary,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m twotower_train.tools.distill_data",
        description="Cache the backbone's greedy continuations of a jsonl source's prompts as "
        "a jsonl data source (distillation on the AR model's own outputs).",
    )
    p.add_argument("--backbone", required=True, help="shipped name, local folder or hub id")
    p.add_argument("--revision", default=None)
    p.add_argument(
        "--input", required=True, help="'tiny_world', a .jsonl[.gz] file, a folder, or a glob"
    )
    p.add_argument("--out", required=True, help="the .jsonl file to write")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--completion-field", default="answer")
    p.add_argument("--limit", type=int, default=None, help="at most this many prompts")
    p.add_argument(
        "--prompt-tokens",
        type=int,
        default=None,
        help="cut each prompt to its first N tokens (prompts from running text, e.g. "
        "--prompt-field text); records no longer than N tokens are skipped",
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--keep-unfinished", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for name in ("limit", "prompt_tokens", "max_new_tokens", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            print(f"distill_data: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    try:
        summary = run(args)
    except Exception as exc:  # one line, non-zero exit, nothing written
        print(f"distill_data: {first_line(exc)}", file=sys.stderr)
        return 1
    agreement = ", ".join(f"{k} {v:.1%}" for k, v in summary["agreement_with_corpus"].items())
    print(
        f"[distill_data] {summary['records']:,} continuations by {summary['backbone']} -> "
        f"{summary['out']} ({summary['new_tokens']:,} tokens in {summary['seconds']:.1f}s on "
        f"{summary['device']}; {summary['dropped_unfinished']:,} unfinished dropped, "
        f"{summary['skipped_without_prompt']:,} records without a prompt skipped"
        + (f", {summary['skipped_short']:,} too short to cut" if args.prompt_tokens else "")
        + ")"
        + (f"; same as the corpus: {agreement}" if agreement else ""),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
