"""Each objective lever on one batch, against a computation made here: the ELBO weight,
distillation on/off and its direction, time conditioning, the complementary pass, suffix
masking and the block-size curriculum. A lever the objective ignored fails its test."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY

from twotower_train.backbones import load_backbone, load_tokenizer
from twotower_train.config import compose
from twotower_train.diffusion import mask_tokens, sample_t
from twotower_train.engine.distributed import init_distributed
from twotower_train.run.train import build_objective, engine_for

pytestmark = pytest.mark.usefixtures("one_thread")

# A random tiny Llama (scratch) as backbone, block 8, fp32, 2 rows of 32 tokens.
TT = [*TINY, "train.objective=twotower", "denoiser.block_size=8", "precision=fp32"]
B, L, BS = 2, 32, 8


def objective(*overrides: str):
    cfg = compose([*TT, *overrides])
    tokenizer = load_tokenizer(cfg.backbone)
    torch.manual_seed(0)  # the same weights whatever the overrides
    obj = build_objective(cfg, load_backbone(cfg.backbone, tokenizer), tokenizer)
    return obj, cfg


def perturb(model) -> None:
    """Move both towers away from the near-uniform random init: noise on every backbone
    weight (a teacher whose next-token distribution changes with the position), noise on
    every denoiser weight and its output rows rescaled by log-normal factors (a peaked
    student, far from the teacher: forward and reverse KL differ, attention matters).
    The time-conditioning modulation, if any, is left at zero."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        for name, p in model.denoiser.named_parameters():
            if "time_cond" not in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        head = model.denoiser.model.get_output_embeddings().weight
        head.mul_(torch.exp(0.7 * torch.randn(head.shape[0], 1, generator=g)))


def batch() -> dict[str, torch.Tensor]:
    """Random ids; a prompt (never masked) of 5 tokens in row 0 and 11 in row 1, so the
    second row's block 1 starts with 3 unmaskable positions."""
    ids = torch.randint(3, 2048, (B, L), generator=torch.Generator().manual_seed(0))
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    loss_mask[0, :5] = False
    loss_mask[1, :11] = False
    return {"input_ids": ids, "loss_mask": loss_mask}


def run(obj, data: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)  # the objective draws t and masks from the global RNG
    return obj(data)


def spy(model) -> dict[str, list]:
    """Record every ``context_forward`` call (keywords, logits) and every ``denoise`` call
    (noisy ids, keywords, logits) the objective makes. The objective asks for hidden
    states only (``logits=False``); the spy records the full logits of the same call."""
    seen: dict[str, list] = {"context": [], "passes": []}
    context_forward, denoise = model.context_forward, model.denoise

    def ctx_spy(clean, **kw):
        logits = context_forward(clean, **{**kw, "logits": True}).logits
        seen["context"].append({**kw, "logits": logits})
        return context_forward(clean, **kw)

    def den_spy(noisy, ctx_out, **kw):
        logits = denoise(noisy, ctx_out, **{**kw, "logits": True})
        seen["passes"].append({**kw, "noisy": noisy, "logits": logits})
        return denoise(noisy, ctx_out, **kw)

    model.context_forward, model.denoise = ctx_spy, den_spy
    return seen


