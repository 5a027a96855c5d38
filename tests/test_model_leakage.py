"""No leakage: which input tokens each denoiser output may depend on, measured by perturbing
one token at a time (all perturbations stacked into one batch)."""

import copy

import pytest
import torch
from tiny_models import FAMILIES, tiny_backbone

from twotower_train.model import TwoTowerModel

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
    ("nemotron_h", {"layers": 3}),
    ("qwen3", {"layers": 1}),
]


@pytest.mark.parametrize("family,kwargs", CASES, ids=lambda c: str(c))
def test_no_leakage(family, kwargs):
    model = build(family, **kwargs)
    clean, noisy = inputs()
    want_clean, want_noisy = expected(LENGTH, BLOCK)
    with torch.no_grad():
        assert torch.equal(dependency(model, clean, noisy, "clean"), want_clean)
        assert torch.equal(dependency(model, clean, noisy, "noisy"), want_noisy)


def expected_with_docs(length, block, docs):
    """Dependencies with fixed ``docs [L]``: block n belongs to the document open at its start
    (``docs[n * bs]``); it reads that document's clean tokens of blocks 0..n-1 and all of its
    own noisy block, whatever boundary lies inside it. A block's first position reads the
    context tower at the clean token before it, within that token's document."""
    pos = torch.arange(length)
    blk = pos // block
    block_doc = docs[blk * block]
    clean_dep = (blk[:, None] < blk[None, :]) & (docs[:, None] == block_doc[None, :])
    starts = pos % block == 0
    prev = (pos - 1).clamp(min=0)
    start_dep = (pos[:, None] <= prev[None, :]) & (docs[:, None] == docs[prev][None, :])
    start_dep[:, 0] = False
    clean_dep[:, starts] = start_dep[:, starts]
    noisy_dep = blk[:, None] == blk[None, :]
    noisy_dep[:, starts] = False
    return clean_dep, noisy_dep


EOS = 1
# Boundaries inside blocks (after 5 and 9), one closing a block (after 7: block 2 opens a
# new document) and a masked EOS in block 1 (position 5).
DOC_CLEAN = torch.tensor([[9, 20, 31, 42, 53, EOS, 64, EOS, 75, EOS, 86, 97]])
DOC_MASKED = torch.tensor([[0, 1, 0, 0, 1, 1, 1, 1, 0, 1, 1, 0]], dtype=torch.bool)


def docs_from_clean(clean, eos=EOS):
    """Document ids as the loader builds them: an EOS closes its document."""
    end = (clean == eos).long()
    return torch.cumsum(end, dim=1) - end


DOC_CASES = (
    [(f, "sdpa", {}) for f in FAMILIES]
    + [(f, "flex", {}) for f in FAMILIES]
    + [
        ("nemotron_h", "sdpa", {"mamba_bidirectional": True}),
        ("qwen3", "sdpa", {"layers": 2}),
    ]
)


@pytest.mark.parametrize("family,attn,kwargs", DOC_CASES, ids=lambda c: str(c))
def test_no_leakage_across_documents(family, attn, kwargs):
    """Fixed documents: the exact dependency pattern of ``expected_with_docs``."""
    model = build(family, attn_impl=attn, **kwargs)
    clean = DOC_CLEAN
    noisy = torch.where(DOC_MASKED, MASK, clean)
    docs = docs_from_clean(clean)[0]
    want_clean, want_noisy = expected_with_docs(LENGTH, BLOCK, docs)

    def fn(c, n):
        return model(c, n, doc_ids=docs.expand(c.shape[0], -1))

    with torch.no_grad():
        assert torch.equal(dependency(fn, clean, noisy, "clean"), want_clean)
        assert torch.equal(dependency(fn, clean, noisy, "noisy"), want_noisy)


@pytest.mark.parametrize("family,attn,kwargs", DOC_CASES, ids=lambda c: str(c))
def test_masked_eos_cannot_be_read(family, attn, kwargs):
    """The bug of issue 8: with ``doc_ids`` built from each clean row as the loader builds
    them, making any MASKED token an EOS (or an EOS another token) must not move its own
    block's logits nor any earlier block's -- through the one-pass forward and the
    per-block reference alike."""
    model = build(family, attn_impl=attn, **kwargs)
    rows = [DOC_CLEAN[0]]
    for p in range(LENGTH):
        row = DOC_CLEAN[0].clone()
        row[p] = 50 if row[p] == EOS else EOS
        rows.append(row)
    clean = torch.stack(rows)  # [1 + L, L]: row 0 the original, row 1 + p changes token p
    noisy = torch.where(DOC_MASKED, MASK, clean)
    docs = docs_from_clean(clean)
    with torch.no_grad():
        for out in (
            model(clean, noisy, doc_ids=docs),
            model.reference_forward(clean, noisy, doc_ids=docs),
        ):
            for p in range(LENGTH):
                blk = p // BLOCK
                keep = (blk + 1) * BLOCK if DOC_MASKED[0, p] else blk * BLOCK
                diff = (out[1 + p, :keep] - out[0, :keep]).abs().max().item() if keep else 0.0
                assert diff <= UNCHANGED, (p, diff)


@pytest.mark.parametrize("family,attn,kwargs", DOC_CASES, ids=lambda c: str(c))
def test_one_pass_equals_reference_with_documents(family, attn, kwargs):
    """With documents the one-pass forward equals decoding each block after only its own
    document's clean prefix (``reference_forward(..., doc_ids=)``)."""
    model = build(family, attn_impl=attn, **kwargs)
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(2, VOCAB - 1, (3, 4 * BLOCK), generator=g)
    for row, eos_at in enumerate([(5, 7, 11), (3, 8, 15), ()]):
        clean[row, list(eos_at)] = EOS
    noisy = torch.where(torch.rand(clean.shape, generator=g) < 0.5, MASK, clean)
    docs = docs_from_clean(clean)
    with torch.no_grad():
        out = model(clean, noisy, doc_ids=docs)
        ref = model.reference_forward(clean, noisy, doc_ids=docs)
    err = (out - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item(), err


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
