"""Element-wise checks of the diffusion math: schedules, time sampling, masking, losses."""

from __future__ import annotations

import math

import pytest
import torch

from twotower_train.diffusion import (
    diffusion_ce,
    distillation_kl,
    elbo_weight,
    expand_blocks,
    mask_prob,
    mask_tokens,
    sample_t,
    shift_teacher_logits,
)

# ---------------------------------------------------------------- schedules


def test_mask_prob_hand_values() -> None:
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(mask_prob(t, "linear"), t)
    cosine = torch.tensor([1 - math.cos(math.pi / 2 * x) for x in t.tolist()])
    assert torch.allclose(mask_prob(t, "cosine"), cosine, atol=1e-7)
    assert mask_prob(torch.tensor(0.5), "cosine").item() == pytest.approx(1 - math.cos(math.pi / 4))
    assert mask_prob(torch.tensor(1.0), "cosine").item() == pytest.approx(1.0)


def test_elbo_weight_closed_form() -> None:
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(elbo_weight(t, "linear").double(), 1 / t)
    x = math.pi * t / 2
    brief = (math.pi / 2) * torch.sin(x) / (1 - torch.cos(x))
    assert torch.allclose(elbo_weight(t, "cosine").double(), brief, rtol=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_elbo_weight_matches_finite_difference(schedule: str) -> None:
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-3
    m = lambda x: mask_prob(x, schedule).double()  # noqa: E731
    dm = (m(t + h) - m(t - h)) / (2 * h)
    assert torch.allclose(elbo_weight(t, schedule).double(), dm / m(t), rtol=1e-3)


def test_unknown_schedule_raises() -> None:
    with pytest.raises(ValueError):
        mask_prob(torch.tensor(0.5), "sqrt")  # type: ignore[arg-type]


# ---------------------------------------------------------------- time sampling


@pytest.mark.parametrize("per", ["example", "block"])
@pytest.mark.parametrize("antithetic", [False, True])
def test_sample_t_shape_and_range(per: str, antithetic: bool) -> None:
    g = torch.Generator().manual_seed(0)
    eps = 0.05
    t = sample_t(16, 4, per=per, eps=eps, antithetic=antithetic, generator=g)
    assert t.shape == (16, 4) and t.dtype == torch.float32
    assert (t >= eps).all() and (t <= 1).all()


def test_sample_t_per_example_repeats_across_blocks() -> None:
    g = torch.Generator().manual_seed(1)
    t = sample_t(8, 5, per="example", generator=g)
    assert torch.equal(t, t[:, :1].expand(8, 5))
    t = sample_t(8, 5, per="block", generator=torch.Generator().manual_seed(1))
    assert not torch.equal(t, t[:, :1].expand(8, 5))


@pytest.mark.parametrize("per, n", [("example", 12), ("block", 36)])
def test_sample_t_antithetic_one_draw_per_stratum(per: str, n: int) -> None:
    eps = 0.1
    g = torch.Generator().manual_seed(2)
    t = sample_t(12, 3, per=per, eps=eps, antithetic=True, generator=g)
    draws = t[:, 0] if per == "example" else t.flatten()
    u = (draws.double() - eps) / (1 - eps)
    strata = torch.floor(u.sort().values * n).long()
    assert torch.equal(strata, torch.arange(n))
    # Shuffled: strata are not laid out in batch order.
    assert not torch.equal(torch.floor(u * n).long(), torch.arange(n))


def test_sample_t_deterministic_given_generator() -> None:
    a = sample_t(4, 3, per="block", antithetic=True, generator=torch.Generator().manual_seed(7))
    b = sample_t(4, 3, per="block", antithetic=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


# ---------------------------------------------------------------- masking


def test_expand_blocks() -> None:
    x = torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    assert torch.equal(
        expand_blocks(x, 3), torch.tensor([[0.1] * 3 + [0.2] * 3, [0.3] * 3 + [0.4] * 3])
    )


def test_mask_tokens_respects_loss_mask() -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (4, 16), generator=g)
    loss_mask = torch.ones(4, 16, dtype=torch.bool)
    loss_mask[:, :5] = False  # prompt
    loss_mask[2, 12:] = False  # padding
    t = torch.ones(4, 4)  # m(1) = 1: every maskable position is masked
    noisy, masked, p = mask_tokens(
        ids, t, block_size=4, mask_id=99, schedule="linear", loss_mask=loss_mask, generator=g
    )
    assert torch.equal(masked, loss_mask)
    assert torch.equal(noisy[~loss_mask], ids[~loss_mask])
    assert (noisy[loss_mask] == 99).all()
    assert (p[~loss_mask] == 0).all() and (p[loss_mask] == 1).all()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_mask_tokens_empirical_rate(schedule: str) -> None:
    g = torch.Generator().manual_seed(3)
    ids = torch.zeros(512, 64, dtype=torch.long)
    t = torch.full((512, 4), 0.6)
    _, masked, p = mask_tokens(ids, t, block_size=16, mask_id=1, schedule=schedule, generator=g)
    expected = mask_prob(torch.tensor(0.6), schedule).item()
    assert torch.allclose(p, torch.full_like(p, expected))
    assert masked.float().mean().item() == pytest.approx(expected, abs=0.01)  # ~7 sigma


def test_mask_tokens_per_block_rates_differ() -> None:
    g = torch.Generator().manual_seed(4)
    ids = torch.zeros(256, 32, dtype=torch.long)
    t = torch.tensor([0.1, 0.5, 0.9, 0.3]).expand(256, 4)
    _, masked, _ = mask_tokens(ids, t, block_size=8, mask_id=1, schedule="linear", generator=g)
    rates = masked.view(256, 4, 8).float().mean(dim=(0, 2))
    assert torch.allclose(rates, t[0], atol=0.03)


def test_mask_tokens_mask_range_clamps() -> None:
    g = torch.Generator().manual_seed(5)
    ids = torch.zeros(2, 8, dtype=torch.long)
    t = torch.tensor([[0.05, 0.5], [0.95, 0.7]])
    _, _, p = mask_tokens(
        ids, t, block_size=4, mask_id=1, schedule="linear", mask_range=(0.2, 0.8), generator=g
    )
    assert torch.allclose(p, expand_blocks(torch.tensor([[0.2, 0.5], [0.8, 0.7]]), 4))


def test_mask_tokens_deterministic_given_seed() -> None:
    ids = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(0))
    t = torch.rand(3, 3, generator=torch.Generator().manual_seed(1))

    def run(seed: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        return mask_tokens(ids, t, block_size=4, mask_id=99, schedule="cosine", generator=g)

    a, b, c = run(11), run(11), run(12)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[1], c[1])