def token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy [B, L] in fp64."""
    logp = logits.double().log_softmax(-1)
    return -logp.gather(-1, ids[..., None])[..., 0]


def token_kl(student: torch.Tensor, teacher_ctx: torch.Tensor, direction: str) -> torch.Tensor:
    """Per-position KL [B, L - 1] between the AR teacher's next-token distribution at p - 1
    and the student at p (forward: KL(teacher || student), reverse: KL(student || teacher))."""
    lp = teacher_ctx[:, :-1].double().log_softmax(-1)
    lq = student[:, 1:].double().log_softmax(-1)
    if direction == "forward":
        return (lp.exp() * (lp - lq)).sum(-1)
    return (lq.exp() * (lq - lp)).sum(-1)


def masks_of(noisy: torch.Tensor, mask_id: int, ids: torch.Tensor) -> torch.Tensor:
    """Masked positions of a noisy row; unmasked ones must still read the clean token."""
    masked = noisy == mask_id
    assert not (ids == mask_id).any() and torch.equal(noisy[~masked], ids[~masked])
    return masked


def approx(x: float | torch.Tensor, rel: float = 1e-5):
    return pytest.approx(float(x), rel=rel)


def test_elbo_loss_is_the_one_over_t_weighted_ce() -> None:
    """diffusion=elbo: loss = sum over masked of CE / t / #maskable, with t and the masks
    redrawn here from the same seed (linear schedule: w(t) = 1 / t)."""
    obj, cfg = objective("diffusion=elbo", "distill=none")
    d = cfg.diffusion
    assert d.schedule.value == "linear"
    data, ids = batch(), batch()["input_ids"]
    seen = spy(obj.model)
    with torch.no_grad():
        out = run(obj, data, seed=7)
    torch.manual_seed(7)
    t = sample_t(B, L // BS, per=d.t_per.value, eps=d.eps, antithetic=d.antithetic)
    _, masked, _ = mask_tokens(
        ids,
        t,
        block_size=BS,
        mask_id=obj.mask_id,
        schedule="linear",
        mask_range=tuple(d.mask_range),
        loss_mask=data["loss_mask"],
    )
    (p,) = seen["passes"]
    assert torch.equal(masks_of(p["noisy"], obj.mask_id, ids), masked) and masked.any()
    ce = token_ce(p["logits"], ids)
    t_tok = t.double().repeat_interleave(BS, dim=1)
    want = (ce / t_tok)[masked].sum() / data["loss_mask"].sum()
    plain = ce[masked].mean()
    assert float(out["loss"]) == approx(want) and float(out["ce"]) == approx(want)
    assert float(out["masked_ce"]) == approx(plain)  # the unweighted metric stays plain
    # the weight matters on this batch: not the plain mean, nor the plain mean rescaled
    assert abs(want - plain) > 0.1 * plain
    rescaled = (ce / t_tok)[masked].mean()
    assert float(out["loss"]) != approx(rescaled, rel=1e-3)


def test_distill_none_is_the_plain_ce_and_kd_adds_its_weight() -> None:
    """distill=none: no "kd" metric, loss == ce == the hand mean CE over masked positions.
    distill=kd (weight 0.5): the same CE (same weights, same draws), loss = ce + 0.5 kd."""
    data, ids = batch(), batch()["input_ids"]
    none, _ = objective("distill=none")
    perturb(none.model)
    seen = spy(none.model)
    with torch.no_grad():
        out = run(none, data)
    (p,) = seen["passes"]
    masked = masks_of(p["noisy"], none.mask_id, ids)
    assert "kd" not in out and len(seen["context"]) == 1
    assert torch.equal(out["loss"], out["ce"])
    assert float(out["ce"]) == approx(token_ce(p["logits"], ids)[masked].mean())
    kd, _ = objective("distill=kd", "distill.weight=0.5")
    perturb(kd.model)
    with torch.no_grad():
        out_kd = run(kd, data)
    assert float(out_kd["ce"]) == approx(out["ce"], rel=1e-6)
    assert float(out_kd["kd"]) > 1e-3
    assert float(out_kd["loss"]) == approx(out_kd["ce"] + 0.5 * out_kd["kd"])


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kd_is_the_hand_kl_to_the_backbone_in_its_direction(direction: str) -> None:
    """kd = mean over masked positions p >= 1 of the KL between the AR backbone's own
    next-token distribution at p - 1 (computed here with the plain HF forward) and the
    denoiser at p, in ``distill.direction``; the other direction gives a different value."""
    obj, _ = objective("distill=kd", f"distill.direction={direction}")
    perturb(obj.model)
    data, ids = batch(), batch()["input_ids"]
    seen = spy(obj.model)
    with torch.no_grad():
        out = run(obj, data, seed=3)
        teacher = obj.model.backbone(input_ids=ids).logits
    (p,) = seen["passes"]
    masked = masks_of(p["noisy"], obj.mask_id, ids)[:, 1:]  # position 0 has no teacher
    kl = {d: token_kl(p["logits"], teacher, d)[masked].mean() for d in ("forward", "reverse")}
    other = "reverse" if direction == "forward" else "forward"
    assert float(out["kd"]) == approx(kl[direction])
    assert abs(kl[direction] - kl[other]) > 0.05 * kl[direction]
    assert float(out["loss"]) == approx(out["ce"] + out["kd"])


def test_time_conditioning_feeds_the_rate_and_trains_the_modulation() -> None:
    """denoiser.time_conditioning=true: the denoiser gets each block's mask rate (linear
    schedule: t), its output moves with that rate once the zero-initialised modulation is
    perturbed, the first backward reaches the modulation, and one engine step changes it."""
    init_distributed()
    obj, cfg = objective("denoiser.time_conditioning=true", "distill=none")
    model, data, ids = obj.model, batch(), batch()["input_ids"]
    cond = model.denoiser.time_cond
    assert model.config.time_conditioning and cond is not None
    seen = spy(model)
    out = run(obj, data, seed=2)
    out["loss"].backward()
    (p,) = seen["passes"]
    rate, noisy = p["t"], p["noisy"]
    torch.manual_seed(2)
    d = cfg.diffusion
    t = sample_t(B, L // BS, per=d.t_per.value, eps=d.eps, antithetic=d.antithetic)
    assert rate is not None and torch.equal(rate, t)
    assert cond.table.grad is not None and cond.table.grad.abs().sum() > 0
    assert cond.mlp[-1].weight.grad is not None and cond.mlp[-1].weight.grad.abs().sum() > 0
    with torch.no_grad():
        ctx = model.context_forward(ids)
        lo, hi = (model.denoise(noisy, ctx, t=r) for r in (rate, 1.0 - rate))
        # (the spy's call ran with autograd on: the same up to kernel rounding)
        torch.testing.assert_close(lo, p["logits"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lo, hi, rtol=0, atol=0)  # zero-initialised: no effect
        g = torch.Generator().manual_seed(0)
        saved = [q.detach().clone() for q in cond.parameters()]
        for q in cond.parameters():
            q.add_(0.05 * torch.randn(q.shape, generator=g))
        lo, hi = (model.denoise(noisy, ctx, t=r) for r in (rate, 1.0 - rate))
        assert (lo - hi).abs().max() > 1e-3
        for q, s in zip(cond.parameters(), saved):
            q.copy_(s)
    # one optimizer step through the engine: the modulation leaves zero
    obj.zero_grad()
    engine, _, _ = engine_for(obj, cfg)
    out = engine(data)
    engine.backward(out["loss"])
    engine.step()
    assert cond.table.abs().sum() > 0 and cond.mlp[-1].weight.abs().sum() > 0


def test_complementary_passes_split_the_maskable_positions() -> None:
    """diffusion.complementary=true: one context pass, two denoiser passes; every maskable
    position is masked in exactly one of them, the prompt in neither; ce and kd are the
    per-token means over both passes' masked positions, computed here."""
    obj, _ = objective("diffusion.complementary=true", "distill=kd", "distill.weight=0.5")
    perturb(obj.model)
    data, ids = batch(), batch()["input_ids"]
    maskable = data["loss_mask"]
    seen = spy(obj.model)
    with torch.no_grad():
        out = run(obj, data, seed=5)
        teacher = obj.model.backbone(input_ids=ids).logits
    assert len(seen["context"]) == 1 and len(seen["passes"]) == 2
    p1, p2 = seen["passes"]
    m1, m2 = (masks_of(p["noisy"], obj.mask_id, ids) for p in (p1, p2))
    assert not (m1 & m2).any() and torch.equal(m1 | m2, maskable)
    assert m1.sum() != m2.sum()  # uneven halves: a mean of the two means would differ
    ce = torch.cat([token_ce(p1["logits"], ids)[m1], token_ce(p2["logits"], ids)[m2]])
    kd = torch.cat(
        [
            token_kl(p1["logits"], teacher, "forward")[m1[:, 1:]],
            token_kl(p2["logits"], teacher, "forward")[m2[:, 1:]],
        ]
    )
    assert float(out["ce"]) == approx(ce.mean()) and float(out["kd"]) == approx(kd.mean())
    assert float(out["loss"]) == approx(ce.mean() + 0.5 * kd.mean())


