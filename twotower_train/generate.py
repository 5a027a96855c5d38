"""Block-diffusion decoding with a ``TwoTowerModel``, and the AR baseline through its
context tower, with the same interface and the same stats.

Diffusion decoding (``diffusion_generate``), per block of ``bs = model.block_size``::

    cache  = context tower over the prompt                     (one chunked forward)
    repeat until EOS or max_new_tokens:
        block = [MASK] * bs                                    (starts fully masked)
        for step in range(steps_per_block):
            logits = denoiser(cache, block)                    (one denoiser forward)
            commit every masked position whose confidence >= threshold, and at least
            ceil(remaining / steps_left) of the most confident ones
        cache = context tower extends cache with the block     (one chunked forward:
                                                                attention K/V, Mamba states)

The first block starts right after the prompt (the prompt is not padded to a block
boundary): training packs documents at arbitrary offsets, so any position may open a block.

Batching. ``TwoTowerModel.context_extend`` takes no padding mask, so every row of a batch
must have the same cached length. Prompts are therefore grouped by token length and each
group is decoded as one batch (sub-batches of ``batch_size``); rows that finish (EOS or
budget) are dropped from the batch and its cache (``ContextCache.select``). Results do not
depend on how prompts are grouped (tests: batched == unbatched).

    from twotower_train.generate import DecodeConfig, diffusion_generate, ar_generate
    outs, stats = diffusion_generate(model, [[5, 6, 7], [8, 9]], DecodeConfig(), eos_id=1)
    stats.tokens_per_forward, stats.tokens_per_s
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch

from twotower_train.model import ContextCache, ContextTower, TwoTowerModel


@dataclass
class DecodeConfig:
    """Decoding knobs; the block size is the model's (``model.block_size``).

    ``threshold`` (gamma): commit every masked position whose confidence reaches it (> 1:
    never, so exactly ``ceil(remaining / steps_left)`` per step). ``steps_per_block``: most
    denoiser forwards per block (None = block size). ``temperature`` 0 = greedy; otherwise
    sample from the temperature / top-k / top-p filtered distribution.
    """

    threshold: float = 0.8
    steps_per_block: int | None = None
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_at_eos: bool = True
    batch_size: int = 64  # most rows per forward

    def validate(self) -> None:
        if self.steps_per_block is not None and self.steps_per_block < 1:
            raise ValueError(f"steps_per_block must be >= 1, got {self.steps_per_block}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class GenerationStats:
    """What one generate call cost. Forwards are counted per sequence (a batched call over k
    rows counts k), so ``tokens_per_forward`` reads the same at any batch size.

    ``denoiser_forwards``: denoiser passes; ``context_forwards``: context-tower passes
    (prompt prefill, then one per committed block or, for AR, one per token);
    ``new_tokens``: decoded tokens (those returned, plus the EOS that ended a sequence);
    ``tokens_per_forward``: new tokens per denoiser forward (AR: per context forward);
    ``denoiser_calls`` / ``context_calls``: batched model invocations.
    """

    denoiser_forwards: int = 0
    context_forwards: int = 0
    new_tokens: int = 0
    tokens_per_forward: float = 0.0
    wall_s: float = 0.0
    tokens_per_s: float = 0.0
    denoiser_calls: int = 0
    context_calls: int = 0
    sequences: int = 0

    def finish(self, wall_s: float, ar: bool = False) -> GenerationStats:
        self.wall_s = wall_s
        forwards = self.context_forwards if ar else self.denoiser_forwards
        self.tokens_per_forward = self.new_tokens / forwards if forwards else 0.0
        self.tokens_per_s = self.new_tokens / wall_s if wall_s > 0 else 0.0
        return self

    @classmethod
    def combine(cls, parts: list[GenerationStats], ar: bool = False) -> GenerationStats:
        """Sum of several calls (times add up; ratios recomputed)."""
        total = cls()
        for p in parts:
            for name in ("denoiser_forwards", "context_forwards", "new_tokens", "sequences"):
                setattr(total, name, getattr(total, name) + getattr(p, name))
            total.denoiser_calls += p.denoiser_calls
            total.context_calls += p.context_calls
        return total.finish(sum(p.wall_s for p in parts), ar=ar)

    def to_dict(self) -> dict:
        return asdict(self)


# -- pure per-step math --------------------------------------------------------------------


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then top-p (nucleus) filtering of ``logits [..., V]``: removed entries -> -inf.
    Top-p keeps the smallest set of tokens whose probability reaches ``top_p`` (at least 1)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -torch.inf)
    return logits


def choose_tokens(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A token per position of ``logits [..., V]`` and its confidence: ``(ids, conf) [...]``.

    Greedy (``temperature == 0``): the argmax. Otherwise a sample from
    ``softmax(filter(logits / temperature))``. The confidence is always the model's own
    probability of the chosen token (softmax at temperature 1, unfiltered), so a threshold
    means the same under every sampling setting.
    """
    logits = logits.float()
    probs = logits.softmax(-1)
    if temperature == 0:
        conf, ids = probs.max(-1)
        return ids, conf
    scaled = filter_logits(logits / temperature, top_k, top_p)
    flat = scaled.softmax(-1).reshape(-1, scaled.shape[-1])
    gen_device = generator.device if generator is not None else flat.device
    ids = torch.multinomial(flat.to(gen_device), 1, generator=generator).to(flat.device)
    ids = ids.view(logits.shape[:-1])
    return ids, probs.gather(-1, ids[..., None])[..., 0]


