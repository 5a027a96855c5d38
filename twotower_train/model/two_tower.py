"""``TwoTowerModel``: a frozen AR backbone (context tower) + its block-diffusion denoiser.

Training runs both towers once over the whole sequence (``forward`` / ``forward_train``);
decoding grows a ``ContextCache`` chunk by chunk (``context_extend``) and denoises one
block at a time against it (``denoise_block``). ``reference_forward`` is that decoding loop
over a training batch -- slow and obviously correct, the yardstick of the one-pass path.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from twotower_train.errors import first_line

from .attention import denoiser_block_mask, flex_available
from .cache import ContextCache, ContextOutputs, DenoiserContext
from .config import AttnImpl, TwoTowerConfig
from .head import Rows, head_vocab
from .mask_embedding import AddedMaskEmbedding
from .masks import block_causal_mask_mod, block_document_positions, denoiser_attention_mask
from .pretrained import ReleaseError, legacy_denoiser_state, read_release
from .registry import check_backbone
from .time_conditioning import expand_timesteps
from .towers import ContextTower, DenoiserTower


class TwoTowerModel(nn.Module):
    """Context tower (``self.context``, frozen backbone) + denoiser (``self.denoiser``).

    Every trainable parameter lives under ``self.denoiser``.
    """

    def __init__(
        self, context: ContextTower, denoiser: DenoiserTower, config: TwoTowerConfig
    ) -> None:
        super().__init__()
        self.context = context
        self.denoiser = denoiser
        self.config = config

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_backbone(
        cls,
        backbone: nn.Module,
        config: TwoTowerConfig | None = None,
        *,
        clone: Callable[[nn.Module], nn.Module] = copy.deepcopy,
        **overrides,
    ) -> TwoTowerModel:
        """Build from an HF decoder-only causal LM whose attention goes through transformers'
        attention registry (Llama, Qwen, Gemma, Nemotron-H, ...; see docs/architecture.md).
        One the towers cannot serve is refused with ``UnsupportedBackbone`` (one line).

        ``config`` (default ``TwoTowerConfig()``) with ``overrides`` of its fields, e.g.
        ``from_backbone(backbone, block_size=4, mask_token_id=127)``; ``mask_token_id`` must
        be set. The denoiser is deep-copied from ``backbone`` first (in its current dtype);
        then ``backbone`` itself -- modified in place -- becomes the frozen context tower,
        cast to ``context_dtype`` if set. ``layers=k`` copies only the top k layers.
        ``clone`` makes the denoiser's copy (ZeRO-3 construction: ``engine/zero_init.py``).

        ``shift_logits=True`` keeps the backbone's next-token reading of its outputs: the
        prediction for position p is the denoiser's output at p - 1 inside the block, and
        for a block's first position the context tower's own next-token logits at the end
        of the clean prefix (uniform for position 0). The copied LM head then starts out
        predicting the right tokens instead of their successors.
        """
        config = (config or TwoTowerConfig()).replace(**overrides)
        config.validate()
        if config.attn_impl == AttnImpl.flex and not flex_available():
            raise ValueError("attn_impl='flex' needs torch.nn.attention.flex_attention")
        vocab = backbone.get_input_embeddings().num_embeddings
        if config.mask_token_id is None:
            raise ValueError("mask_token_id is not set (the tokenizer has no mask token?)")
        if not 0 <= config.mask_token_id <= vocab:
            raise ValueError(
                f"mask_token_id {config.mask_token_id} outside the vocabulary (size {vocab}; "
                f"{vocab} adds a [MASK] row to the denoiser)"
            )
        denoiser = DenoiserTower(
            backbone,
            num_layers=config.layers,
            tie_head=config.tie_head,
            mamba_bidirectional=config.mamba_bidirectional,
            time_conditioning=config.time_conditioning,
            clone=clone,
        )
        if config.mask_token_id == vocab:  # the tokenizer had none: the denoiser learns one
            embed = AddedMaskEmbedding(denoiser.embed, config.mask_token_id)
            denoiser.model.set_input_embeddings(embed)
        if config.context_dtype is not None:
            backbone.to(config.context_dtype.torch)
        model = cls(ContextTower(backbone), denoiser, config)
        check_backbone(model)
        return model

    @classmethod
    def from_release(
        cls, path, dtype: torch.dtype = torch.float32, backbone_path=None
    ) -> TwoTowerModel:
        """A released model folder (``model/pretrained.py``; safetensors only); its tokenizer:
        ``AutoTokenizer.from_pretrained(path)`` or ``backbones.load_release``.
        ``backbone_path``: a reference-only release's backbone folder (default: found)."""
        folder = read_release(path, backbone_path)
        try:
            backbone = AutoModelForCausalLM.from_pretrained(folder.backbone_folder, dtype=dtype)
        except Exception as exc:
            raise ReleaseError(
                f"cannot load the backbone in {folder.backbone_folder}: {first_line(exc)}"
            ) from None
        model = cls.from_backbone(backbone, folder.config)
        state = folder.denoiser_state
        if folder.version in (1, 2):
            state = legacy_denoiser_state(model.denoiser, state)
        model.denoiser.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
        return model.eval()

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    @property
    def backbone(self) -> nn.Module:
        """The HF model inside the context tower (frozen)."""
        return self.context.backbone

    # -- training: one pass over all blocks ------------------------------------------------
    def forward(
        self,
        clean_ids: torch.Tensor,
        noisy_ids: torch.Tensor,
        t: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoiser logits ``[B, L, V]``; block n depends only on clean blocks 0..n-1 and
        noisy block n. ``clean_ids/noisy_ids [B, L]`` (L a multiple of ``block_size``),
        ``t`` [B], [B, L / bs] or [B, L] (used with time conditioning), ``doc_ids [B, L]``
        optional document ids (no attention / Mamba state across documents)."""
        return self.forward_train(clean_ids, noisy_ids, t, doc_ids)[0]

    def forward_train(
        self,
        clean_ids: torch.Tensor,
        noisy_ids: torch.Tensor,
        t: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both towers in one call: ``(denoiser_logits [B, L, V], context_logits [B, L, V])``.

        The context tower runs once (no grad); its logits are the AR teacher's next-token
        distributions (position i predicts token i + 1)."""
        ctx_out = self.context_forward(clean_ids, doc_ids=doc_ids)
        return self.denoise(noisy_ids, ctx_out, t=t, doc_ids=doc_ids), ctx_out.logits

    def context_forward(
        self,
        clean_ids: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        block_size: int | None = None,
        logits: bool = True,
    ) -> ContextOutputs:
        """One no-grad pass of the frozen backbone over ``clean_ids [B, L]``: final hidden
        states and (unless ``logits=False``) logits, K/V of every attention layer, Mamba
        conv/SSM states at every block boundary. ``block_size``: the blocks' size (default
        the model's; a block-size curriculum trains smaller)."""
        bs = block_size or self.block_size
        batch, length = clean_ids.shape
        if length % bs:
            raise ValueError(f"sequence length {length} is not a multiple of block size {bs}")
        return self.context(
            clean_ids, block_size=bs, doc_ids=doc_ids, boundaries=True, logits=logits
        )

    def denoise(
        self,
        noisy_ids: torch.Tensor,
        ctx_out: ContextOutputs,
        t: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        block_size: int | None = None,
        logits: bool = True,
    ) -> torch.Tensor:
        """Denoiser one-pass forward over all blocks of ``noisy_ids [B, L]`` given the
        context tower's ``ctx_out`` for the matching clean sequence (computed at the same
        ``block_size``, default the model's): logits ``[B, L, V]`` fp32, or with
        ``logits=False`` the denoiser's final hidden states ``[B, L, H]``, unshifted
        (``loss_rows`` reads them)."""
        batch, length = noisy_ids.shape
        bs = block_size or self.block_size
        if ctx_out.cache.length != length:
            raise ValueError("noisy_ids and clean_ids must have the same length")
        mask_mod = None
        if self._use_flex(noisy_ids.device):
            mask = denoiser_block_mask(length, bs, doc_ids, noisy_ids.device)
            mask_mod = block_causal_mask_mod(length, bs, doc_ids)
        else:
            mask = denoiser_attention_mask(length, bs, doc_ids, device=noisy_ids.device)
        ctx = DenoiserContext(
            keys=ctx_out.cache.keys,
            values=ctx_out.cache.values,
            attn_mask=mask,
            conv_windows=ctx_out.conv_windows,
            ssm_init=ctx_out.ssm_init,
            docs=self._block_docs(doc_ids, length, bs)
            if doc_ids is not None and ctx_out.ssm_init
            else None,
            mask_mod=mask_mod,
        )
        positions = torch.arange(length, device=noisy_ids.device)[None]
        position_ids = None if doc_ids is None else block_document_positions(doc_ids, bs)
        t_tok = None if t is None else expand_timesteps(t, batch, length, bs)
        out = self.denoiser(
            noisy_ids,
            ctx,
            positions=positions,
            block_size=bs,
            t=t_tok,
            position_ids=position_ids,
            logits=logits,
        )
        if not logits or not self.config.shift_logits:
            return out
        logits = out
        # Block n's first position reads the context tower at position n*bs - 1.
        if ctx_out.logits is not None:
            ctx_prev = ctx_out.logits[:, bs - 1 : length - 1 : bs]  # [B, nb-1, V]
        else:
            ctx_prev = self.context.head_logits(ctx_out.hidden[:, bs - 1 : length - 1 : bs])
        ctx_prev = ctx_prev.to(logits.dtype)
        firsts = torch.cat([torch.zeros_like(logits[:, :1]), ctx_prev], dim=1)  # [B, nb, V]
        within = logits.view(batch, length // bs, bs, -1)[:, :, :-1]  # outputs at p-1
        return torch.cat([firsts[:, :, None], within], dim=2).view_as(logits)

    def loss_rows(
        self,
        hidden: torch.Tensor,
        ctx_out: ContextOutputs,
        flat: torch.Tensor,
        block_size: int | None = None,
    ) -> list[tuple[torch.Tensor, Rows]]:
        """Where the denoiser's logits at flat positions ``flat [N]`` (indices into
        ``[B * L]``) come from, as ``(which [n], Rows)`` groups covering ``0..N-1``: the
        same values as ``denoise(...)`` at those positions, with the LM head run on those
        rows only. ``hidden [B, L, H]``: ``denoise(..., logits=False)``.

        Unshifted, position p is the denoiser's own output at p. Shifted, it is the
        denoiser's output at p - 1 inside a block, the context tower's at p - 1 for a block's
        first position, and all-zero logits at position 0 of a row."""
        head = self.denoiser.head_logits
        rows = hidden.flatten(0, 1)
        if not self.config.shift_logits:
            return [(torch.arange(flat.numel(), device=flat.device), Rows(rows[flat], head))]
        bs = block_size or self.block_size
        col = flat % hidden.shape[1]
        first = col % bs == 0
        own = (~first).nonzero()[:, 0]
        from_ctx = (first & (col > 0)).nonzero()[:, 0]
        zero = (col == 0).nonzero()[:, 0]
        vocab = head_vocab(self.backbone)

        def zeros(h: torch.Tensor) -> torch.Tensor:
            return h.new_zeros(h.shape[0], vocab, dtype=torch.float32)

        groups = [(own, Rows(rows[flat[own] - 1], head))]
        if len(from_ctx):
            ctx_rows = ctx_out.hidden.flatten(0, 1)[flat[from_ctx] - 1]
            groups.append((from_ctx, Rows(ctx_rows, self.context.head_logits)))
        if len(zero):
            groups.append((zero, Rows(rows[flat[zero]].detach(), zeros)))
        return groups

    def teacher_rows(self, ctx_out: ContextOutputs, flat: torch.Tensor) -> Rows:
        """The AR teacher of flat positions ``flat [N]``: the context tower's next-token
        logits at p - 1 (row 0's own position stands in at p = 0, where there is none)."""
        length = ctx_out.hidden.shape[1]
        prev = torch.where(flat % length == 0, flat, flat - 1)
        return Rows(ctx_out.hidden.flatten(0, 1)[prev], self.context.head_logits)

    def _use_flex(self, device: torch.device) -> bool:
        """FlexAttention where it runs: CUDA (compiled), or CPU without autograd (eager; torch
        has no CPU flex backward). Otherwise the SDPA boolean-mask path, same predicate."""
        if self.config.attn_impl != AttnImpl.flex:
            return False
        return device.type == "cuda" or not torch.is_grad_enabled()

    def _block_docs(self, doc_ids: torch.Tensor, length: int, bs: int) -> torch.Tensor:
        """Document ids of each block's Mamba conv window + tokens: ``[B, nb, K-1+bs]``.

        The window rows (clean context) keep their own documents; the block's tokens all carry
        the document open at the block's start, so a block starts from zero state after a
        clean EOS and never resets inside itself (a masked EOS must not show)."""
        K = self._conv_kernel()
        batch = doc_ids.shape[0]
        padded = torch.cat([doc_ids.new_full((batch, K - 1), -1), doc_ids], dim=1)
        starts = torch.arange(0, length, bs, device=doc_ids.device)
        idx = starts[:, None] + torch.arange(K - 1, device=doc_ids.device)[None]
        windows = padded[:, idx]  # [B, nb, K-1]: positions n*bs-K+1 .. n*bs-1
        own = doc_ids[:, ::bs, None].expand(batch, length // bs, bs)  # [B, nb, bs]
        return torch.cat([windows, own], dim=2)

    def _conv_kernel(self) -> int:
        return getattr(self.backbone.config, "conv_kernel", 4)

    @torch.no_grad()
    def context_logits(self, clean_ids: torch.Tensor) -> torch.Tensor:
        """The frozen backbone's own logits ``[B, L, V]`` (fp32) for ``clean_ids [B, L]``."""
        return self.context(clean_ids, block_size=self.block_size).logits

    # -- decoding: a cache, one block at a time --------------------------------------------
    def empty_cache(self) -> ContextCache:
        return ContextCache()

    def context_extend(
        self, cache: ContextCache | None, ids: torch.Tensor, last_only: bool = False
    ) -> tuple[ContextCache, torch.Tensor]:
        """Run the context tower on a new chunk ``ids [B, T]`` (any T) after ``cache``.
        Returns the extended cache (a new object) and the chunk's logits ``[B, T, V]``
        (only the last position's, ``[B, 1, V]``, with ``last_only``)."""
        return self.context.context_extend(
            cache, ids, chunk_size=self.block_size, last_only=last_only
        )

    def denoise_block(
        self,
        cache: ContextCache | None,
        noisy_block_ids: torch.Tensor,
        t: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoiser logits ``[B, bs, V]`` for one noisy block ``[B, bs]`` placed right after
        the ``cache`` prefix (bidirectional inside the block). ``t``: [B], [B, 1] or [B, bs]."""
        cache = cache if cache is not None else ContextCache()
        batch, bs = noisy_block_ids.shape
        device = noisy_block_ids.device
        positions = torch.arange(cache.length, cache.length + bs, device=device)[None]
        t_tok = None if t is None else expand_timesteps(t, batch, bs, bs)
        logits = self.denoiser(
            noisy_block_ids,
            DenoiserContext.from_cache(cache),
            positions=positions,
            block_size=bs,
            t=t_tok,
        )
        if not self.config.shift_logits:
            return logits
        if cache.last_logits is None:
            first = torch.zeros_like(logits[:, :1])
        else:
            first = cache.last_logits[:, None].to(logits.dtype)
        return torch.cat([first, logits[:, :-1]], dim=1)

    @torch.no_grad()
    def reference_forward(
        self,
        clean_ids: torch.Tensor,
        noisy_ids: torch.Tensor,
        t: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-block loop equal to ``forward`` (for tests): for each block n, denoise noisy
        block n against a cache of clean blocks 0..n-1, then extend the cache with clean
        block n. ``t``: [B] or [B, L / bs].

        With ``doc_ids [B, L]`` (clean row) each block is decoded as decoding would see its
        document: the cache holds only the clean tokens of the document open at the block's
        start (none if the block starts one), and the block's first position reads the
        context tower's prediction after the clean token just before it."""
        if doc_ids is not None:
            return torch.cat(
                [
                    self._reference_row(
                        clean_ids[i : i + 1],
                        noisy_ids[i : i + 1],
                        None if t is None else t[i : i + 1],
                        doc_ids[i],
                    )
                    for i in range(clean_ids.shape[0])
                ]
            )
        batch, length = clean_ids.shape
        bs = self.block_size
        cache = self.empty_cache()
        out = []
        for n in range(length // bs):
            span = slice(n * bs, (n + 1) * bs)
            out.append(self.denoise_block(cache, noisy_ids[:, span], t=self._block_t(t, n, length)))
            cache, _ = self.context_extend(cache, clean_ids[:, span], last_only=True)
        return torch.cat(out, dim=1)

    def _block_t(self, t: torch.Tensor | None, n: int, length: int) -> torch.Tensor | None:
        if t is None or t.dim() <= 1:
            return t
        bs = self.block_size
        return expand_timesteps(t, t.shape[0], length, bs)[:, n * bs : (n + 1) * bs]

    def _reference_row(self, clean, noisy, t, docs) -> torch.Tensor:
        """``reference_forward`` of one row ``[1, L]`` with its documents ``docs [L]``."""
        length = clean.shape[1]
        bs = self.block_size

        def doc_start(pos: int) -> int:  # first position of the document holding ``pos``
            other = (docs[:pos] != docs[pos]).nonzero()
            return int(other.max()) + 1 if len(other) else 0

        out = []
        for n in range(length // bs):
            start = n * bs
            cache = self.empty_cache()
            if start:
                # the context tower's next-token prediction after clean token start - 1,
                # read within that token's own document
                prev, _ = self.context_extend(None, clean[:, doc_start(start - 1) : start])
                if doc_start(start) < start:  # the block continues that document
                    cache = prev
                else:
                    cache.last_logits = prev.last_logits
            block = noisy[:, start : start + bs]
            out.append(self.denoise_block(cache, block, t=self._block_t(t, n, length)))
        return torch.cat(out, dim=1)
