"""AR agreement: how often a decoding mode writes exactly what the backbone would.

On held-out text, each prompt is the first ``prompt_tokens`` tokens of a passage; the
backbone continues it greedily (AR), and so does each decoding mode of the two-tower model
(diffusion at the threshold γ; verified). Agreement is the share of the backbone's first
``length`` generated tokens that the mode reproduced at the same position (a mode that
stops early disagrees on the rest), pooled over prompts. Verified decoding agrees by
construction (1.0); diffusion decoding's agreement says how close a lossy speedup stays to
the backbone on real text, whatever the benchmark.

The passages: ``eval.agreement_data`` (a jsonl file of ``{"text": ...}``, e.g. the held-out
split of the real text asset) or, when unset, the tiny world's held-out paragraphs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from twotower_train.decoding import DecodeConfig, ar_generate, diffusion_generate
from twotower_train.errors import MissingFile, TwoTowerError
from twotower_train.eval.report import TaskScore
from twotower_train.eval.tasks import AgreementTask, register

LENGTH = 64  # tokens compared per prompt


class AgreementDataError(TwoTowerError, ValueError):
    """Held-out text that cannot make agreement prompts; the message is one line."""


def agreement(reference: list[list[int]], other: list[list[int]], length: int = LENGTH):
    """``(matches, positions)``: over every prompt, the positions ``i < length`` where the
    reference (the backbone's greedy output) has a token, and how many of them ``other``
    has the same token at."""
    matches = positions = 0
    for ref, out in zip(reference, other, strict=True):
        ref = ref[:length]
        positions += len(ref)
        matches += sum(1 for i, tok in enumerate(ref) if i < len(out) and out[i] == tok)
    return matches, positions


def load_passages(source: str | None) -> list[str]:
    """The held-out passages (see the module docstring)."""
    if source is None:
        from twotower_train.tiny_world import load_test_text

        return load_test_text()
    path = Path(source).expanduser()
    if not path.is_file():
        raise MissingFile(f"eval.agreement_data: {path} does not exist")
    passages = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                passages.append(json.loads(line)["text"])
            except (ValueError, KeyError, TypeError):
                raise AgreementDataError(
                    f"eval.agreement_data: {path} line {n} is not a JSON object with 'text'"
                ) from None
    return passages


def agreement_prompts(
    passages: list[str], tokenizer, prompt_tokens: int, limit: int
) -> list[list[int]]:
    """The first ``prompt_tokens`` tokens of the first ``limit`` passages long enough to
    leave text after them (so the backbone has a real continuation to write)."""
    prompts = []
    for text in passages:
        ids = tokenizer.encode(text)
        if len(ids) > prompt_tokens:
            prompts.append(ids[:prompt_tokens])
        if len(prompts) == limit:
            break
    if not prompts:
        raise AgreementDataError(
            f"no held-out passage is longer than {prompt_tokens} tokens for ar_agreement"
        )
    return prompts


TASK = register(AgreementTask("ar_agreement"))


def score_agreement(
    model, tokenizer, prompts: list[list[int]], decode: DecodeConfig, verify: DecodeConfig | None
) -> tuple[TaskScore, dict]:
    """AR agreement of diffusion decoding (``decode``) and, with ``verify``, of verified
    decoding on ``prompts``: the report row (diffusion's agreement; the backbone's is 1 by
    definition) and ``{"diffusion": {...}, "verified": {...}}`` with matches and positions."""
    eos = tokenizer.eos_token_id
    base = DecodeConfig(max_new_tokens=LENGTH, batch_size=decode.batch_size)
    reference, _ = ar_generate(model, prompts, base, eos)
    modes = {"diffusion": decode}
    if verify is not None:
        modes["verified"] = verify
    out = {}
    for mode, cfg in modes.items():
        cfg = dataclasses.replace(cfg, max_new_tokens=LENGTH)
        outputs, stats = diffusion_generate(model, prompts, cfg, eos)
        matches, positions = agreement(reference, outputs)
        out[mode] = {
            "agreement": matches / positions if positions else None,
            "matches": matches,
            "positions": positions,
            "tokens_per_forward": stats.tokens_per_forward,
            "tokens_per_step": stats.tokens_per_step,
            "mean_accepted": stats.mean_accepted,
            "threshold": cfg.threshold,
        }
    share = out["diffusion"]["agreement"] or 0.0
    row = TaskScore(
        TASK.name,
        TASK.metric,
        1.0,
        share,
        n=out["diffusion"]["positions"],
        in_summary=False,
    )
    return row, {"prompts": len(prompts), **out}
