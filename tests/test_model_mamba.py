"""The plain-torch Mamba-2 (SSD) scan and conv used by both towers."""

import pytest
import torch
from torch import nn

from twotower_train.model.mamba import causal_conv, segment_sum, ssd_scan

pytestmark = pytest.mark.usefixtures("one_thread")


def naive_scan(x, dt, A, B, C, h, reset=None):
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T ; y_t = C_t h_t -- one token at a time."""
    H, G = x.shape[2], B.shape[2]
    B = B.repeat_interleave(H // G, 2)
    C = C.repeat_interleave(H // G, 2)
    ys, states = [], []
    for t in range(x.shape[1]):
        if reset is not None:
            h = h * (~reset[:, t]).float()[:, None, None, None]
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
        states.append(h)
    return torch.stack(ys, 1), torch.stack(states, 1)


def _inputs(T=21, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, H, P, G, N = 2, 4, 3, 2, 5
    x = torch.randn(b, T, H, P, generator=g)
    dt = torch.rand(b, T, H, generator=g) * 0.5
    A = -torch.rand(H, generator=g) * 2
    B = torch.randn(b, T, G, N, generator=g)
    C = torch.randn(b, T, G, N, generator=g)
    h0 = torch.randn(b, H, P, N, generator=g)
    return x, dt, A, B, C, h0


def test_segment_sum():
    a = torch.tensor([1.0, 2.0, 3.0])
    seg = segment_sum(a)
    assert seg[2, 0] == 5.0 and seg[2, 2] == 0.0 and seg[1, 0] == 2.0
    assert torch.isinf(seg[0, 1]) and seg[0, 1] < 0


@pytest.mark.parametrize("chunk", [1, 4, 5, 8, 32])
def test_ssd_scan_matches_sequential(chunk):
    x, dt, A, B, C, h0 = _inputs()
    y_ref, s_ref = naive_scan(x, dt, A, B, C, h0)
    y, states = ssd_scan(x, dt, A, B, C, chunk_size=chunk, initial_state=h0)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    ends = [min((c + 1) * chunk, x.shape[1]) - 1 for c in range(states.shape[1])]
    torch.testing.assert_close(states, s_ref[:, ends], rtol=1e-5, atol=1e-5)


def test_ssd_scan_without_states():
    x, dt, A, B, C, h0 = _inputs(T=7)
    y_ref, _ = naive_scan(x, dt, A, B, C, h0)
    for chunk in (7, 8, 3):  # one padded chunk, or several
        y, states = ssd_scan(
            x, dt, A, B, C, chunk_size=chunk, initial_state=h0, return_states=False
        )
        assert states is None
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y, _ = ssd_scan(x, dt, A, B, C, chunk_size=8, return_states=False)
    torch.testing.assert_close(y, naive_scan(x, dt, A, B, C, torch.zeros_like(h0))[0])


def test_ssd_scan_resets():
    x, dt, A, B, C, h0 = _inputs()
    reset = torch.zeros(x.shape[:2], dtype=torch.bool)
    reset[0, [0, 6, 7, 15]] = True
    reset[1, [3, 4]] = True
    y_ref, s_ref = naive_scan(x, dt, A, B, C, h0, reset)
    y, states = ssd_scan(x, dt, A, B, C, chunk_size=4, initial_state=h0, reset=reset)
    assert not torch.isnan(y).any()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(states[:, -1], s_ref[:, -1], rtol=1e-5, atol=1e-5)


def test_ssd_scan_matches_hf_chunk_scan():
    from transformers.models.nemotron_h.modeling_nemotron_h import mamba2_chunk_scan

    x, _, A, B, C, h0 = _inputs()
    dt_raw = torch.randn(x.shape[:3])
    y_hf, final_hf = mamba2_chunk_scan(
        x,
        dt_raw,
        A,
        B,
        C,
        chunk_size=8,
        initial_states=h0,
        dt_softplus=True,
        return_final_states=True,
        dt_limit=(0.001, float("inf")),
    )
    dt = torch.clamp(torch.nn.functional.softplus(dt_raw), min=0.001)
    y, states = ssd_scan(x, dt, A, B, C, chunk_size=3, initial_state=h0)
    torch.testing.assert_close(y, y_hf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(states[:, -1], final_hf, rtol=1e-5, atol=1e-5)


def test_causal_conv_prefix_and_docs():
    torch.manual_seed(0)
    channels, K, T = 6, 4, 9
    conv = nn.Conv1d(channels, channels, K, groups=channels, padding=K - 1)
    xbc = torch.randn(2, T, channels)
    zeros = torch.zeros(2, K - 1, channels)
    # zero prefix == the HF-style padded conv
    expected = conv(xbc.transpose(1, 2))[..., :T].transpose(1, 2)
    torch.testing.assert_close(causal_conv(xbc, zeros, conv), expected)
    # one document everywhere == no documents
    prefix = torch.randn(2, K - 1, channels)
    same = torch.zeros(2, K - 1 + T, dtype=torch.long)
    torch.testing.assert_close(causal_conv(xbc, prefix, conv, same), causal_conv(xbc, prefix, conv))
    # a document starting at token 4 sees nothing before it
    docs = torch.cat([torch.zeros(2, K - 1 + 4), torch.ones(2, T - 4)], 1).long()
    out = causal_conv(xbc, prefix, conv, docs)
    torch.testing.assert_close(out[:, 4:], causal_conv(xbc[:, 4:], zeros, conv))
