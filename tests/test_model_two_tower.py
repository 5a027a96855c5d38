"""TwoTowerModel on tiny random backbones of every family (CPU, fp32)."""

import copy

import pytest
import torch
from tiny_models import FAMILIES, tiny_backbone

from twotower_train.model import TwoTowerModel

VOCAB, MASK = 128, 127


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def backbone(family):
    return tiny_backbone(family)


def build(backbone, **kwargs):
    kwargs.setdefault("block_size", 4)
    return TwoTowerModel.from_backbone(copy.deepcopy(backbone), mask_token_id=MASK, **kwargs)


def batch(length, seed=0, batch_size=2):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, VOCAB - 1, (batch_size, length), generator=g)
    noisy = torch.where(torch.rand(clean.shape, generator=g) < 0.5, MASK, clean)
    return clean, noisy


def assert_rel_close(actual, expected, rel=1e-5):
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rel * scale, f"max abs err {err:.3g} > {rel} x {scale:.3g}"


# -- the context tower is the backbone ------------------------------------------------------


def test_context_logits_equal_hf(backbone):
    model = build(backbone)
    clean, _ = batch(12)
    with torch.no_grad():
        expected = backbone(clean).logits.float()
    assert_rel_close(model.context_logits(clean), expected)
    # incremental: chunks of uneven sizes through the cache give the same logits
    cache, parts = None, []
    for start, stop in [(0, 5), (5, 6), (6, 12)]:
        cache, logits = model.context_extend(cache, clean[:, start:stop])
        parts.append(logits)
    assert cache.length == 12
    assert_rel_close(torch.cat(parts, 1), expected)


def test_context_tower_frozen_and_denoiser_trained(backbone):
    model = build(backbone)
    model.train()
    assert not model.backbone.training
    assert not any(m.training for m in model.backbone.modules())
    assert model.denoiser.training
    assert all(not p.requires_grad for p in model.context.parameters())
    clean, noisy = batch(8)
    logits, teacher = model.forward_train(clean, noisy)
    assert logits.shape == (2, 8, VOCAB) and teacher.shape == (2, 8, VOCAB)
    assert not teacher.requires_grad
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), clean.flatten())
    loss = loss + torch.nn.functional.kl_div(
        logits.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean"
    )
    loss.backward()
    assert all(p.grad is None for p in model.context.parameters())
    missing = [n for n, p in model.denoiser.named_parameters() if p.grad is None]
    assert not missing, missing
    assert any(p.grad.abs().sum() > 0 for p in model.denoiser.parameters())


def test_denoiser_is_a_copy(backbone):
    model = build(backbone, layers=2, tie_head=True)
    assert model.denoiser.head.weight is model.denoiser.embed.weight
    context_params = {id(p) for p in model.context.parameters()}
    assert not any(id(p) in context_params for p in model.denoiser.parameters())
    assert len(model.denoiser.layers) == 2
    n = len(model.context.layers)
    assert model.denoiser.layer_ids == [n - 2, n - 1]
    # the values: the top two layers of the backbone, everything outside the layers as is
    for layer, i in zip(model.denoiser.layers, model.denoiser.layer_ids):
        theirs = model.context.layers[i].state_dict()
        for name, value in layer.state_dict().items():
            assert torch.equal(value, theirs[name]), (i, name)
    theirs = model.backbone.state_dict()
    outside = {  # (the head is tied to the embedding here; the untied head is compared below)
        k: v
        for k, v in model.denoiser.model.state_dict().items()
        if ".layers." not in k and not k.startswith("lm_head.")
    }
    assert outside and all(torch.equal(v, theirs[k]) for k, v in outside.items())
    untied = build(backbone)
    # without tie_head the copy keeps the backbone's own tying (Gemma ties, Llama does not)
    tied = backbone.get_output_embeddings().weight is backbone.get_input_embeddings().weight
    assert (untied.denoiser.head.weight is untied.denoiser.embed.weight) == tied
    assert torch.equal(untied.denoiser.head.weight, untied.backbone.get_output_embeddings().weight)
    # a lower layer of the same kind differs (the comparison above is not vacuous)
    top = model.denoiser.layers[-1].state_dict()
    lower = [model.context.layers[j].state_dict() for j in range(n - 2)]
    same_kind = [sd for sd in lower if sd.keys() == top.keys()]
    assert same_kind and all(any(not torch.equal(sd[k], top[k]) for k in top) for sd in same_kind)


# -- one pass == per-block loop -------------------------------------------------------------