def test_mask_tokens_rejects_bad_block_size() -> None:
    with pytest.raises(ValueError):
        mask_tokens(
            torch.zeros(1, 10, dtype=torch.long),
            torch.ones(1, 3),
            block_size=3,
            mask_id=0,
            schedule="linear",
        )


# ---------------------------------------------------------------- diffusion CE


def _example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=g)
    targets = torch.randint(0, 5, (2, 4), generator=g)
    masked = torch.tensor([[True, False, True, True], [False, True, False, False]])
    t_tok = torch.tensor([[0.2, 0.2, 0.7, 0.7], [0.4, 0.4, 0.9, 0.9]])
    return logits, targets, masked, t_tok


def _ce(logits_row: torch.Tensor, target: int) -> float:
    return -(logits_row[target] - torch.logsumexp(logits_row, 0)).item()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_diffusion_ce_against_loop(schedule: str) -> None:
    logits, targets, masked, t_tok = _example()
    terms, weighted = [], 0.0
    for b in range(2):
        for p in range(4):
            if masked[b, p]:
                ce = _ce(logits[b, p], targets[b, p].item())
                terms.append(ce)
                weighted += elbo_weight(t_tok[b, p], schedule).item() * ce
    num_loss_tokens = 7  # e.g. one position of the 8 is a prompt token
    none = diffusion_ce(logits, targets, masked, weighting="none")
    elbo = diffusion_ce(
        logits,
        targets,
        masked,
        t_tok=t_tok,
        weighting="elbo",
        schedule=schedule,
        num_loss_tokens=num_loss_tokens,
    )
    assert none.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert elbo.item() == pytest.approx(weighted / num_loss_tokens, rel=1e-5)


