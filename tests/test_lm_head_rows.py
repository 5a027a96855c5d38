"""The LM head on scored rows only (``train.lm_head=rows``) against full ``[B, L, V]``
logits (``full``): the same losses, metrics and gradients, on every family the towers
serve differently (Llama, Qwen3, Gemma3 with sliding and global layers and a final
softcap, Nemotron-H with Mamba and MoE, Cohere's and Granite's logit multipliers), with and
without KD and documents; and no LM-head call ever sees more rows than a chunk."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_backbone

from twotower_train.config import (
    CEWeighting,
    DiffusionConfig,
    DistillConfig,
    KDDirection,
    KDTimeWeighting,
)
from twotower_train.model import TwoTowerModel
from twotower_train.model.head import chunk_rows, chunked_sums
from twotower_train.objectives import CausalLMObjective, TwoTowerObjective

pytestmark = pytest.mark.usefixtures("one_thread")

B, L, BS, V = 2, 24, 4, 128


def two_tower(family: str, **overrides) -> TwoTowerModel:
    """A tiny two-tower model whose denoiser has moved away from the backbone (its own
    head differs from the context tower's, so a row read from the wrong head shows)."""
    backbone = tiny_backbone(
        family, **({"final_logit_softcapping": 3.0} if "gemma" in family else {})
    )
    config = dict(block_size=BS, mask_token_id=V - 1, shift_logits=True) | overrides
    model = TwoTowerModel.from_backbone(backbone, **config).train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.denoiser.named_parameters():
            if "time_cond" not in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def batch(docs: bool) -> dict[str, torch.Tensor]:
    """Random ids, a 3-token prompt in row 1; with ``docs`` row 0 holds three documents,
    one of which starts inside a block."""
    ids = torch.randint(3, V - 1, (B, L), generator=torch.Generator().manual_seed(0))
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    loss_mask[1, :3] = False
    out = {"input_ids": ids, "loss_mask": loss_mask}
    if docs:
        out["doc_ids"] = torch.tensor([[0] * 6 + [1] * 10 + [2] * 8, [0] * L])
    return out


def loss_and_grads(objective, data, seed: int = 3):
    model = objective.model
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same t and masks for both objectives
    out = objective(data)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


def assert_same(full, rows) -> None:
    (out_f, grad_f), (out_r, grad_r) = full, rows
    assert out_f.keys() == out_r.keys()
    for key in out_f:
        torch.testing.assert_close(out_r[key], out_f[key], rtol=1e-5, atol=1e-5, msg=key)
    assert grad_f.keys() == grad_r.keys() and grad_f
    for name in grad_f:
        torch.testing.assert_close(grad_r[name], grad_f[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "family", ["llama", "qwen3", "gemma3_text", "nemotron_h", "cohere", "granite"]
)
@pytest.mark.parametrize("kd", [0.0, 1.0])
@pytest.mark.parametrize("docs", [False, True])
def test_rows_equal_full_logits(family, kd, docs):
    model = two_tower(family)
    distill = DistillConfig(weight=kd)
    make = lambda head, chunk: TwoTowerObjective(  # noqa: E731
        model, DiffusionConfig(), distill, lm_head=head, chunk=chunk
    )
    data = batch(docs)
    # chunk 5: several chunks per pass, one cut inside every kind of row group
    assert_same(loss_and_grads(make("full", 0), data), loss_and_grads(make("rows", 5), data))


@pytest.mark.parametrize(
    "diffusion, distill, model_kw",
    [
        (dict(weighting=CEWeighting.elbo, complementary=True), dict(weight=0.5), {}),
        (
            dict(),
            dict(
                weight=1.0,
                direction=KDDirection.reverse,
                temperature=2.0,
                t_weighting=KDTimeWeighting.t,
            ),
            {},
        ),
        (
            dict(),
            dict(weight=1.0, t_weighting=KDTimeWeighting.one_minus_t),
            dict(shift_logits=False),
        ),
        (dict(complementary=True), dict(weight=1.0), dict(time_conditioning=True)),
    ],
)
def test_rows_equal_full_logits_with_every_lever(diffusion, distill, model_kw):
    model = two_tower("llama", **model_kw)
    if model.denoiser.time_cond is not None:  # modulation away from its zero init
        with torch.no_grad():
            for p in model.denoiser.time_cond.parameters():
                p.add_(0.05 * torch.randn_like(p))
    make = lambda head: TwoTowerObjective(  # noqa: E731
        model, DiffusionConfig(**diffusion), DistillConfig(**distill), lm_head=head, chunk=7
    )
    data = batch(docs=True)
    assert_same(loss_and_grads(make("full"), data), loss_and_grads(make("rows"), data))


def test_no_head_call_sees_more_than_a_chunk():
    """With ``rows`` and KD on, every LM-head call of either tower reads at most a chunk of
    rows (forward and the backward's recompute); ``full`` reads [B, L] at once."""
    model = two_tower("llama")
    seen: list[int] = []
    heads = [model.denoiser.model.get_output_embeddings(), model.backbone.get_output_embeddings()]
    hooks = [
        h.register_forward_hook(lambda m, a, o: seen.append(a[0].numel() // a[0].shape[-1]))
        for h in heads
    ]
    try:
        rows = TwoTowerObjective(model, DiffusionConfig(), DistillConfig(weight=1.0), chunk=6)
        torch.manual_seed(0)
        rows(batch(docs=False))["loss"].backward()
        assert seen and max(seen) <= 6
        seen.clear()
        full = TwoTowerObjective(
            model, DiffusionConfig(), DistillConfig(weight=1.0), lm_head="full"
        )
        torch.manual_seed(0)
        full(batch(docs=False))
        assert max(seen) == B * L
    finally:
        for h in hooks:
            h.remove()


def test_causal_lm_rows_equal_full_logits():
    backbone = tiny_backbone("gemma3_text", final_logit_softcapping=3.0).train()
    data = batch(docs=False)
    full = loss_and_grads(CausalLMObjective(backbone, lm_head="full"), data)
    rows = loss_and_grads(CausalLMObjective(backbone, lm_head="rows", chunk=5), data)
    assert_same(full, rows)


def test_chunked_sums_recompute_matches_one_piece():
    """Checkpointed chunks give the one-piece sum and gradient; an empty row set gives a
    zero still attached to the graph."""
    x = torch.randn(11, 3, requires_grad=True)
    w = torch.randn(3, 5)

    def fn(start, stop, weights):
        return ((x[start:stop] @ w).logsumexp(-1) * weights).sum(), (x[start:stop] @ w).sum()

    weights = torch.rand(11)
    one = chunked_sums(fn, 11, 11, weights)
    (g_one,) = torch.autograd.grad(one[0], x)
    many = chunked_sums(fn, 11, 3, weights)
    (g_many,) = torch.autograd.grad(many[0], x)
    torch.testing.assert_close(many[0], one[0])
    torch.testing.assert_close(many[1], one[1])
    torch.testing.assert_close(g_many, g_one)
    empty = chunked_sums(lambda a, b: ((x[a:b] @ w).sum(),), 0, 4)
    assert empty[0].item() == 0 and empty[0].requires_grad
    assert chunk_rows(262_144) == 256 and chunk_rows(49_152) == 1365 and chunk_rows(10, 7) == 7


def test_lm_head_config_is_checked_and_does_not_block_a_resume():
    from twotower_train.config import ConfigError, compose
    from twotower_train.run.run_dir import NOT_TRAINING

    with pytest.raises(ConfigError, match="lm_head_chunk"):
        compose(["train.lm_head_chunk=-1"])
    with pytest.raises(Exception, match="lm_head"):
        compose(["train.lm_head=some"])
    assert "train.lm_head" in NOT_TRAINING and "train.lm_head_chunk" in NOT_TRAINING
