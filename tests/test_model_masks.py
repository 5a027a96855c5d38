"""Block masks of the two-tower model: element by element, and the two attention paths."""

import pytest
import torch

from twotower_train.model import block_causal_mask, block_causal_mask_mod, denoiser_attention_mask
from twotower_train.model.attention import attend, denoiser_block_mask, flex_available
from twotower_train.model.masks import block_document_ids, causal_mask, context_attention_mask

# L = 6, block 2: rows = denoiser queries 0..5, columns = [context keys 0..5 ; own keys 0..5].
EXPECTED_L6_B2 = torch.tensor(
    [
        # ctx: 0  1  2  3  4  5   own: 0  1  2  3  4  5
        [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0],  # q0 (block 0): no context, own block 0
        [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0],  # q1
        [1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0],  # q2 (block 1): clean block 0, own block 1
        [1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0],  # q3
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1],  # q4 (block 2): clean blocks 0-1, own block 2
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1],  # q5
    ],
    dtype=torch.bool,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_block_causal_mask_hand_written():
    mask = block_causal_mask(6, 2)
    assert mask.dtype == torch.bool and mask.shape == (6, 12)
    assert torch.equal(mask, EXPECTED_L6_B2)


def test_block_causal_mask_partial_last_block():
    # L = 5, block 2: the last block holds one token.
    mask = block_causal_mask(5, 2)
    assert mask[4].tolist() == [1, 1, 1, 1, 0] + [0, 0, 0, 0, 1]


def test_block_causal_mask_block_one_and_full():
    # block 1: context strictly before, own = itself only.
    mask = block_causal_mask(4, 1)
    assert torch.equal(mask[:, :4], torch.tril(torch.ones(4, 4, dtype=torch.bool), -1))
    assert torch.equal(mask[:, 4:], torch.eye(4, dtype=torch.bool))
    # one block covering everything: no context, full bidirectional.
    mask = block_causal_mask(4, 4)
    assert not mask[:, :4].any() and mask[:, 4:].all()


def _mask_from_mod(mod, batch, seq_len):
    b = torch.arange(batch)[:, None, None]
    q = torch.arange(seq_len)[None, :, None]
    kv = torch.arange(2 * seq_len)[None, None, :]
    h = torch.zeros((), dtype=torch.long)
    return mod(b, h, q, kv)


@pytest.mark.parametrize("seq_len,block", [(6, 2), (12, 4), (10, 3), (8, 1), (8, 8)])
def test_mask_mod_matches_dense(seq_len, block):
    mod = block_causal_mask_mod(seq_len, block)
    assert torch.equal(_mask_from_mod(mod, 1, seq_len)[0], block_causal_mask(seq_len, block))


def test_doc_mask_dense_and_mod():
    """Block n belongs to the document open at its start (``docs[n * bs]``): its context keys
    are that document's, its own block is never split, whatever boundary lies inside it."""
    docs = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 2]])
    dense = denoiser_attention_mask(6, 2, docs)[:, 0]  # [B, L, 2L]
    mod = _mask_from_mod(block_causal_mask_mod(6, 2, docs), 2, 6)
    assert torch.equal(dense, mod)
    assert torch.equal(
        block_document_ids(docs, 2), torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1]])
    )
    for b in range(2):
        for i in range(6):
            block_doc = docs[b, (i // 2) * 2]
            for j in range(12):
                same_doc = bool(docs[b, j] == block_doc) if j < 6 else True
                assert dense[b, i, j] == (EXPECTED_L6_B2[i, j] & same_doc)
    # Sequence 0: the boundary at 3 lies inside block 1 -- q3 still reads block 1's document
    # (0) in the context and its whole block; nothing tells it a document starts at 3.
    assert dense[0, 3].tolist() == [1, 1, 0, 0, 0, 0] + [0, 0, 1, 1, 0, 0]
    assert torch.equal(dense[0, 2], dense[0, 3])
    # Sequence 1: block 1 opens at position 2 inside document 1 (the EOS closing document 0
    # is clean token 0): context key 1 only. Block 2 is document 1 too (the boundary at 5 is
    # inside it): context keys 1-3.
    assert dense[1, 2].tolist() == [0, 1, 0, 0, 0, 0] + [0, 0, 1, 1, 0, 0]
    assert dense[1, 5].tolist() == [0, 1, 1, 1, 0, 0] + [0, 0, 0, 0, 1, 1]


def test_causal_masks():
    assert torch.equal(causal_mask(3, 0), torch.tril(torch.ones(3, 3, dtype=torch.bool)))
    assert causal_mask(2, 3).tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert context_attention_mask(4) is None
    docs = torch.tensor([[0, 0, 1, 1]])
    expected = torch.tensor(
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(context_attention_mask(4, docs)[0, 0], expected)


@pytest.mark.skipif(not flex_available(), reason="no FlexAttention in this torch")
@pytest.mark.parametrize("with_docs", [False, True])
def test_flex_matches_sdpa(with_docs):
    torch.manual_seed(0)
    batch, heads, kv_heads, seq_len, block, dim = 2, 4, 2, 12, 4, 8
    q = torch.randn(batch, heads, seq_len, dim)
    k = torch.randn(batch, kv_heads, 2 * seq_len, dim)
    v = torch.randn(batch, kv_heads, 2 * seq_len, dim)
    docs = torch.tensor([[0] * 5 + [1] * 7, [0] * 12]) if with_docs else None
    dense = denoiser_attention_mask(seq_len, block, docs)
    flex = denoiser_block_mask(seq_len, block, docs, q.device)
    out_sdpa = attend(q, k, v, scale=dim**-0.5, mask=dense)
    out_flex = attend(q, k, v, scale=dim**-0.5, mask=flex)
    torch.testing.assert_close(out_flex, out_sdpa, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_compiled_flex_on_cuda_matches_sdpa():
    """The CUDA path: compiled FlexAttention with documents equals the SDPA boolean mask."""
    seq_len, block, heads, dim = 64, 16, 4, 32
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, heads, n, dim, generator=g).cuda()
        for n in (seq_len, 2 * seq_len, 2 * seq_len)
    )
    docs = torch.tensor([[0] * 20 + [1] * 30 + [2] * 14, [0] * 64]).cuda()
    dense = denoiser_attention_mask(seq_len, block, docs, device="cuda")
    flex = denoiser_block_mask(seq_len, block, docs, q.device)
    out_sdpa = attend(q, k, v, scale=dim**-0.5, mask=dense)
    out_flex = attend(q, k, v, scale=dim**-0.5, mask=flex)
    torch.testing.assert_close(out_flex, out_sdpa, rtol=2e-4, atol=2e-4)


def test_document_positions_restart_per_document_and_blocks_continue_theirs():
    from twotower_train.model.masks import block_document_positions, document_positions

    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2], [5, 5, 5, 5, 5, 5, 5, 5]])
    assert document_positions(docs).tolist() == [
        [0, 1, 2, 0, 1, 2, 3, 0],
        [0, 1, 2, 3, 4, 5, 6, 7],
    ]
    # block 0 (positions 0-3) continues document 0 past its end at position 3; block 1 starts
    # inside document 1 (its position 1) and continues it past the EOS before position 7
    assert block_document_positions(docs, 4).tolist() == [
        [0, 1, 2, 3, 1, 2, 3, 4],
        [0, 1, 2, 3, 4, 5, 6, 7],
    ]
