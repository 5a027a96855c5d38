"""No leakage: which input tokens each denoiser output may depend on, measured by perturbing
one token at a time (all perturbations stacked into one batch)."""

import copy

import pytest
import torch

from twotower_train.model import TwoTowerModel
from twotower_train.model.tiny import FAMILIES, tiny_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


VOCAB, MASK, BLOCK, LENGTH = 128, 127, 4, 12
CHANGED, UNCHANGED = 1e-4, 1e-5


def dependency(fn, clean, noisy, which):
    """bool ``[L, L]``: ``dep[p, i]`` = output i changes when input token p of ``which``
    (``"clean"`` or ``"noisy"``) is replaced. Asserts a clear gap between the two cases."""
    length = clean.shape[1]
    # row p perturbs token p; the last row is the unperturbed baseline (same batch, same kernels)
    clean_b, noisy_b = clean.repeat(length + 1, 1), noisy.repeat(length + 1, 1)
    target = clean_b if which == "clean" else noisy_b
    idx = torch.arange(length)
    target[idx, idx] = (target[idx, idx] + 1 + idx % 7) % (VOCAB - 1)
    out = fn(clean_b, noisy_b)
    diff = (out[:-1] - out[-1:]).abs().amax(-1)  # [L perturbed, L outputs]
    ambiguous = (diff > UNCHANGED) & (diff < CHANGED)
    assert not ambiguous.any(), diff[ambiguous]
    return diff >= CHANGED


def expected(length, block, docs=None, shift=True):
    """With ``shift`` (the default model), output i is read from position i - 1: the
    denoiser's inside a block, the context tower's at a block's first position."""
    pos = torch.arange(length)
    blk = pos // block
    clean_dep = blk[None, :] > blk[:, None]  # clean p -> outputs of later blocks
    noisy_dep = blk[None, :] == blk[:, None]  # noisy p -> outputs of its own block
    src = (pos - 1).clamp(min=0) if shift else pos
    if shift:
        noisy_dep[:, pos % block == 0] = False  # block starts read the clean prefix only
    if docs is not None:
        same = docs[:, None] == docs[src][None, :]
        clean_dep, noisy_dep = clean_dep & same, noisy_dep & same
    return clean_dep, noisy_dep


def build(family, **kwargs):
    backbone = tiny_backbone(family)
    return TwoTowerModel.from_backbone(
        copy.deepcopy(backbone), block_size=BLOCK, mask_token_id=MASK, **kwargs
    )


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, VOCAB - 1, (1, LENGTH), generator=g)
    noisy = torch.where(torch.rand(clean.shape, generator=g) < 0.5, MASK, clean)
    return clean, noisy


CASES = [(f, {}) for f in FAMILIES] + [
    ("nemotron_h", {"mamba_bidirectional": True}),
    ("nemotron_h", {"denoiser_layers": 3}),
    ("qwen3", {"denoiser_layers": 1}),
]


@pytest.mark.parametrize("family,kwargs", CASES, ids=lambda c: str(c))
def test_no_leakage(family, kwargs):
    model = build(family, **kwargs)
    clean, noisy = inputs()
    want_clean, want_noisy = expected(LENGTH, BLOCK)
    with torch.no_grad():
        assert torch.equal(dependency(model, clean, noisy, "clean"), want_clean)
        assert torch.equal(dependency(model, clean, noisy, "noisy"), want_noisy)


@pytest.mark.parametrize("family", ["llama", "nemotron_h"])
def test_no_leakage_across_documents(family):
    model = build(family, mamba_bidirectional=family == "nemotron_h")
    clean, noisy = inputs(1)
    docs = torch.tensor([0] * 5 + [1] * 2 + [2] * 5)  # boundaries inside blocks
    want_clean, want_noisy = expected(LENGTH, BLOCK, docs)

    def fn(c, n):
        return model(c, n, doc_ids=docs.expand(c.shape[0], -1))

    with torch.no_grad():
        assert torch.equal(dependency(fn, clean, noisy, "clean"), want_clean)
        assert torch.equal(dependency(fn, clean, noisy, "noisy"), want_noisy)


@pytest.mark.parametrize("family", ["qwen2", "nemotron_h"])
def test_context_tower_documents(family):
    """With documents, each document's context logits equal the backbone run on it alone."""
    model = build(family)
    clean, _ = inputs(2)
    docs = torch.tensor([[0] * 5 + [1] * 2 + [2] * 5])
    with torch.no_grad():
        logits = model.context_forward(clean, doc_ids=docs).logits
        for d in range(3):
            span = docs[0] == d
            alone = model.backbone(clean[:, span]).logits.float()
            err = (logits[:, span] - alone).abs().max()
            assert err <= 1e-5 * alone.abs().max(), err


@pytest.mark.parametrize("family", FAMILIES)
def test_unshifted_pattern_and_shifted_block_starts(family):
    clean, noisy = inputs()
    plain = build(family, shift_logits=False)
    want_clean, want_noisy = expected(LENGTH, BLOCK, shift=False)
    with torch.no_grad():
        assert torch.equal(dependency(plain, clean, noisy, "clean"), want_clean)
        assert torch.equal(dependency(plain, clean, noisy, "noisy"), want_noisy)
        shifted = build(family)
        out = shifted(clean, noisy)
        ctx = shifted.context_logits(clean)
        for start in range(BLOCK, LENGTH, BLOCK):  # block starts = the AR teacher's prediction
            torch.testing.assert_close(out[:, start], ctx[:, start - 1], rtol=1e-5, atol=1e-5)
        assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))
