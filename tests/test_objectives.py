"""How ``TwoTowerObjective`` combines its parts: the teacher, the distillation weight, the
time weighting, time conditioning -- each checked against an independent computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY

from twotower_train.backbones import load_backbone, load_tokenizer
from twotower_train.config import compose
from twotower_train.run.train import build_objective

pytestmark = pytest.mark.usefixtures("one_thread")

# A random tiny Llama (scratch) as backbone, block 8, fp32.
TT = [*TINY, "train.objective=twotower", "denoiser.block_size=8", "precision=fp32"]


def objective(*overrides: str):
    cfg = compose([*TT, *overrides])
    tokenizer = load_tokenizer(cfg.backbone)
    torch.manual_seed(0)  # the same weights whatever the overrides
    return build_objective(cfg, load_backbone(cfg.backbone, tokenizer), tokenizer)


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 2048, (2, 32), generator=g)
    return {"input_ids": ids, "loss_mask": torch.ones_like(ids, dtype=torch.bool)}


def run(obj, seed: int = 1, **kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)  # the objective draws t and masks from the global RNG
    return obj(batch(), **kwargs)


def spy_passes(model) -> dict:
    """Record the context tower's logits and each denoiser pass's (noisy ids, logits, t).
    The objective asks for hidden states only (``logits=False``); the spy records the full
    logits of the same call besides."""
    seen: dict = {"passes": []}
    context_forward, denoise = model.context_forward, model.denoise

    def ctx_spy(clean, **kw):
        seen["context"] = context_forward(clean, **{**kw, "logits": True}).logits
        return context_forward(clean, **kw)

    def den_spy(noisy, ctx_out, t=None, **kw):
        logits = denoise(noisy, ctx_out, t=t, **{**kw, "logits": True})
        seen["passes"].append((noisy, logits, t))
        return denoise(noisy, ctx_out, t=t, **kw)

    model.context_forward, model.denoise = ctx_spy, den_spy
    return seen


def test_teacher_is_the_shifted_context_logits() -> None:
    """KD = mean over masked positions p >= 1 of KL(softmax(context[p - 1]) || softmax(student[p]))."""
    obj = objective("distill=kd", "distill.weight=1.0")
    seen = spy_passes(obj.model)
    with torch.no_grad():
        out = run(obj)
    (noisy, student, _), context = seen["passes"][0], seen["context"]
    seen["noisy"] = noisy
    masked = seen["noisy"] == obj.mask_id
    masked[:, 0] = False  # position 0 has no teacher
    b, p = masked.nonzero(as_tuple=True)
    kl = F.kl_div(
        F.log_softmax(student[b, p], -1),
        F.log_softmax(context[b, p - 1], -1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    assert masked.any() and float(out["kd"]) == pytest.approx(float(kl.mean()), rel=1e-5)


def _grads(obj, **overrides) -> torch.Tensor:
    obj.zero_grad()
    for k, v in overrides.items():
        setattr(obj.distill, k, v)
    run(obj)["loss"].backward()
    return torch.cat([p.grad.flatten() for p in obj.model.denoiser.parameters()])


def test_distill_weight_scales_the_kd_gradient() -> None:
    obj = objective("distill=kd")
    g0, g1, g3 = (_grads(obj, weight=w) for w in (0.0, 1.0, 3.0))
    assert not torch.allclose(g0, g1)
    # loss = CE + w KD: the gradient is affine in w
    torch.testing.assert_close(g3 - g0, 3 * (g1 - g0), rtol=1e-3, atol=1e-6)


def test_t_weighting_changes_the_kd_term() -> None:
    values = {}
    for weighting in ("none", "t", "one_minus_t"):  # the enum's names (1-t is its value)
        with torch.no_grad():
            values[weighting] = float(
                run(objective("distill=kd", f"distill.t_weighting={weighting}"))["kd"]
            )
    # same masks and t (same seed): t and 1 - t split the unweighted mean between them
    assert values["t"] != pytest.approx(values["none"]) and values["t"] < values["none"]
    assert values["t"] + values["one_minus_t"] == pytest.approx(values["none"], rel=1e-5)


def test_ce_weighting_changes_the_loss() -> None:
    with torch.no_grad():
        plain = run(objective("diffusion.weighting=none"))
        elbo = run(objective("diffusion.weighting=elbo"))
    assert float(plain["masked_ce"]) == pytest.approx(float(elbo["masked_ce"]), rel=1e-6)
    assert float(plain["loss"]) != pytest.approx(float(elbo["loss"]))


def test_time_conditioning_reads_the_mask_rate() -> None:
    """The flag is not ignored: the denoiser's output moves with the rate it is given once
    its (zero-initialised) modulation is non-zero, and the objective feeds it m(t)."""
    obj = objective("denoiser.time_conditioning=true", "diffusion.schedule=cosine")
    model = obj.model
    assert model.denoiser.time_cond is not None
    with torch.no_grad():
        for p in model.denoiser.time_cond.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = batch()["input_ids"]
    noisy = ids.masked_fill(torch.rand(ids.shape) < 0.5, obj.mask_id)
    with torch.no_grad():
        lo = model(ids, noisy, t=torch.full((2,), 0.1))
        hi = model(ids, noisy, t=torch.full((2,), 0.9))
    assert (lo - hi).abs().max() > 1e-3
    seen = spy_passes(model)
    with torch.no_grad():
        run(obj, seed=3)
    seen["noisy"], _, rate = seen["passes"][
        0
    ]  # [B, nb]: each block's mask probability under the cosine schedule
    frac = (seen["noisy"] == obj.mask_id).float().view(2, -1, 8).mean(-1)
    assert rate.shape == frac.shape and ((rate - frac).abs() < 0.5).all()
    assert not torch.equal(rate, torch.zeros_like(rate))


def test_complementary_pass_supervises_the_other_half() -> None:
    """diffusion.complementary: a second denoiser pass whose masked set is exactly the
    complement of the first (over maskable positions), reading rate 1 - m(t); the CE is the
    per-token mean over both passes' masked positions, each against a direct computation."""
    obj = objective("diffusion.complementary=true", "denoiser.time_conditioning=true")
    seen = spy_passes(obj.model)
    with torch.no_grad():
        out = run(obj, seed=5)
    (n1, l1, r1), (n2, l2, r2) = seen["passes"]
    m1, m2 = n1 == obj.mask_id, n2 == obj.mask_id
    assert torch.equal(m1, ~m2)  # every position masked in exactly one pass
    torch.testing.assert_close(r2, 1.0 - r1)
    ids = batch()["input_ids"]
    ce = torch.cat(
        [
            F.cross_entropy(l1[m1], ids[m1], reduction="none"),
            F.cross_entropy(l2[m2], ids[m2], reduction="none"),
        ]
    )
    assert float(out["ce"]) == pytest.approx(float(ce.mean()), rel=1e-5)
    assert float(out["masked_ce"]) == pytest.approx(float(ce.mean()), rel=1e-5)
    # one pass when off; the first pass draws the same masks either way
    plain = objective("denoiser.time_conditioning=true")
    seen_plain = spy_passes(plain.model)
    with torch.no_grad():
        run(plain, seed=5)
    assert len(seen_plain["passes"]) == 1 and torch.equal(seen_plain["passes"][0][0], n1)


