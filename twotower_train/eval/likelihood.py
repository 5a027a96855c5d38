"""Likelihoods of both towers: what multiple-choice tasks, perplexity and lm-eval read.

Backbone (context tower, AR):
    ``ar_loglikelihood``   log p(continuation | context) by the chain rule, one forward
    ``ar_nll``             summed next-token NLL of packed rows (perplexity)

Two-tower (denoiser):
    ``denoiser_loglikelihood``  the exact log-likelihood of the continuation under the
        denoiser decoding it left to right, one token per step: the context sits in the
        context tower's cache, the continuation is cut into blocks right after it (as
        ``diffusion_generate`` places them) and token i of a block is scored with tokens
        < i of its block revealed, tokens >= i masked, earlier blocks clean in the cache::

            log p(c) = sum_blocks sum_i log p_denoiser(c_i | cache, c_<i in block, [MASK]...)

        A fixed unmasking order makes this a normalised distribution over continuations
        (the any-order-autoregressive reading of masked diffusion), so it is deterministic
        and directly comparable with the backbone's log-likelihood; all variants of a block
        go through the denoiser as one batch.
    ``diffusion_elbo``  Monte-Carlo block-diffusion ELBO per token (an upper bound on the
        NLL, fixed seeds), from the one-pass training forward.

The [MASK] token is never a candidate (its logit is -inf), in decoding and in scoring alike.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

from twotower_train.diffusion import diffusion_ce, expand_blocks, mask_prob, mask_tokens, sample_t
from twotower_train.model import TwoTowerModel
from twotower_train.model.mask_embedding import forbid_mask

Request = tuple[list[int], list[int]]  # (context ids, continuation ids)


def _device(model: TwoTowerModel) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def ar_loglikelihood(
    model: TwoTowerModel, requests: list[Request], batch_size: int = 32
) -> list[tuple[float, bool]]:
    """``(log p(cont | ctx), cont is the greedy continuation)`` per request, from the context
    tower. Rows are right-padded into one causal forward (padding after a token cannot change
    its logits). An empty context is not allowed (pass e.g. ``[eos_id]``)."""
    device = _device(model)
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -sum(map(len, requests[i])))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        seqs = [requests[i][0] + requests[i][1] for i in idx]
        if any(not requests[i][0] for i in idx):
            raise ValueError("ar_loglikelihood needs a non-empty context")
        length = max(map(len, seqs))
        ids = torch.zeros(len(seqs), length, dtype=torch.long)
        for r, seq in enumerate(seqs):
            ids[r, : len(seq)] = torch.tensor(seq)
        _, logits = model.context_extend(None, ids.to(device))  # [B, L, V]
        for r, i in enumerate(idx):
            ctx, cont = requests[i]
            span = logits[r, len(ctx) - 1 : len(ctx) + len(cont) - 1].float()  # [n, V]
            target = torch.tensor(cont, device=device)
            logp = span.log_softmax(-1).gather(-1, target[:, None])[:, 0]
            greedy = bool((span.argmax(-1) == target).all())
            out[i] = (float(logp.sum()), greedy)
    return out  # type: ignore[return-value]


@torch.no_grad()
def denoiser_loglikelihood(
    model: TwoTowerModel, requests: list[Request], batch_size: int = 32, max_rows: int = 256
) -> list[tuple[float, bool]]:
    """``(log p(cont | ctx), every token is its step's argmax)`` per request, from the
    denoiser decoding left to right one token per step (module docstring). Requests are
    grouped by context length (the cache has one length per batch); ``max_rows`` caps the
    noisy variants per denoiser call. An empty context is allowed (block 0 has no cache)."""
    device = _device(model)
    bs = model.block_size
    logp = [0.0] * len(requests)
    greedy = [True] * len(requests)
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, (ctx, _) in enumerate(requests):
        by_len[len(ctx)].append(i)
    for ctx_len, members in sorted(by_len.items()):
        for s in range(0, len(members), batch_size):
            group = [i for i in members[s : s + batch_size] if requests[i][1]]
            if not group:
                continue
            cache = None
            if ctx_len:
                ctx = torch.tensor([requests[i][0] for i in group], device=device)
                cache, _ = model.context_extend(None, ctx, last_only=True)
            k = 0
            while group:
                _score_block(model, cache, group, requests, k, logp, greedy, max_rows)
                # requests that go on past block k: extend the cache with their clean block
                keep = [j for j, i in enumerate(group) if len(requests[i][1]) > (k + 1) * bs]
                if not keep:
                    break
                block = torch.tensor(
                    [requests[group[j]][1][k * bs : (k + 1) * bs] for j in keep], device=device
                )
                if cache is not None:
                    cache = cache.select(torch.tensor(keep, device=device))
                cache, _ = model.context_extend(cache, block, last_only=True)
                group = [group[j] for j in keep]
                k += 1
    return list(zip(logp, greedy))


def _score_block(model, cache, group, requests, k, logp, greedy, max_rows) -> None:
    """Score block ``k`` of every request in ``group`` (cache rows in ``group`` order)."""
    device = _device(model)
    bs, mask_id = model.block_size, model.mask_token_id
    rows, cache_rows, owners, positions, targets = [], [], [], [], []
    for j, i in enumerate(group):
        chunk = requests[i][1][k * bs : (k + 1) * bs]
        for p, tok in enumerate(chunk):
            rows.append(chunk[:p] + [mask_id] * (bs - p))
            cache_rows.append(j)
            owners.append(i)
            positions.append(p)
            targets.append(tok)
    for s in range(0, len(rows), max_rows):
        sl = slice(s, s + max_rows)
        noisy = torch.tensor(rows[sl], device=device)
        index = torch.tensor(cache_rows[sl], device=device)
        sub_cache = cache.select(index) if cache is not None else None
        t = None
        if model.config.time_conditioning:  # the denoiser reads the block's mask rate
            t = (noisy == mask_id).float().mean(1)
        logits = model.denoise_block(sub_cache, noisy, t=t)  # [R, bs, V]
        pos = torch.tensor(positions[sl], device=device)
        tgt = torch.tensor(targets[sl], device=device)
        picked = logits[torch.arange(len(pos), device=device), pos].float()  # [R, V]
        picked = forbid_mask(picked, mask_id)
        lp = picked.log_softmax(-1).gather(-1, tgt[:, None])[:, 0]
        hit = picked.argmax(-1) == tgt
        for owner, v, h in zip(owners[sl], lp.tolist(), hit.tolist()):
            logp[owner] += v
            greedy[owner] = greedy[owner] and h


@torch.no_grad()
def ar_nll(model: TwoTowerModel, rows: torch.Tensor, batch_size: int = 32) -> tuple[float, int]:
    """Summed next-token NLL (nats) of ``rows [N, L]`` under the backbone, and the number of
    scored tokens (``N * (L - 1)``: token 0 of a row has no context)."""
    device = _device(model)
    total = 0.0
    for s in range(0, len(rows), batch_size):
        ids = rows[s : s + batch_size].to(device)
        logits = model.context_logits(ids)[:, :-1]  # [B, L-1, V]
        total += float(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
    return total, rows.shape[0] * (rows.shape[1] - 1)


@torch.no_grad()
def diffusion_elbo(
    model: TwoTowerModel,
    rows: torch.Tensor,
    *,
    samples: int = 4,
    seed: int = 0,
    batch_size: int = 32,
    schedule: str = "linear",
    eps: float = 1e-3,
) -> tuple[float, list[float]]:
    """Block-diffusion negative ELBO per token (nats) of ``rows [N, L]`` (L a multiple of the
    block size): an upper bound on the two-tower model's NLL, the same tokens ``ar_nll``
    scores (token 0 of a row is given, never masked).

    Per row: t per block ~ U[eps, 1] (stratified), every scored token masked with prob.
    m(t), ``sum_masked w(t) CE`` over the one-pass forward (``diffusion_ce``, ``elbo``).
    ``samples`` Monte-Carlo draws, draw s seeded with ``seed + s``; returns the mean over
    draws and each draw's value. A time-conditioned denoiser reads the mask rate m(t) of
    ``schedule`` (as in training).
    """
    device = _device(model)
    bs = model.block_size
    n, length = rows.shape
    if length % bs:
        raise ValueError(f"row length {length} is not a multiple of the block size {bs}")
    loss_mask = torch.ones(n, length, dtype=torch.bool)
    loss_mask[:, 0] = False
    n_tokens = int(loss_mask.sum())
    per_sample = []
    for s in range(samples):
        gen = torch.Generator().manual_seed(seed + s)
        t = sample_t(n, length // bs, per="block", eps=eps, antithetic=True, generator=gen)
        noisy, masked, _ = mask_tokens(
            rows,
            t,
            block_size=bs,
            mask_id=model.mask_token_id,
            schedule=schedule,
            loss_mask=loss_mask,
            generator=gen,
        )
        total = 0.0
        for b in range(0, n, batch_size):
            sl = slice(b, b + batch_size)
            t_b = t[sl].to(device)
            rate = mask_prob(t_b, schedule) if model.config.time_conditioning else None
            logits = model(rows[sl].to(device), noisy[sl].to(device), t=rate)
            logits = forbid_mask(logits, model.mask_token_id)
            m = masked[sl].to(device)
            bound = diffusion_ce(
                logits,
                rows[sl].to(device),
                m,
                t_tok=expand_blocks(t_b, bs),
                weighting="elbo",
                schedule=schedule,
                num_loss_tokens=1,  # a sum here; divided by all scored tokens below
            )
            total += float(bound)
        per_sample.append(total / n_tokens)
    return sum(per_sample) / len(per_sample), per_sample