def confidence_unmask_step(
    block: torch.Tensor,
    ids: torch.Tensor,
    conf: torch.Tensor,
    *,
    mask_id: int,
    threshold: float,
    steps_left: int,
    width: int | None = None,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """Commit tokens into ``block [B, bs]`` (``mask_id`` = still masked); returns the new block.

    ``ids, conf [B, bs]``: proposed tokens and their confidence. Only positions ``< width``
    are decoded (the token budget may end inside a block) and only ``active [B]`` rows.
    Each row commits every masked position with ``conf >= threshold`` and at least its
    ``ceil(remaining / steps_left)`` most confident ones (ties: the leftmost), so the block
    is complete after ``steps_left`` more steps whatever the threshold.
    """
    batch, bs = block.shape
    width = bs if width is None else width
    masked = block == mask_id
    masked[:, width:] = False
    if active is not None:
        masked &= active.bool()[:, None]
    remaining = masked.sum(1)  # [B]
    n_min = (remaining + steps_left - 1) // steps_left  # ceil, [B]
    score = conf.float().masked_fill(~masked, -torch.inf)
    order = score.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(bs, device=block.device).expand(batch, bs)
    )
    commit = masked & ((score >= threshold) | (rank < n_min[:, None]))
    return torch.where(commit, ids, block)


def _finished_in_block(block: torch.Tensor, mask_id: int, eos_id: int | None) -> torch.Tensor:
    """``[B]`` bool: a committed EOS with every position before it committed (the rest of the
    block no longer matters)."""
    if eos_id is None:
        return torch.zeros(block.shape[0], dtype=torch.bool, device=block.device)
    open_before = (block == mask_id).long().cumsum(1)  # masked positions up to each one
    return ((block == eos_id) & (open_before == 0)).any(1)


def _cut_at_eos(ids: list[int], eos_id: int | None) -> tuple[list[int], bool]:
    if eos_id is not None and eos_id in ids:
        return ids[: ids.index(eos_id)], True
    return ids, False