def test_suffix_masking_reaches_the_denoiser() -> None:
    obj = objective("diffusion.suffix_prob=1.0")
    seen = spy_passes(obj.model)
    with torch.no_grad():
        run(obj, seed=2)
    masked = (seen["passes"][0][0] == obj.mask_id).view(2, -1, 8).long()
    # each block: masked positions form a suffix (never a clean token after a masked one)
    assert (masked[..., 1:] >= masked[..., :-1]).all() and masked.any()


def test_complementary_with_elbo_weighting_is_refused() -> None:
    from twotower_train.config import ConfigError

    with pytest.raises(ConfigError, match="complementary"):
        compose([*TT, "diffusion.complementary=true", "diffusion.weighting=elbo"])
    with pytest.raises(ConfigError, match="suffix_prob"):
        compose([*TT, "diffusion.suffix_prob=2"])


def test_block_curriculum_trains_the_early_steps_at_the_small_size() -> None:
    """diffusion.block_curriculum=[4]: the first half of the steps is exactly the block-4
    objective (same weights, same draws), the second half the model's own block 8; the model
    keeps its block size between steps."""
    obj = objective("diffusion.block_curriculum=[4]")
    small = objective("denoiser.block_size=4")
    assert [obj.training_block_size() for obj.progress in (0.0, 0.49, 0.5, 1.0)] == [4, 4, 8, 8]
    obj.diffusion.block_curriculum = [2, 16]  # stages 2, 8 (capped), 8
    assert [obj.training_block_size() for obj.progress in (0.0, 0.4, 0.7)] == [2, 8, 8]
    obj.diffusion.block_curriculum = [4]
    plain = objective()
    with torch.no_grad():
        obj.progress = 0.2
        early = run(obj, seed=4)
        assert obj.model.config.block_size == 8
        obj.progress = 0.7
        late = run(obj, seed=4)
        assert float(early["loss"]) == pytest.approx(float(run(small, seed=4)["loss"]), rel=1e-6)
        assert float(late["loss"]) == pytest.approx(float(run(plain, seed=4)["loss"]), rel=1e-6)
    assert float(early["loss"]) != pytest.approx(float(late["loss"]), rel=1e-3)


def test_block_curriculum_sizes_must_divide_the_row() -> None:
    from twotower_train.config import ConfigError

    with pytest.raises(ConfigError, match="block_curriculum"):
        compose([*TT, "diffusion.block_curriculum=[3]"])  # 3 does not divide seq_len 32
    with pytest.raises(ConfigError, match="block_curriculum"):
        compose([*TT, "diffusion.block_curriculum=[0]"])
    compose([*TT, "diffusion.block_curriculum=[4,64]"])  # 64 is capped at the block size 8