@pytest.mark.parametrize(
    "block_size,layers",
    # 3 and 5 do not divide Nemotron-H's Mamba chunk of 8; 1 is shorter than its conv window
    [(4, None), (3, None), (5, 2), (8, 3), (1, None)],
)
def test_one_pass_equals_reference(backbone, block_size, layers):
    model = build(backbone, block_size=block_size, layers=layers)
    clean, noisy = batch(4 * block_size, seed=block_size)
    with torch.no_grad():
        out = model(clean, noisy)
    assert out.shape == (2, 4 * block_size, VOCAB)
    assert_rel_close(out, model.reference_forward(clean, noisy))


def test_context_dtype_bf16(backbone):
    model = build(backbone, context_dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in model.context.parameters())
    assert all(p.dtype == torch.float32 for p in model.denoiser.parameters())
    clean, noisy = batch(8)
    with torch.no_grad():
        expected = model.backbone(clean).logits.float()
        got = model.context_logits(clean)
        out = model(clean, noisy)
    assert got.dtype == torch.float32 and out.dtype == torch.float32
    assert_rel_close(got, expected, rel=2e-2)
    assert_rel_close(out, model.reference_forward(clean, noisy), rel=1e-2)  # bf16 context


# -- time conditioning and bidirectional Mamba ----------------------------------------------


def test_time_conditioning_zero_init_is_identity(backbone):
    plain = build(backbone)
    timed = build(backbone, time_conditioning=True)
    clean, noisy = batch(8)
    t = torch.tensor([[0.2, 0.9], [0.5, 0.7]])
    with torch.no_grad():
        torch.testing.assert_close(timed(clean, noisy, t=t), plain(clean, noisy), rtol=0, atol=0)
        # once trained (here: randomised) it matters, and still equals the per-block loop
        for p in timed.denoiser.time_cond.parameters():
            p.normal_(0, 0.05)
        out = timed(clean, noisy, t=t)
        assert (out - plain(clean, noisy)).abs().max() > 1e-3
        assert_rel_close(out, timed.reference_forward(clean, noisy, t=t))
        # per-block t and its per-token expansion agree
        torch.testing.assert_close(out, timed(clean, noisy, t=t.repeat_interleave(4, 1)))


def test_time_conditioning_gets_gradients(backbone):
    model = build(backbone, time_conditioning=True)
    clean, noisy = batch(8)
    model(clean, noisy, t=torch.rand(2)).logsumexp(-1).mean().backward()
    for name, p in model.denoiser.time_cond.named_parameters():
        if name != "mlp.0.bias" and name != "mlp.0.weight":  # behind the zero-init last layer
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family_name", ["nemotron_h"])
def test_mamba_bidirectional(family_name):
    backbone = tiny_backbone(family_name)
    forward_only = build(backbone, block_size=4)
    both = build(backbone, block_size=4, mamba_bidirectional=True)
    clean, noisy = batch(16)
    with torch.no_grad():
        out = both(clean, noisy)
        assert (out - forward_only(clean, noisy)).abs().max() > 1e-3
        assert_rel_close(out, both.reference_forward(clean, noisy))


def test_flex_matches_sdpa_model():
    backbone = tiny_backbone("nemotron_h")
    sdpa = build(backbone, block_size=4)
    flex = build(backbone, block_size=4, attn_impl="flex")
    clean, noisy = batch(12)
    docs = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    with torch.no_grad():
        assert_rel_close(flex(clean, noisy), sdpa(clean, noisy))
        assert_rel_close(flex(clean, noisy, doc_ids=docs), sdpa(clean, noisy, doc_ids=docs))


def test_bad_arguments():
    backbone = tiny_backbone("llama")
    with pytest.raises(ValueError):
        TwoTowerModel.from_backbone(copy.deepcopy(backbone), mask_token_id=VOCAB + 1)
    with pytest.raises(ValueError):
        TwoTowerModel.from_backbone(copy.deepcopy(backbone), mask_token_id=MASK, attn_impl="x")
    with pytest.raises(ValueError):
        build(backbone, layers=99)
    with pytest.raises(ValueError, match="block_size"):
        build(backbone, block_size=0)
    with pytest.raises(TypeError, match="unknown two-tower setting"):
        build(backbone, denoiser_layers=2)  # the old name
    with pytest.raises(ValueError, match="mask_token_id is not set"):
        TwoTowerModel.from_backbone(copy.deepcopy(backbone))
    model = build(backbone)
    clean, noisy = batch(6)
    with pytest.raises(ValueError):
        model(clean, noisy)  # 6 is not a multiple of block 4