def test_diffusion_ce_fp32_from_bf16_and_empty_mask() -> None:
    logits, targets, masked, _ = _example()
    out = diffusion_ce(logits.bfloat16(), targets, masked)
    assert out.dtype == torch.float32
    leaf = logits.clone().requires_grad_(True)
    zero = diffusion_ce(leaf, targets, torch.zeros_like(masked))
    assert zero.item() == 0.0
    zero.backward()
    assert (leaf.grad == 0).all()


def test_diffusion_ce_elbo_needs_t_and_count() -> None:
    logits, targets, masked, t_tok = _example()
    with pytest.raises(ValueError):
        diffusion_ce(logits, targets, masked, weighting="elbo", t_tok=t_tok)


# ---------------------------------------------------------------- teacher shift and KD


def test_shift_teacher_logits_elementwise() -> None:
    ctx = torch.randn(2, 5, 7)
    teacher, valid = shift_teacher_logits(ctx)
    assert teacher.shape == ctx.shape and valid.shape == (2, 5)
    for b in range(2):
        assert not valid[b, 0]
        for p in range(1, 5):
            assert valid[b, p]
            assert torch.equal(teacher[b, p], ctx[b, p - 1])


def _kl_by_hand(a_logits: torch.Tensor, b_logits: torch.Tensor, temp: float) -> float:
    a = torch.softmax(a_logits.double() / temp, -1)
    b = torch.softmax(b_logits.double() / temp, -1)
    return sum(a[v].item() * math.log(a[v].item() / b[v].item()) for v in range(a.numel()))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kd_zero_when_equal(direction: str) -> None:
    logits, _, masked, t_tok = _example()
    kd = distillation_kl(logits, logits.clone(), masked, temperature=2.0, direction=direction)
    assert kd.item() == 0.0
    kd = distillation_kl(
        logits, logits, masked, direction=direction, t_tok=t_tok, t_weighting="1-t"
    )
    assert kd.item() == 0.0


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("t_weighting", ["none", "t", "1-t"])
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_kd_against_hand_computation(direction: str, t_weighting: str, temp: float) -> None:
    student, _, masked, t_tok = _example()
    teacher = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(9))
    total, count = 0.0, 0
    for b in range(2):
        for p in range(4):
            if not masked[b, p]:
                continue
            s, q = student[b, p], teacher[b, p]
            kl = _kl_by_hand(q, s, temp) if direction == "forward" else _kl_by_hand(s, q, temp)
            a = {"none": 1.0, "t": t_tok[b, p].item(), "1-t": 1 - t_tok[b, p].item()}[t_weighting]
            total += a * kl
            count += 1
    expected = total / count * temp**2
    kd = distillation_kl(
        student,
        teacher,
        masked,
        temperature=temp,
        direction=direction,
        t_tok=t_tok,
        t_weighting=t_weighting,
    )
    assert kd.item() > 0
    assert kd.item() == pytest.approx(expected, rel=1e-4)


def test_kd_forward_and_reverse_differ() -> None:
    student, _, masked, _ = _example()
    teacher = 3 * torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(9))
    fwd = distillation_kl(student, teacher, masked, direction="forward")
    rev = distillation_kl(student, teacher, masked, direction="reverse")
    assert fwd.item() != pytest.approx(rev.item(), rel=1e-3)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kd_gradient_reaches_student_not_teacher(direction: str) -> None:
    student_base, _, masked, _ = _example()
    student = student_base.clone().requires_grad_(True)
    context = torch.randn(2, 4, 5, requires_grad=True)
    teacher, valid = shift_teacher_logits(context)
    kd = distillation_kl(student, teacher, masked & valid, direction=direction)
    kd.backward()
    assert context.grad is None
    assert student.grad is not None and student.grad[masked & valid].abs().sum() > 0
    assert (student.grad[~(masked & valid)] == 0).all()


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kd_finite_with_banned_tokens(direction: str) -> None:
    student_base, _, masked, _ = _example()
    student = student_base.clone()
    student[..., 4] = -torch.inf  # e.g. the [MASK] id banned from the denoiser's output
    teacher = student_base.clone()
    teacher[..., 4] = -torch.inf
    student.requires_grad_(True)
    kd = distillation_kl(student, teacher, masked, direction=direction)
    kd.backward()
    assert torch.isfinite(kd) and torch.isfinite(student.grad).all()


