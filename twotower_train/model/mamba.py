"""Mamba-2 (SSD) in plain torch, driven by an HF Mamba-2 mixer's own weights.

Works with any HF mixer exposing the usual Mamba-2 attributes (``in_proj``, ``conv1d``,
``A_log``, ``D``, ``dt_bias``, ``norm`` (gated RMSNorm), ``out_proj``, ``num_heads``,
``head_dim``, ``n_groups``, ``ssm_state_size``, ``intermediate_size``, ``conv_dim``,
``conv_kernel_size``, ``time_step_limit``, ``act``) -- e.g. ``NemotronHMamba2Mixer``.

Why our own scan instead of the mixer's ``forward``: the two towers need things the HF
forward does not expose in one pass -- the SSM state at *every* block boundary (context
tower), and a scan that starts each block from its own initial conv + SSM state
(denoiser, ``[B * nb, bs, ...]``) -- plus optional document resets.

State conventions (per mixer, ``C = conv_dim``, ``H = num_heads``, ``P = head_dim``,
``N = ssm_state_size``, ``K = conv_kernel_size``):

* conv state: the last ``K - 1`` *pre-convolution* ``xBC`` rows, ``[B, K - 1, C]``.
* SSM state: ``[B, H, P, N]``, fp32.

Cost of ``ssd_scan`` with chunk ``Q`` over ``T`` tokens: intra-chunk ``O(T * Q)`` (quadratic
in Q), inter-chunk ``O((T / Q)^2)`` over ``H * P * N`` states -- fine for the chunk = block
size used here at the sequence lengths of this project; a fused kernel would replace it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def segment_sum(a: torch.Tensor) -> torch.Tensor:
    """``a [..., T]`` -> ``[..., T, T]`` with ``out[i, j] = sum(a[j+1 .. i])`` (i >= j), else -inf.

    Built from a masked cumsum, never a difference of cumsums, so ``a = -inf`` (a state reset)
    gives exact zeros after ``exp`` and no NaNs.
    """
    length = a.shape[-1]
    x = a[..., None].expand(*a.shape, length)  # x[..., i, j] = a[i]
    strict = torch.tril(torch.ones(length, length, dtype=torch.bool, device=a.device), -1)
    x = x.masked_fill(~strict, 0)
    out = torch.cumsum(x, dim=-2)
    keep = torch.tril(torch.ones(length, length, dtype=torch.bool, device=a.device), 0)
    return out.masked_fill(~keep, -torch.inf)


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    return_states: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked SSD scan (Mamba-2), fp32, without the ``D`` skip.

    ``x [b, T, H, P]``, ``dt [b, T, H]`` (after softplus/clamp), ``A [H]`` (negative),
    ``B/C [b, T, G, N]``, ``initial_state [b, H, P, N]``, ``reset [b, T]`` bool (True: the
    state is zeroed before token t is absorbed -- a document start).

    Recurrence: ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T``, ``y_t = C_t h_t``.
    Returns ``y [b, T, H, P]`` and ``states [b, ceil(T / Q), H, P, N]``: the state after each
    chunk (the last one is the final state; padding does not move the state), or None with
    ``return_states=False`` (then a single chunk skips the state computation altogether).
    """
    # fp32 throughout, also under autocast: decays are exponentials of long sums.
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _ssd_scan_fp32(x, dt, A, B, C, chunk_size, initial_state, reset, return_states)


def _ssd_scan_fp32(x, dt, A, B, C, chunk_size, initial_state, reset, return_states):
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    Q = chunk_size
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    B = B.repeat_interleave(H // G, dim=2)
    C = C.repeat_interleave(H // G, dim=2)
    a = dt * A.float()[None, None]  # [b, T, H]
    if reset is not None:
        a = a.masked_fill(reset[..., None], -torch.inf)
    xdt = x * dt[..., None]

    pad = (Q - T % Q) % Q
    if pad:
        a = F.pad(a, (0, 0, 0, pad))
        xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    nc = (T + pad) // Q
    a = a.reshape(b, nc, Q, H).permute(0, 3, 1, 2)  # [b, H, c, Q]
    xdt = xdt.reshape(b, nc, Q, H, P)
    B = B.reshape(b, nc, Q, H, N)
    C = C.reshape(b, nc, Q, H, N)

    seg = segment_sum(a)  # [b, H, c, Q, Q]
    decay_in_chunk = torch.exp(seg)
    # 1. intra-chunk (diagonal blocks): y_l += sum_{s<=l} (C_l . B_s) decay(s->l) xdt_s
    scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * decay_in_chunk
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)
    if nc == 1 and not return_states:
        # One chunk (a denoiser block): its start state is the initial state; skip 2-3.
        if initial_state is not None:
            decay_from_start = torch.exp(torch.cumsum(a, dim=-1))  # [b, H, 1, Q]
            start = initial_state.float()[:, None]
            y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C, start, decay_from_start)
        return y.reshape(b, Q, H, P)[:, :T], None
    # 2. each chunk's own contribution to the state at its end
    decay_to_end = decay_in_chunk[..., -1, :]  # [b, H, c, Q]: decay(s -> chunk end)
    local = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, xdt)
    # 3. inter-chunk recurrence: state entering chunk c, for all c at once
    if initial_state is None:
        initial_state = torch.zeros(b, H, P, N, dtype=local.dtype, device=local.device)
    states = torch.cat([initial_state.float()[:, None], local], dim=1)  # [b, c+1, H, P, N]
    chunk_decay = torch.exp(segment_sum(F.pad(a.sum(-1), (1, 0))))  # [b, H, c+1, c+1]
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    start_states, end_states = states[:, :-1], states[:, 1:]
    # 4. contribution of the chunk's start state: y_l += C_l . (decay(start->l) h_start)
    decay_from_start = torch.exp(torch.cumsum(a, dim=-1))  # [b, H, c, Q]
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C, start_states, decay_from_start)
    y = y.reshape(b, nc * Q, H, P)[:, :T]
    return y, end_states if return_states else None


