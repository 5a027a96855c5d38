"""The two towers: the frozen backbone read causally, and its trainable block denoiser.

Both walk the backbone's layers as pre-norm residual sub-layers (``adapters.base``) and
differ only in what an attention or Mamba sub-layer reads:

=========  ==========================================  ===========================================
kind       ContextTower (clean, causal)                DenoiserTower (noisy, per block)
=========  ==========================================  ===========================================
attention  causal over cache + new tokens; returns     ``[context K/V ; own K/V]`` under the
           K/V after RoPE                              block-causal mask (``masks.py``)
mamba      one scan from the cached state; returns     each block scanned from the context state
           the state at every block boundary           at its start (``mamba.py``)
ffn        the HF module                               the HF module (a trainable copy)
=========  ==========================================  ===========================================
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .adapters import ATTENTION, MAMBA, BackboneAdapter, adapter_for
from .attention import attend
from .cache import ContextCache, ContextOutputs, DenoiserContext
from .mamba import mamba_mix, mamba_project
from .masks import causal_mask, context_attention_mask
from .time_conditioning import AdaLNSingle


class ContextTower(nn.Module):
    """The backbone itself, frozen: ``requires_grad=False``, always in eval mode, no autograd.

    ``backbone`` is registered as a submodule and may be cast to another dtype (e.g. bf16).
    """

    def __init__(self, backbone: nn.Module, adapter: BackboneAdapter) -> None:
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    @classmethod
    def of(cls, backbone: nn.Module) -> ContextTower:
        """The context tower of a plain HF causal LM (frozen in place), e.g. to decode it
        with ``generate.ar_generate``."""
        return cls(backbone, adapter_for(backbone))

    @property
    def parts(self):
        return self.adapter.parts(self.backbone)

    def context_extend(
        self,
        cache: ContextCache | None,
        ids: torch.Tensor,
        chunk_size: int = 16,
        last_only: bool = False,
    ) -> tuple[ContextCache, torch.Tensor]:
        """Read a new chunk ``ids [B, T]`` (any T) after ``cache`` (None = empty): the
        extended cache (a new object, ``last_logits`` set) and the chunk's logits
        ``[B, T, V]`` (``[B, 1, V]``, the last position's, with ``last_only``: decoding
        needs no more, and the LM head over a whole prompt is not free).
        ``chunk_size``: the Mamba scan's chunk (no effect on the result)."""
        out = self(ids, cache, block_size=chunk_size, last_only=last_only)
        out.cache.last_logits = out.logits[:, -1]
        return out.cache, out.logits

    def train(self, mode: bool = True) -> ContextTower:
        # Frozen tower: dropout etc. stay off whatever the parent model is set to.
        return super().train(False)

    @torch.no_grad()
    def forward(
        self,
        ids: torch.Tensor,
        cache: ContextCache | None = None,
        *,
        block_size: int,
        doc_ids: torch.Tensor | None = None,
        boundaries: bool = False,
        last_only: bool = False,
    ) -> ContextOutputs:
        """Read ``ids [B, T]`` after ``cache`` (None = empty).

        Returns logits ``[B, T, V]`` (``[B, 1, V]`` with ``last_only``), the extended cache and, with ``boundaries=True`` (only
        from an empty cache, ``T`` a multiple of ``block_size``), each Mamba layer's conv/SSM
        state at the start of every block. ``doc_ids [B, T]`` (empty cache only): no
        attention / state across document boundaries.
        """
        cache = cache if cache is not None else ContextCache()
        past = cache.length
        if (boundaries or doc_ids is not None) and past:
            raise ValueError("boundaries / doc_ids need an empty cache")
        parts, adapter = self.parts, self.adapter
        batch, length = ids.shape
        h = parts.embed(ids)
        positions = torch.arange(past, past + length, device=ids.device)[None]
        rope = adapter.rope(parts.rotary, h, positions)
        attn_mask = context_attention_mask(length, doc_ids)
        if attn_mask is None and past:
            attn_mask = causal_mask(length, past, device=ids.device)[None, None]

        new = ContextCache(length=past + length)
        conv_windows: dict[int, torch.Tensor] = {}
        ssm_init: dict[int, torch.Tensor] = {}
        for li, layer in enumerate(parts.layers):
            for sub in adapter.sublayers(layer):
                x = adapter.normalize(sub.norm, h)
                if sub.kind == ATTENTION:
                    q, k, v = adapter.qkv(sub.mixer, x, rope)
                    if li in cache.keys:
                        k = torch.cat([cache.keys[li], k], dim=2)
                        v = torch.cat([cache.values[li], v], dim=2)
                    new.keys[li], new.values[li] = k, v
                    o = attend(
                        q,
                        k,
                        v,
                        scale=adapter.attention_scale(sub.mixer),
                        mask=attn_mask,
                        is_causal=True,
                    )
                    y = adapter.attention_out(sub.mixer, o)
                elif sub.kind == MAMBA:
                    y, new.conv[li], new.ssm[li], bounds = self._mamba(
                        sub.mixer,
                        x,
                        cache.conv.get(li),
                        cache.ssm.get(li),
                        block_size,
                        doc_ids,
                        boundaries,
                    )
                    if boundaries:
                        conv_windows[li], ssm_init[li] = bounds
                else:
                    y = sub.mixer(x)
                h = h + y
        if last_only:
            h = h[:, -1:]
        logits = adapter.logits(parts.head, parts.norm(h))
        return ContextOutputs(logits, new, conv_windows, ssm_init)

    @staticmethod
    def _mamba(mixer, x, prefix, ssm_state, block_size, doc_ids, boundaries):
        """Mamba sub-layer over ``x [B, T, D]`` from the cached conv ``prefix`` / ``ssm_state``.

        Returns the output, the final conv and SSM state, and (``boundaries``) the states at
        the start of every block: conv windows ``[B, nb, K-1, C]``, SSM ``[B, nb, H, P, N]``.
        """
        batch, length, _ = x.shape
        K = mixer.conv_kernel_size
        gate, xbc, dt = mamba_project(mixer, x)
        if prefix is None:
            prefix = xbc.new_zeros(batch, K - 1, xbc.shape[-1])
        docs = None
        if doc_ids is not None:
            docs = torch.cat([doc_ids.new_full((batch, K - 1), -1), doc_ids], dim=1)
        y, states = mamba_mix(
            mixer,
            gate,
            xbc,
            dt,
            conv_prefix=prefix,
            ssm_state=ssm_state,
            chunk_size=block_size,
            docs=docs,
        )
        rows = torch.cat([prefix.to(xbc.dtype), xbc], dim=1)  # [B, K-1+T, C] pre-conv
        if not boundaries:
            return y, rows[:, length:], states[:, -1], None
        starts = torch.arange(0, length, block_size, device=x.device)
        idx = starts[:, None] + torch.arange(K - 1, device=x.device)[None]  # [nb, K-1]
        # Chunks are blocks (chunk_size = block_size), so the chunk-end states are the block
        # boundaries: block n starts from the state after block n-1.
        first = ssm_state if ssm_state is not None else states.new_zeros(states[:, 0].shape)
        inits = torch.cat([first.float()[:, None], states[:, :-1]], dim=1)
        return y, rows[:, length:], states[:, -1], (rows[:, idx], inits)


