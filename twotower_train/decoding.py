"""Block-diffusion decoding with a ``TwoTowerModel``, and the AR baseline through its
context tower, with the same interface and the same stats.

Diffusion decoding (``diffusion_generate``), per block of ``bs = model.block_size``::

    cache  = context tower over the prompt                     (one chunked forward)
    repeat until EOS or max_new_tokens:
        block = [MASK] * bs                                    (starts fully masked)
        for step in range(steps_per_block):
            logits = denoiser(cache, block)                    (one denoiser forward)
            commit the masked positions whose confidence >= threshold -- by default only
            a contiguous run from the first masked one (order="prefix") -- and at least
            ceil(remaining / steps_left) of them (the leftmost; order="any": the most
            confident, anywhere in the block)
        cache = context tower extends cache with the block     (one chunked forward:
                                                                attention K/V, Mamba states)

The first block starts right after the prompt (the prompt is not padded to a block
boundary): training packs documents at arbitrary offsets, so any position may open a block.

Batching. ``TwoTowerModel.context_extend`` takes no padding mask, so every row of a batch
must have the same cached length. Prompts are therefore grouped by token length and each
group is decoded as one batch (sub-batches of ``batch_size``); rows that finish (EOS or
budget) are dropped from the batch and its cache (``ContextCache.select``). Results do not
depend on how prompts are grouped (tests: batched == unbatched).

    from twotower_train.decoding import DecodeConfig, diffusion_generate, ar_generate
    outs, stats = diffusion_generate(model, [[5, 6, 7], [8, 9]], DecodeConfig(), eos_id=1)
    stats.tokens_per_forward, stats.tokens_per_s
"""

from __future__ import annotations

import time
import weakref
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch

from twotower_train.config import CommitOrder, CommitScore
from twotower_train.model import ContextCache, ContextTower, TwoTowerModel
from twotower_train.model.mask_embedding import forbid_mask

SCORES = tuple(s.value for s in CommitScore)  # the values `eval.score` takes
ORDERS = tuple(o.value for o in CommitOrder)


@dataclass
class DecodeConfig:
    """Decoding knobs; the block size is the model's (``model.block_size``).

    ``threshold`` (gamma): commit every masked position whose confidence reaches it (> 1:
    never, so exactly ``ceil(remaining / steps_left)`` per step). ``steps_per_block``: most
    denoiser forwards per block (None = block size). ``temperature`` 0 = greedy; otherwise
    sample from the temperature / top-k / top-p filtered distribution.
    """

    threshold: float = 0.95
    steps_per_block: int | None = None
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_at_eos: bool = True
    batch_size: int = 64  # most rows per forward
    # Lossless: the context tower verifies every drafted block (greedy; output == AR greedy).
    verify: bool = False
    # Verified decoding drafts only while it pays (``DraftPolicy``: timed rounds, AR steps
    # with a backoff when drafting loses); False drafts every round (tests, benchmarks).
    verify_adaptive: bool = True
    # What the threshold reads: "confidence" (probability of the chosen token) or "margin"
    # (its probability minus the runner-up's: low where two tokens compete).
    score: str = "confidence"
    # Dependence between positions: two ADJACENT masked positions commit in the same step
    # only if both scores reach this (None = no rule). Neighbours that are each likely alone
    # are often wrong together (" a a" for " a z"); the minimum per step still applies.
    adjacent_threshold: float | None = None
    # "prefix": only the leftmost masked positions commit, a contiguous run (left to right,
    # as the backbone reads; the per-step minimum too); "any": wherever the score allows.
    order: str = "prefix"

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
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.adjacent_threshold is not None and not self.adjacent_threshold >= 0.0:
            raise ValueError(f"adjacent_threshold must be >= 0, got {self.adjacent_threshold}")
        if self.verify and self.temperature > 0:
            raise ValueError(
                "verify=True is greedy (its output is the backbone's greedy decoding); "
                "set temperature=0"
            )