def test_after_eos_targets():
    from twotower_train.diffusion import after_eos_targets

    ids = torch.tensor([[5, 6, 1, 7, 8, 9, 1, 4]])
    in_doc = torch.tensor([[1, 1, 1, 0, 1, 1, 1, 0]], dtype=torch.bool)  # block 4, EOS at 2, 6
    loss_mask = torch.tensor([[1, 1, 1, 0, 1, 1, 1, 1]], dtype=torch.bool)  # 3: next prompt
    targets, maskable, scored = after_eos_targets(ids, in_doc, loss_mask, mode="ignore")
    assert torch.equal(targets, ids)
    # after the EOS every position may be masked, even the next document's prompt token:
    # a position that never is would show where the document ended
    assert maskable.all()
    assert scored.tolist() == [[1, 1, 1, 0, 1, 1, 1, 0]]
    targets, maskable, scored = after_eos_targets(ids, in_doc, loss_mask, mode="eos", eos_id=1)
    assert targets.tolist() == [[5, 6, 1, 1, 8, 9, 1, 1]]
    assert maskable.all() and scored.all()
    targets, maskable, scored = after_eos_targets(ids, in_doc, loss_mask, mode="keep")
    assert torch.equal(targets, ids) and maskable.all() and torch.equal(scored, loss_mask)
    with pytest.raises(ValueError, match="eos_id"):
        after_eos_targets(ids, in_doc, loss_mask, mode="eos")
    with pytest.raises(ValueError, match="unknown after_eos"):
        after_eos_targets(ids, in_doc, loss_mask, mode="drop")


def test_mask_tokens_suffix_blocks_move_the_same_count_to_the_end() -> None:
    """suffix_prob=1: every block masks its last k maskable positions, k = the count the
    independent draw gave it (same generator state); loss_mask False is never masked."""
    b, nb, bs = 3, 5, 8
    ids = torch.arange(b * nb * bs).view(b, nb * bs) + 10
    loss_mask = torch.rand(b, nb * bs, generator=torch.Generator().manual_seed(3)) > 0.2
    t = torch.rand(b, nb, generator=torch.Generator().manual_seed(4))
    kw = dict(block_size=bs, mask_id=0, schedule="linear", loss_mask=loss_mask)
    _, iid, _ = mask_tokens(ids, t, generator=torch.Generator().manual_seed(5), **kw)
    noisy, suf, _ = mask_tokens(
        ids, t, generator=torch.Generator().manual_seed(5), suffix_prob=1.0, **kw
    )
    assert torch.equal(noisy == 0, suf) and not (suf & ~loss_mask).any()
    for r in range(b):
        for n in range(nb):
            sl = slice(n * bs, (n + 1) * bs)
            k = int(iid[r, sl].sum())
            ok = [p for p in range(bs) if loss_mask[r, sl][p]]
            want = set(ok[len(ok) - k :]) if k else set()
            assert {p for p in range(bs) if suf[r, sl][p]} == want
    # suffix_prob=0 is the independent draw, bit for bit; a share picks whole blocks
    _, zero, _ = mask_tokens(
        ids, t, generator=torch.Generator().manual_seed(5), suffix_prob=0.0, **kw
    )
    assert torch.equal(zero, iid)
    _, half, _ = mask_tokens(
        ids, t, generator=torch.Generator().manual_seed(5), suffix_prob=0.5, **kw
    )
    per_block = lambda m: m.view(b, nb, bs)  # noqa: E731
    same = (per_block(half) == per_block(iid)).all(-1) | (per_block(half) == per_block(suf)).all(-1)
    assert same.all()
    with pytest.raises(ValueError, match="suffix_prob"):
        mask_tokens(ids, t, suffix_prob=1.5, **kw)