class DenoiserTower(nn.Module):
    """Trainable copy of the backbone's embedding, (top-k) layers, final norm and LM head.

    Layer ``i`` is aligned with backbone layer ``layer_ids[i]``: its attention reads that
    layer's context K/V, its Mamba mixer starts from that layer's context states.
    """

    def __init__(
        self,
        backbone: nn.Module,
        adapter: BackboneAdapter,
        *,
        num_layers: int | None = None,
        tie_head: bool = False,
        mamba_bidirectional: bool = False,
        time_conditioning: bool = False,
    ) -> None:
        super().__init__()
        parts = adapter.parts(backbone)
        total = len(parts.layers)
        k = total if num_layers is None else num_layers
        if not 1 <= k <= total:
            raise ValueError(f"denoiser.layers must be in [1, {total}], got {num_layers}")
        self.adapter = adapter
        self.layer_ids = list(range(total - k, total))
        self.embed = copy.deepcopy(parts.embed)
        self.layers = nn.ModuleList(copy.deepcopy(parts.layers[i]) for i in self.layer_ids)
        self.norm = copy.deepcopy(parts.norm)
        self.head = copy.deepcopy(parts.head)
        if tie_head:
            self.head.weight = self.embed.weight
        self.rotary = copy.deepcopy(parts.rotary)
        self.mamba_bidirectional = mamba_bidirectional
        self.time_cond = None
        if time_conditioning:
            n_sub = sum(adapter.num_sublayers(layer) for layer in self.layers)
            self.time_cond = AdaLNSingle(self.embed.embedding_dim, n_sub)
        self.requires_grad_(True)

    def forward(
        self,
        noisy_ids: torch.Tensor,
        ctx: DenoiserContext,
        *,
        positions: torch.Tensor,
        block_size: int,
        t: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``noisy_ids [B, T]`` (``T = nb * bs``, blocks laid out in order) at absolute
        ``positions [1|B, T]``; ``t [B, T]`` per-token timesteps (time conditioning only).
        Returns logits ``[B, T, V]`` fp32."""
        adapter = self.adapter
        h = self.embed(noisy_ids)
        rope = adapter.rope(self.rotary, h, positions)
        shared = None
        if self.time_cond is not None and t is not None:
            shared = self.time_cond(t)
        j = 0
        for layer, li in zip(self.layers, self.layer_ids):
            for sub in adapter.sublayers(layer):
                x = adapter.normalize(sub.norm, h)
                if shared is not None:
                    x = self.time_cond.modulate(x, shared, j)
                j += 1
                if sub.kind == ATTENTION:
                    q, k, v = adapter.qkv(sub.mixer, x, rope)
                    if li in ctx.keys:
                        k = torch.cat([ctx.keys[li].to(k.dtype), k], dim=2)
                        v = torch.cat([ctx.values[li].to(v.dtype), v], dim=2)
                    o = attend(
                        q, k, v, scale=adapter.attention_scale(sub.mixer), mask=ctx.attn_mask
                    )
                    y = adapter.attention_out(sub.mixer, o)
                elif sub.kind == MAMBA:
                    y = self._mamba(sub.mixer, x, li, ctx, block_size)
                else:
                    y = sub.mixer(x)
                h = h + y
        return adapter.logits(self.head, self.norm(h))

    def _mamba(self, mixer, x, li, ctx: DenoiserContext, block_size: int) -> torch.Tensor:
        """Every block scanned on its own (``[B * nb, bs, ...]``) from its context state."""
        batch, length, dim = x.shape
        nb = length // block_size

        def fold(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch * nb, block_size, t.shape[-1])

        gate, xbc, dt = (fold(t) for t in mamba_project(mixer, x))
        prefix = ctx.conv_windows.get(li)
        if prefix is not None:
            prefix = prefix.flatten(0, 1)
        init = ctx.ssm_init.get(li)
        if init is not None:
            init = init.flatten(0, 1)
        docs = ctx.docs.flatten(0, 1) if ctx.docs is not None else None
        y, _ = mamba_mix(
            mixer,
            gate,
            xbc,
            dt,
            conv_prefix=prefix,
            ssm_state=init,
            chunk_size=block_size,
            docs=docs,
            return_states=False,
        )
        if self.mamba_bidirectional:
            # Right-to-left pass over the block with the same weights, from zero conv/SSM
            # state (what lies "before" a reversed block is the unseen future); averaged with
            # the context-seeded left-to-right pass.
            rdocs = None
            if docs is not None:
                K = mixer.conv_kernel_size
                rdocs = torch.cat(
                    [
                        docs[:, : K - 1].new_full((docs.shape[0], K - 1), -1),
                        docs[:, K - 1 :].flip(1),
                    ],
                    dim=1,
                )
            y_rev, _ = mamba_mix(
                mixer,
                gate.flip(1),
                xbc.flip(1),
                dt.flip(1),
                conv_prefix=None,
                ssm_state=None,
                chunk_size=block_size,
                docs=rdocs,
                return_states=False,
            )
            y = 0.5 * (y + y_rev.flip(1))
        return y.reshape(batch, length, dim)