@dataclass
class GenerationStats:
    """What one generate call cost. Forwards are counted per sequence (a batched call over k
    rows counts k), so ``tokens_per_forward`` reads the same at any batch size.

    ``denoiser_forwards``: denoiser passes; ``context_forwards``: context-tower passes
    (prompt prefill, then one per committed block or, for AR, one per token);
    ``new_tokens``: decoded tokens (those returned, plus the EOS that ended a sequence);
    ``tokens_per_forward``: new tokens per denoiser forward (AR: per context forward);
    ``denoiser_calls`` / ``context_calls``: batched model invocations.
    Verified decoding (``DecodeConfig.verify``): ``rounds`` (a round = at most one denoiser
    forward that drafts plus the context forward that verifies it; a round that drafts
    nothing is an AR step), ``draft_rounds`` (rounds that drafted), ``accepted`` (drafted
    tokens the backbone agreed with), ``tokens_per_step`` (new tokens per round) and
    ``mean_accepted`` (accepted drafted tokens per round).
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
    rounds: int = 0
    draft_rounds: int = 0
    accepted: int = 0
    tokens_per_step: float = 0.0
    mean_accepted: float = 0.0

    def finish(self, wall_s: float, ar: bool = False) -> GenerationStats:
        self.wall_s = wall_s
        forwards = self.context_forwards if ar else self.denoiser_forwards
        self.tokens_per_forward = self.new_tokens / forwards if forwards else 0.0
        self.tokens_per_s = self.new_tokens / wall_s if wall_s > 0 else 0.0
        if self.rounds:
            self.tokens_per_step = self.new_tokens / self.rounds
            self.mean_accepted = self.accepted / self.rounds
        return self

    @classmethod
    def combine(cls, parts: list[GenerationStats], ar: bool = False) -> GenerationStats:
        """Sum of several calls (times add up; ratios recomputed)."""
        total = cls()
        for p in parts:
            for name in (
                "denoiser_forwards",
                "context_forwards",
                "new_tokens",
                "sequences",
                "rounds",
                "draft_rounds",
                "accepted",
            ):
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


def commit_scores(logits: torch.Tensor, ids: torch.Tensor, conf: torch.Tensor, score: str):
    """What the commit threshold compares, per position ``[...]``: ``confidence`` = ``conf``
    (the chosen token's probability), ``margin`` = that minus the best other token's."""
    if score == "confidence":
        return conf
    if score == "margin":
        probs = logits.float().softmax(-1)
        other = probs.scatter(-1, ids[..., None], 0.0).amax(-1)
        return conf - other
    raise ValueError(f"unknown score {score!r}; expected one of {SCORES}")


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
    adjacent_threshold: float | None = None,
    order: str = "any",
) -> torch.Tensor:
    """Commit tokens into ``block [B, bs]`` (``mask_id`` = still masked); returns the new block.

    ``ids, conf [B, bs]``: proposed tokens and their score (``commit_scores``). Only
    positions ``< width`` are decoded (the token budget may end inside a block) and only
    ``active [B]`` rows. Each row commits every masked position with ``conf >= threshold``
    and at least its ``ceil(remaining / steps_left)`` most confident ones (ties: the
    leftmost), so the block is complete after ``steps_left`` more steps whatever the
    threshold. With ``adjacent_threshold``, scanning left to right, a position over the
    threshold whose left neighbour is also committed in this step is dropped unless both
    reach ``adjacent_threshold`` (the per-step minimum is then made up by rank). With
    ``order="prefix"`` only a contiguous run from the first masked position commits, and the
    minimum is made up from the left.
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
    commit = masked & (score >= threshold)
    if adjacent_threshold is not None:
        sure = score >= adjacent_threshold
        cols = list(commit.unbind(1))
        for i in range(1, bs):
            together = cols[i] & cols[i - 1]
            cols[i] = cols[i] & ~(together & ~(sure[:, i] & sure[:, i - 1]))
        commit = torch.stack(cols, 1)
    if order == "prefix":
        # a position commits only if every masked position before it commits too
        blocked = (masked & ~commit).long().cumsum(1) > 0
        commit = commit & ~blocked
    # make up the per-step minimum with the best-ranked positions not yet committed
    short = (n_min - commit.sum(1)).clamp(min=0)  # [B]
    rest = score.masked_fill(commit, -torch.inf)
    if order == "prefix":  # rank = left to right
        pos = torch.arange(bs, device=block.device, dtype=rest.dtype).expand(batch, bs)
        rest = torch.where(masked & ~commit, -pos, torch.full_like(rest, -torch.inf))
    ranked = rest.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(ranked).scatter_(
        1, ranked, torch.arange(bs, device=block.device).expand(batch, bs)
    )
    commit = commit | (masked & (rank < short[:, None]))
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


def length_groups(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
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
    ``max_new_tokens``) and the call's ``GenerationStats``. With ``cfg.verify`` every block
    is verified by the context tower (``_verified_row``): the output is the backbone's
    greedy decoding, token for token; prompts are then decoded one at a time.
    """
    cfg.validate()
    device = _device(model)
    was_training = model.training
    if was_training:  # (a recursive mode switch costs ~1 ms: not on every call)
        model.eval()
    stats = GenerationStats(sequences=len(prompts))
    outputs: list[list[int]] = [[] for _ in prompts]
    _sync(device)
    t0 = time.perf_counter()
    try:
        for group in length_groups(prompts, 1 if cfg.verify else cfg.batch_size):
            ids = torch.tensor([prompts[i] for i in group], device=device)
            cache, _ = model.context_extend(None, ids, last_only=True)
            stats.context_forwards += len(group)
            stats.context_calls += 1
            if cfg.verify:  # rows accept different lengths: one at a time
                _verified_row(model, cache, outputs[group[0]], cfg, eos_id, stats)
            else:
                _decode_group(model, cache, group, outputs, cfg, eos_id, generator, stats)
    finally:
        if was_training:
            model.train()
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
    stop_id = eos_id if cfg.stop_at_eos else None
    device = _device(model)
    produced = 0
    while rows and produced < cfg.max_new_tokens:
        width = min(bs, cfg.max_new_tokens - produced)
        block = torch.full((len(rows), bs), mask_id, dtype=torch.long, device=device)
        block = _draft_block(model, cache, block, width, cfg, stop_id, generator, stats)
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
        cache, _ = model.context_extend(cache, block, last_only=True)
        stats.context_forwards += len(rows)
        stats.context_calls += 1


def _draft_block(
    model: TwoTowerModel,
    cache: ContextCache,
    block: torch.Tensor,
    width: int,
    cfg: DecodeConfig,
    stop_id: int | None,
    generator: torch.Generator | None,
    stats: GenerationStats,
) -> torch.Tensor:
    """Denoiser steps on ``block [B, bs]`` (``[MASK]`` where open) until its first ``width``
    positions are committed or each row has committed an EOS with nothing open before it."""
    bs, mask_id = model.block_size, model.mask_token_id
    steps = cfg.steps_per_block or bs
    active = (block[:, :width] == mask_id).any(1)
    for step in range(steps):
        if not bool(active.any()):
            break
        t = None
        if model.config.time_conditioning:  # the denoiser reads the block's mask rate
            t = (block == mask_id).float().mean(1)
        logits = model.denoise_block(cache, block, t=t)  # [B, bs, V]
        logits = forbid_mask(logits, mask_id)  # never "decode" [MASK]
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
            commit_scores(logits, ids, conf, cfg.score),
            mask_id=mask_id,
            threshold=cfg.threshold,
            steps_left=steps - step,
            width=width,
            active=active,
            adjacent_threshold=cfg.adjacent_threshold,
            order=cfg.order,
        )
        open_rows = (block[:, :width] == mask_id).any(1)
        active = open_rows & ~_finished_in_block(block, mask_id, stop_id)
    return block


def _verified_row(
    model: TwoTowerModel,
    cache: ContextCache,
    out: list[int],
    cfg: DecodeConfig,
    eos_id: int | None,
    stats: GenerationStats,
) -> None:
    """Verified decoding of one prompt (``cache``: its prefix, whose last logits give the
    backbone's first token). Per round the backbone's next token ``carry`` is known; the
    denoiser drafts what follows it in ONE forward -- the leading positions whose confidence
    reaches the draft threshold, at most ``policy.cap`` of them -- and the context tower reads
    ``[carry, *draft]`` in one forward (it must, to extend its cache): its greedy choices keep
    the longest agreeing prefix of the draft, the cache is cut back to it, and the backbone's
    choice after the last kept token is the next ``carry``. Every kept token is the backbone's
    greedy choice, so the output is AR greedy decoding, token for token.

    The cost of drafting is bounded (``DraftPolicy``): a round that drafts nothing is an AR
    step, so when drafting does not pay for its denoiser forward the row decodes as AR does,
    probing the drafter again after a backoff that doubles while it keeps losing."""
    bs = model.block_size
    stop_id = eos_id if cfg.stop_at_eos else None
    device = _device(model)
    policy = draft_policy(model, max_cap=bs - 1, adaptive=cfg.verify_adaptive)
    carry = int(cache.last_logits[0].argmax())
    while True:
        if stop_id is not None and carry == stop_id:
            stats.new_tokens += 1  # the backbone ends the sequence here
            return
        room = cfg.max_new_tokens - len(out) - 1  # tokens left after the carry
        draft: list[int] = []
        t0 = time.perf_counter()
        cap = min(policy.cap(), room, bs - 1)
        called = cap > 0
        if called:
            draft = _draft_after(model, cache, carry, cap, cfg, stop_id, stats)
        t_draft = time.perf_counter() - t0
        chunk = torch.tensor([[carry, *draft]], device=device)
        extended, logits = model.context_extend(cache, chunk)  # logits [1, 1 + d, V]
        stats.context_forwards += 1
        stats.context_calls += 1
        choices = logits[0].argmax(-1)  # the backbone's token after each read position
        agree = (torch.tensor(draft, device=device, dtype=torch.long) == choices[:-1]).long()
        k = int(agree.cumprod(0).sum()) if draft else 0
        kept = [carry, *draft[:k]]
        if k == len(draft):
            cache = extended
        else:
            cache = _truncate(model, cache, extended, kept, logits, stats)
        next_carry = int(choices[k])
        _sync(device)  # times of the policy: what the device really spent
        elapsed = time.perf_counter() - t0
        stats.rounds += 1
        stats.accepted += k
        stats.draft_rounds += int(called)
        policy.update(called, len(draft), k, seconds=elapsed, draft_seconds=t_draft)
        ended = stop_id is not None and stop_id in kept
        if ended:
            kept = kept[: kept.index(stop_id)]
        out.extend(kept)
        stats.new_tokens += len(kept) + int(ended)
        if ended or len(out) >= cfg.max_new_tokens:
            return
        carry = next_carry


def _draft_after(
    model: TwoTowerModel,
    cache: ContextCache,
    carry: int,
    cap: int,
    cfg: DecodeConfig,
    stop_id: int | None,
    stats: GenerationStats,
) -> list[int]:
    """One denoiser forward over ``[carry, MASK, ...]``: the greedy tokens of the leading
    masked positions whose score reaches ``cfg.threshold`` (at most ``cap``; cut after an
    EOS)."""
    bs, mask_id = model.block_size, model.mask_token_id
    block = torch.full((1, bs), mask_id, dtype=torch.long, device=_device(model))
    block[0, 0] = carry
    t = None
    if model.config.time_conditioning:
        t = (block == mask_id).float().mean(1)
    logits = forbid_mask(model.denoise_block(cache, block, t=t), mask_id)[0, 1 : 1 + cap]
    stats.denoiser_forwards += 1
    stats.denoiser_calls += 1
    ids, conf = choose_tokens(logits, temperature=0.0)
    scores = commit_scores(logits, ids, conf, cfg.score)
    sure = (scores >= cfg.threshold).long().cumprod(0)
    draft = ids[: int(sure.sum())].tolist()
    if stop_id is not None and stop_id in draft:
        draft = draft[: draft.index(stop_id) + 1]
    return draft


# One policy per model (and draft cap / mode): what a row learns of its drafter's worth
# carries to the next row and the next call, so a drafter that does not pay is probed ever
# more rarely instead of once at the start of every prompt.
_POLICIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def draft_policy(model: TwoTowerModel, max_cap: int, adaptive: bool) -> DraftPolicy:
    """The model's ``DraftPolicy`` for a new row (``DraftPolicy.new_row``)."""
    policies = _POLICIES.setdefault(model, {})
    policy = policies.setdefault((max_cap, adaptive), DraftPolicy(max_cap, adaptive=adaptive))
    return policy.new_row()


@dataclass
class DraftPolicy:
    """How much a verified row drafts: never so much that it decodes slower than AR.

    ``cap()`` is the most tokens the next round may draft (0: an AR step, no denoiser
    forward). It halves towards the accepted length when a draft is rejected and doubles
    when one is accepted whole. Rounds are timed: when drafting rounds yield fewer tokens
    per second than AR steps (measured on this model, across rows and calls), drafting
    stops and it decodes as AR; it probes the drafter again after ``backoff`` AR steps, doubling the backoff (up
    to ``max_backoff``) each time the probe loses. The worst case, a drafter that never
    helps, costs one probe per ``max_backoff`` tokens."""

    max_cap: int
    adaptive: bool = True  # False: always draft up to ``max_cap`` (no timing decisions)
    min_backoff: int = 2
    max_backoff: int = 64
    smoothing: float = 0.3  # weight of the newest round in the running averages
    _cap: int = -1
    _draft_rate: float | None = None  # tokens per second of drafting rounds
    _ar_rate: float | None = None  # tokens per second of AR steps
    _ar_left: int = 0  # AR steps before the next probe
    _backoff: int = 2

    def __post_init__(self) -> None:
        self._cap = self.max_cap
        self._backoff = self.min_backoff

    def new_row(self) -> DraftPolicy:
        """A new sequence: the draft length starts at its cap again; what was learned of
        the drafter's worth (rates, backoff, AR steps left before the next probe) stays."""
        self._cap = self.max_cap
        return self

    def cap(self) -> int:
        if not self.adaptive:
            return self.max_cap
        return 0 if self._ar_left > 0 else self._cap

    def update(
        self, called: bool, drafted: int, accepted: int, seconds: float, draft_seconds: float
    ) -> None:
        """One round's outcome: whether the denoiser ran (``called``), how many tokens it
        drafted and the backbone accepted, the round's wall time and the drafting's part."""
        rate = (accepted + 1) / max(seconds, 1e-9)  # the carry is decoded every round
        if not called:  # an AR step
            self._ar_left = max(0, self._ar_left - 1)
            self._ar_rate = self._average(self._ar_rate, rate)
            return
        self._draft_rate = self._average(self._draft_rate, rate)
        if self._ar_rate is None:  # until an AR step is timed: the verifying forward alone
            self._ar_rate = 1.0 / max(seconds - draft_seconds, 1e-9)
        if drafted and accepted == drafted:
            self._cap = min(self.max_cap, 2 * self._cap)
        else:
            self._cap = max(1, min(self._cap, 2 * accepted + 1))
        if self._draft_rate < self._ar_rate:
            self._ar_left = self._backoff
            self._backoff = min(self.max_backoff, 2 * self._backoff)
            self._draft_rate = None  # the next probe is judged on its own
        elif accepted:
            self._backoff = self.min_backoff

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new


def _truncate(model, before: ContextCache, extended: ContextCache, kept, logits, stats):
    """The cache after ``before`` + ``kept`` (a prefix of what ``extended`` read)."""
    if not kept:
        return before
    if not extended.conv and not extended.ssm:  # attention only: cut the K/V
        return extended.truncate(before.length + len(kept), logits[:, len(kept) - 1])
    # Mamba states cannot be cut: recompute them from the block's start state
    cache, _ = model.context_extend(
        before, torch.tensor([kept], device=logits.device), last_only=True
    )
    stats.context_forwards += 1
    stats.context_calls += 1
    return cache


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
    for group in length_groups(prompts, cfg.batch_size):
        rows = list(group)
        chunk = torch.tensor([prompts[i] for i in rows], device=device)
        cache = None
        for n in range(cfg.max_new_tokens):
            cache, logits = model.context_extend(cache, chunk, last_only=True)
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
