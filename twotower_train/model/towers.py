"""The two towers: the frozen backbone read causally, and its trainable block denoiser.

Both are an unmodified HF causal LM running its own ``forward``; they differ only in what
the attention registry and the Mamba mixers do during their call (``registry.py``):

=========  ==========================================  ===========================================
kind       ContextTower (clean, causal)                DenoiserTower (noisy, per block)
=========  ==========================================  ===========================================
attention  causal over cache + new tokens; records     ``[context K/V ; own K/V]`` under the
           K/V after the family's RoPE                 block-causal mask (``masks.py``)
mamba      one scan from the cached state; records     each block scanned from the context state
           the state at every block boundary           at its start (``mamba.py``)
rest       the HF modules                              the HF modules (a trainable copy)
=========  ==========================================  ===========================================
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from .cache import ContextCache, ContextOutputs, DenoiserContext
from .head import decoder_hidden, lm_logits
from .masks import causal_mask, context_attention_mask, document_positions
from .registry import (
    ContextRun,
    DenoiserRun,
    hook_time_conditioning,
    layer_list,
    prepare_backbone,
    running,
)
from .time_conditioning import AdaLNSingle


class ContextTower(nn.Module):
    """The backbone itself, frozen: ``requires_grad=False``, always in eval mode, no autograd.

    ``backbone`` is registered as a submodule and may be cast to another dtype (e.g. bf16).
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        prepare_backbone(backbone)
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.last_seen: set[int] = set()  # layers whose mixer ran through us (last call)

    @classmethod
    def of(cls, backbone: nn.Module) -> ContextTower:
        """The context tower of a plain HF causal LM (frozen in place), e.g. to decode it
        with ``generate.ar_generate``."""
        return cls(backbone)

    @property
    def layers(self) -> nn.ModuleList:
        return layer_list(self.backbone)[1]

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

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The backbone's LM head on final hidden states ``[..., H]``: fp32 ``[..., V]``."""
        return lm_logits(self.backbone, hidden)

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
        logits: bool = True,
    ) -> ContextOutputs:
        """Read ``ids [B, T]`` after ``cache`` (None = empty).

        Returns logits ``[B, T, V]`` (``[B, 1, V]`` with ``last_only``; None with
        ``logits=False``: ``head_logits`` of the returned hidden states on the rows that
        are needed), the final hidden states ``[B, T, H]``, the extended cache
        and, with ``boundaries=True`` (only from an empty cache, ``T`` a multiple of
        ``block_size``), each Mamba layer's conv/SSM state at the start of every block.
        ``doc_ids [B, T]`` (empty cache only): no attention / state across document
        boundaries.
        """
        cache = cache if cache is not None else ContextCache()
        past = cache.length
        if (boundaries or doc_ids is not None) and past:
            raise ValueError("boundaries / doc_ids need an empty cache")
        batch, length = ids.shape
        positions = torch.arange(past, past + length, device=ids.device)
        attn_mask = context_attention_mask(length, doc_ids)
        if attn_mask is None and past:
            attn_mask = causal_mask(length, past, device=ids.device)[None, None]
        run = ContextRun(
            cache=cache,
            new=ContextCache(length=past + length),
            mask=attn_mask,
            positions=positions,
            block_size=block_size,
            doc_ids=doc_ids,
            boundaries=boundaries,
        )
        # RoPE reads relative distances only; absolute position embeddings (GPT-2) must see
        # each document from position 0, as at decoding
        hf_positions = positions[None].expand(batch, -1)
        if doc_ids is not None:
            hf_positions = document_positions(doc_ids)
        with running(self.backbone, run):
            hidden = decoder_hidden(self.backbone, ids, hf_positions)
        self.last_seen = run.seen
        out = None
        if logits:
            out = self.head_logits(hidden[:, -1:] if last_only else hidden)
        return ContextOutputs(out, run.new, run.conv_windows, run.ssm_init, hidden=hidden)


class DenoiserTower(nn.Module):
    """A trainable copy of the backbone (``self.model``, the HF causal LM: its embedding,
    the top-k decoder layers, final norm and LM head).

    Denoiser layer ``i`` is aligned with backbone layer ``layer_ids[i]``: its attention reads
    that layer's context K/V, its Mamba mixer starts from that layer's context states.
    ``clone`` copies the (layer-trimmed) backbone: ``copy.deepcopy``, or under ZeRO-3
    construction ``engine.zero_init.clone_partitioned``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        num_layers: int | None = None,
        tie_head: bool = False,
        mamba_bidirectional: bool = False,
        time_conditioning: bool = False,
        clone: Callable[[nn.Module], nn.Module] = copy.deepcopy,
    ) -> None:
        super().__init__()
        prepare_backbone(backbone)
        path, layers = layer_list(backbone)
        total = len(layers)
        k = total if num_layers is None else num_layers
        if not 1 <= k <= total:
            raise ValueError(f"denoiser.layers must be in [1, {total}], got {num_layers}")
        self.layer_ids = list(range(total - k, total))
        # copy only the top k layers: swap the list on the backbone for the copy
        parent_path, _, attr = path.rpartition(".")
        parent = backbone.get_submodule(parent_path)
        setattr(parent, attr, nn.ModuleList(layers[i] for i in self.layer_ids))
        try:
            self.model = clone(backbone)
        finally:
            setattr(parent, attr, layers)
        self._layers_path = path
        if tie_head:
            self.head.weight = self.embed.weight
        self.mamba_bidirectional = mamba_bidirectional
        self.time_cond = None
        if time_conditioning:
            n_norms = hook_time_conditioning(self.layers)
            self.time_cond = AdaLNSingle(self.embed.embedding_dim, n_norms)
        self.requires_grad_(True)

    @property
    def embed(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self._layers_path)

    def forward(
        self,
        noisy_ids: torch.Tensor,
        ctx: DenoiserContext,
        *,
        positions: torch.Tensor,
        block_size: int,
        t: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits: bool = True,
    ) -> torch.Tensor:
        """``noisy_ids [B, T]`` (``T = nb * bs``, blocks laid out in order) at absolute
        ``positions [1, T]`` (for the masks); ``position_ids [B, T]``: what the model's own
        position code reads (default ``positions``; document-relative with documents);
        ``t [B, T]`` per-token timesteps (time conditioning only). Returns logits
        ``[B, T, V]`` fp32, or with ``logits=False`` the final hidden states ``[B, T, H]``
        (``head_logits`` turns the rows a loss reads into logits)."""
        batch = noisy_ids.shape[0]
        shared = None
        if self.time_cond is not None and t is not None:
            shared = self.time_cond(t)
        run = DenoiserRun(
            ctx=ctx,
            positions=positions[0],
            block_size=block_size,
            time_cond=self.time_cond,
            shared=shared,
            mamba_bidirectional=self.mamba_bidirectional,
        )
        if position_ids is None:
            position_ids = positions.expand(batch, -1)
        with running(self.model, run):
            hidden = decoder_hidden(self.model, noisy_ids, position_ids)
        return self.head_logits(hidden) if logits else hidden

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The denoiser's LM head on final hidden states ``[..., H]``: fp32 ``[..., V]``."""
        return lm_logits(self.model, hidden)