def causal_conv(
    xbc: torch.Tensor,
    prefix: torch.Tensor,
    conv: nn.Conv1d,
    docs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Depthwise causal conv over ``cat(prefix, xbc)``: ``xbc [b, T, C]``, ``prefix [b, K-1, C]``
    -> ``[b, T, C]`` (pre-activation). ``docs [b, K-1+T]``: taps whose document differs from
    the output position's are dropped."""
    K = conv.kernel_size[0]
    seq = torch.cat([prefix.to(xbc.dtype), xbc], dim=1).to(conv.weight.dtype)  # [b, K-1+T, C]
    weight = conv.weight.squeeze(1)  # [C, K]
    if docs is None:
        out = F.conv1d(seq.transpose(1, 2), weight[:, None], conv.bias, groups=weight.shape[0])
        return out.transpose(1, 2)
    windows = seq.unfold(1, K, 1)  # [b, T, C, K]
    docs_w = docs.unfold(1, K, 1)  # [b, T, K]
    keep = (docs_w == docs_w[..., -1:]).to(windows.dtype)  # the last tap is the position itself
    out = (windows * keep[:, :, None, :] * weight).sum(-1)
    return out + conv.bias if conv.bias is not None else out


def mamba_project(mixer: nn.Module, x: torch.Tensor):
    """``x [b, T, D]`` -> ``gate [b, T, I]``, ``xbc [b, T, C]`` (pre-conv), ``dt [b, T, H]`` (raw)."""
    projected = mixer.in_proj(x)
    return projected.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)


def mamba_mix(
    mixer: nn.Module,
    gate: torch.Tensor,
    xbc: torch.Tensor,
    dt: torch.Tensor,
    *,
    conv_prefix: torch.Tensor | None,
    ssm_state: torch.Tensor | None,
    chunk_size: int,
    docs: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    return_states: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rest of the mixer after ``mamba_project``: conv (from ``conv_prefix [b, K-1, C]``), SSD
    scan (from ``ssm_state [b, H, P, N]``), ``D`` skip, gated RMSNorm, ``out_proj``.

    ``docs [b, K-1+T]``: document ids of the prefix rows and the T tokens (-1 = none);
    the conv ignores taps of other documents and the scan resets at document starts.
    Returns ``out [b, T, D]`` and the chunk-end SSM states ``[b, ceil(T / Q), H, P, N]``
    (None with ``return_states=False``).
    """
    b, T, _ = xbc.shape
    K = mixer.conv_kernel_size
    H, P = mixer.num_heads, mixer.head_dim
    G, N = mixer.n_groups, mixer.ssm_state_size
    if conv_prefix is None:
        conv_prefix = xbc.new_zeros(b, K - 1, xbc.shape[-1])
    dtype = xbc.dtype
    xbc = mixer.act(causal_conv(xbc, conv_prefix, mixer.conv1d, docs)).to(dtype)
    x, B, C = xbc.split([mixer.intermediate_size, G * N, G * N], dim=-1)

    dt = F.softplus(dt + mixer.dt_bias.to(dt.dtype))
    dt = torch.clamp(dt, min=mixer.time_step_limit[0], max=mixer.time_step_limit[1])
    A = -torch.exp(mixer.A_log.float())
    reset = None
    if docs is not None:
        reset = docs[:, K - 1 :] != docs[:, K - 2 : -1]
    x = x.reshape(b, T, H, P)
    y, states = ssd_scan(
        x,
        dt,
        A,
        B.reshape(b, T, G, N),
        C.reshape(b, T, G, N),
        chunk_size=chunk_size,
        initial_state=ssm_state,
        reset=reset,
        return_states=return_states,
    )
    y = y + mixer.D.float()[:, None] * x.float()
    y = mixer.norm(y.reshape(b, T, H * P), gate)
    return mixer.out_proj(y.to(out_dtype or dtype)), states