def _suffix_of_maskable(masked: torch.Tensor, maskable: torch.Tensor) -> bool:
    """Whether, in every block, the masked positions are the last k maskable ones."""
    for row in range(B):
        for start in range(0, L, BS):
            m = masked[row, start : start + BS].tolist()
            ok = [i for i, x in enumerate(maskable[row, start : start + BS].tolist()) if x]
            k = sum(m)
            if [i for i, x in enumerate(m) if x] != ok[len(ok) - k :]:
                return False
    return True


def test_suffix_prob_one_masks_a_suffix_of_every_block() -> None:
    """diffusion.suffix_prob=1.0: every block the denoiser sees masks its last k maskable
    positions (each masked position followed only by masked ones), k being the count the
    independent draw of the same seed gives that block."""
    data, ids = batch(), batch()["input_ids"]
    maskable = data["loss_mask"]
    found = {}
    for share in ("0.0", "1.0"):
        obj, _ = objective(f"diffusion.suffix_prob={share}", "distill=none")
        seen = spy(obj.model)
        with torch.no_grad():
            run(obj, data, seed=4)
        found[share] = masks_of(seen["passes"][0]["noisy"], obj.mask_id, ids)
    plain, suffix = found["0.0"], found["1.0"]
    assert not _suffix_of_maskable(plain, maskable)  # the independent draw is not a suffix
    assert _suffix_of_maskable(suffix, maskable) and not (suffix & ~maskable).any()
    per_block = lambda m: m.view(B, L // BS, BS).sum(-1)  # noqa: E731
    assert torch.equal(per_block(suffix), per_block(plain)) and suffix.any()
    # within a block, no clean maskable position after a masked one
    blocks = suffix.view(B, L // BS, BS).long()
    assert (blocks[..., 1:] >= blocks[..., :-1]).all()


def test_block_curriculum_passes_2_then_4_then_the_model_block_size() -> None:
    """diffusion.block_curriculum=[2,4] on a block-8 model: progress 0, 1/3, 2/3 run the
    towers at block 2, 4, 8 (passed to each call; the model's own block size never moves),
    and the block-2 loss is the one of the model called with block_size=2 here."""
    obj, cfg = objective("diffusion.block_curriculum=[2,4]", "distill=kd")
    perturb(obj.model)
    model, data, ids = obj.model, batch(), batch()["input_ids"]
    seen = spy(model)
    losses = {}
    with torch.no_grad():
        for progress in (0.0, 0.34, 0.67, 1.0):
            obj.progress = progress
            losses[progress] = float(run(obj, data, seed=6)["loss"])
            assert model.config.block_size == BS
    assert [c.get("block_size") for c in seen["context"]] == [2, 4, 8, 8]
    assert [p.get("block_size") for p in seen["passes"]] == [2, 4, 8, 8]
    # block 2 by hand: same draws, the model called at block 2 explicitly
    d = cfg.diffusion
    torch.manual_seed(6)
    t = sample_t(B, L // 2, per=d.t_per.value, eps=d.eps, antithetic=d.antithetic)
    noisy, masked, _ = mask_tokens(
        ids, t, block_size=2, mask_id=obj.mask_id, schedule="linear", loss_mask=data["loss_mask"]
    )
    assert torch.equal(noisy, seen["passes"][0]["noisy"])
    with torch.no_grad():
        ctx = model.context_forward(ids, block_size=2)
        small = model.denoise(noisy, ctx, block_size=2)
        ctx8 = model.context_forward(ids, block_size=BS)
        big = model.denoise(noisy, ctx8, block_size=BS)
    teacher = ctx.logits

    def loss(logits: torch.Tensor) -> float:
        ce = token_ce(logits, ids)[masked].mean()
        return float(ce + token_kl(logits, teacher, "forward")[masked[:, 1:]].mean())

    assert losses[0.0] == approx(loss(small))
    assert abs(losses[0.0] - loss(big)) > 1e-3 * losses[0.0]  # the block size matters here
    assert model.config.block_size == BS