def _length_groups(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices of prompts with the same token length, in sub-batches of ``batch_size``."""
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError("every prompt needs at least one token")
        by_len[len(p)].append(i)
    return [
        idx[s : s + batch_size]
        for _, idx in sorted(by_len.items())
        for s in range(0, len(idx), batch_size)
    ]


def _device(model: TwoTowerModel) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- decoding ------------------------------------------------------------------------------


@torch.no_grad()
def diffusion_generate(
    model: TwoTowerModel,
    prompts: list[list[int]],
    cfg: DecodeConfig,
    eos_id: int | None,
    generator: torch.Generator | None = None,
) -> tuple[list[list[int]], GenerationStats]:
    """Block-diffusion continuation of each prompt (token ids; any lengths).

    Returns the new tokens per prompt (cut before the first EOS when ``stop_at_eos``; at most
    ``max_new_tokens``) and the call's ``GenerationStats``.
    """
    cfg.validate()
    device = _device(model)
    was_training = model.training
    model.eval()
    stats = GenerationStats(sequences=len(prompts))
    outputs: list[list[int]] = [[] for _ in prompts]
    _sync(device)
    t0 = time.perf_counter()
    try:
        for group in _length_groups(prompts, cfg.batch_size):
            ids = torch.tensor([prompts[i] for i in group], device=device)
            cache, _ = model.context_extend(None, ids)
            stats.context_forwards += len(group)
            stats.context_calls += 1
            _decode_group(model, cache, group, outputs, cfg, eos_id, generator, stats)
    finally:
        model.train(was_training)
    _sync(device)
    return outputs, stats.finish(time.perf_counter() - t0)


def _decode_group(
    model: TwoTowerModel,
    cache: ContextCache,
    rows: list[int],
    outputs: list[list[int]],
    cfg: DecodeConfig,
    eos_id: int | None,
    generator: torch.Generator | None,
    stats: GenerationStats,
) -> None:
    """Decode blocks for ``rows`` (prompt indices, all with cache length ``cache.length``)."""
    bs, mask_id = model.block_size, model.mask_token_id
    steps = cfg.steps_per_block or bs
    stop_id = eos_id if cfg.stop_at_eos else None
    device = _device(model)
    mask_index = torch.tensor([mask_id], device=device)
    produced = 0
    while rows and produced < cfg.max_new_tokens:
        width = min(bs, cfg.max_new_tokens - produced)
        block = torch.full((len(rows), bs), mask_id, dtype=torch.long, device=device)
        active = torch.ones(len(rows), dtype=torch.bool, device=device)
        for step in range(steps):
            t = None
            if model.config.time_conditioning:  # the denoiser reads the block's mask rate
                t = (block == mask_id).float().mean(1)
            logits = model.denoise_block(cache, block, t=t)  # [B, bs, V]
            logits = logits.index_fill(-1, mask_index, -torch.inf)  # never "decode" [MASK]
            stats.denoiser_forwards += int(active.sum())
            stats.denoiser_calls += 1
            ids, conf = choose_tokens(
                logits,
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                top_p=cfg.top_p,
                generator=generator,
            )
            block = confidence_unmask_step(
                block,
                ids,
                conf,
                mask_id=mask_id,
                threshold=cfg.threshold,
                steps_left=steps - step,
                width=width,
                active=active,
            )
            open_rows = (block[:, :width] == mask_id).any(1)
            active = open_rows & ~_finished_in_block(block, mask_id, stop_id)
            if not bool(active.any()):
                break
        produced += width
        keep = []
        for j, (row, new) in enumerate(zip(rows, block[:, :width].tolist())):
            new, ended = _cut_at_eos(new, stop_id)
            outputs[row].extend(new)
            stats.new_tokens += len(new) + int(ended)  # the EOS was decoded too
            if not ended:
                keep.append(j)
        if produced >= cfg.max_new_tokens or not keep:
            return
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=device)
            cache, block = cache.select(index), block[index]
            rows = [rows[j] for j in keep]
        cache, _ = model.context_extend(cache, block)
        stats.context_forwards += len(rows)
        stats.context_calls += 1


@torch.no_grad()
def ar_generate(
    model: TwoTowerModel | ContextTower,
    prompts: list[list[int]],
    cfg: DecodeConfig,
    eos_id: int | None,
    generator: torch.Generator | None = None,
) -> tuple[list[list[int]], GenerationStats]:
    """The AR baseline: the context tower (the frozen backbone) decodes one token per forward
    with its cache. Same interface and output convention as ``diffusion_generate``
    (``threshold`` / ``steps_per_block`` are ignored). ``model``: a ``TwoTowerModel``, or
    the ``ContextTower.of(hf_model)`` of a plain causal LM (the one AR decoder of the
    project: backbone pretraining scores its tasks with it too)."""
    cfg.validate()
    device = _device(model)
    stop_id = eos_id if cfg.stop_at_eos else None
    stats = GenerationStats(sequences=len(prompts))
    outputs: list[list[int]] = [[] for _ in prompts]
    _sync(device)
    t0 = time.perf_counter()
    for group in _length_groups(prompts, cfg.batch_size):
        rows = list(group)
        chunk = torch.tensor([prompts[i] for i in rows], device=device)
        cache = None
        for n in range(cfg.max_new_tokens):
            cache, logits = model.context_extend(cache, chunk)
            stats.context_forwards += len(rows)
            stats.context_calls += 1
            ids, _ = choose_tokens(
                logits[:, -1],
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                top_p=cfg.top_p,
                generator=generator,
            )
            keep = []
            for j, (row, tok) in enumerate(zip(rows, ids.tolist())):
                stats.new_tokens += 1  # an EOS was decoded too
                if stop_id is not None and tok == stop_id:
                    continue
                outputs[row].append(tok)
                keep.append(j)
            if not keep or n + 1 == cfg.max_new_tokens:
                break
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=device)
                cache, ids = cache.select(index), ids[index]
                rows = [rows[j] for j in keep]
            chunk = ids[:, None]
    _sync(device)
    return outputs, stats.finish(time.perf_counter() - t0, ar=True)
