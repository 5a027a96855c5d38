"""How the two towers run an unmodified Hugging Face causal LM.

Both towers call the HF model's own ``forward`` -- its embeddings, norms, projections,
RoPE, MLPs / MoE, final norm, LM head and logit soft-cap are the family's own code. Two
things are ours, switched on only for the duration of a tower's call (``running``):

* **attention** -- the model's ``config._attn_implementation`` becomes ``"twotower"``, a
  function registered in transformers' ``AttentionInterface``, so every attention layer
  hands us its queries / keys / values after the family's projections, norms and RoPE
  (and its scaling, sliding window and soft-cap). What it does with them depends on the
  active *run* (a context variable): the context tower (``ContextRun``) records each
  layer's K/V and attends causally over cache + new tokens; the denoiser (``DenoiserRun``)
  prepends the aligned context layer's K/V and applies the block-causal mask.
* **Mamba-2 mixers** (hybrid models, e.g. Nemotron-H) -- the registry does not reach them,
  so their class is swapped for a subclass whose ``forward`` runs ``mamba.py`` from the
  run's explicit states (and falls back to the HF forward outside a tower call).

Time conditioning (optional, denoiser only) modulates the output of every norm directly
owned by a decoder layer through a forward hook.

Outside a tower call the backbone is exactly the HF model. An architecture this cannot
serve is refused at ``TwoTowerModel.from_backbone`` (``prepare_backbone`` refuses what it
sees in the structure, ``check_backbone`` what a short probe measures: context logits equal
to the model's own, a cache grown chunk by chunk equal to one pass, no leak between blocks).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import TwoTowerError, first_line
from .attention import attend, window_block_mask
from .cache import ContextCache, DenoiserContext
from .mamba import mamba_mix, mamba_project

ATTN_IMPL = "twotower"
_RUN: ContextVar = ContextVar("twotower_run", default=None)

# Keyword arguments an attention layer may pass that change the math and that we do not
# reproduce: refused (the probe at ``from_backbone`` turns the error into one line).
_UNSUPPORTED_KWARGS = ("s_aux", "sinks", "position_bias", "alibi", "attention_bias")

_MAMBA2_ATTRS = (
    "in_proj",
    "conv1d",
    "A_log",
    "dt_bias",
    "D",
    "norm",
    "out_proj",
    "num_heads",
    "head_dim",
    "n_groups",
    "ssm_state_size",
    "intermediate_size",
    "conv_dim",
    "conv_kernel_size",
    "time_step_limit",
    "act",
)


class UnsupportedBackbone(TwoTowerError, NotImplementedError):
    """The backbone's architecture cannot be served by the two towers (one-line message)."""


def register() -> None:
    """Register the ``"twotower"`` attention function with transformers."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPL, twotower_attention)


@contextmanager
def running(model: nn.Module, run):
    """Run ``model`` (an HF model) as a tower: ``run`` active, attention routed to us."""
    from transformers import AttentionInterface

    # (re)registered on every call: another copy of this package in the process (``bench
    # compare``) registers its own function under the same name
    AttentionInterface._global_mapping[ATTN_IMPL] = twotower_attention
    config = model.config
    previous = config._attn_implementation
    token = _RUN.set(run)
    config._attn_implementation = ATTN_IMPL
    try:
        yield run
    finally:
        config._attn_implementation = previous
        _RUN.reset(token)


def current_run():
    """The run of the tower call in progress (None outside one): what an activation
    recompute of a layer, which happens after the call has returned, must re-enter with
    ``running`` (``engine/activation_checkpointing.py``)."""
    return _RUN.get()


# -- what a tower call holds -------------------------------------------------------------------


@dataclass
class ContextRun:
    """One context-tower call over ``T`` new tokens after ``cache`` (``S`` cached tokens).

    ``mask``: None (causal) or bool ``[B|1, 1, T, S+T]``; ``positions [T]`` absolute.
    Filled by the layers: ``new`` (the extended cache) and, with ``boundaries``, every Mamba
    layer's conv window / SSM state at each block start.
    """

    cache: ContextCache
    new: ContextCache
    mask: torch.Tensor | None
    positions: torch.Tensor
    block_size: int
    doc_ids: torch.Tensor | None = None
    boundaries: bool = False
    conv_windows: dict[int, torch.Tensor] = field(default_factory=dict)
    ssm_init: dict[int, torch.Tensor] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)  # layers whose mixer ran through us

    def attention(self, module, q, k, v, *, scale, window, softcap, dropout):
        li = module._twotower_layer
        self.seen.add(li)
        if li in self.cache.keys:
            k = torch.cat([self.cache.keys[li], k], dim=2)
            v = torch.cat([self.cache.values[li], v], dim=2)
        self.new.keys[li], self.new.values[li] = k, v
        mask, is_causal = self.mask, self.mask is None
        if window is not None:
            key_pos = torch.arange(k.shape[2], device=k.device)
            rel = self.positions[:, None] - key_pos[None]
            allowed = (rel >= 0) & (rel < window)
            mask = allowed[None, None] if mask is None else mask & allowed
            is_causal = False
        return attend(
            q, k, v, scale=scale, mask=mask, is_causal=is_causal, softcap=softcap, dropout=dropout
        )

    def mamba(self, mixer, x: torch.Tensor) -> torch.Tensor:
        """Mamba sub-layer over ``x [B, T, D]`` from the cached conv rows / SSM state; records
        the final state (and, with ``boundaries``, the state at every block start)."""
        li = mixer._twotower_layer
        self.seen.add(li)
        batch, length, _ = x.shape
        K = mixer.conv_kernel_size
        bs = self.block_size
        gate, xbc, dt = mamba_project(mixer, x)
        prefix = self.cache.conv.get(li)
        ssm_state = self.cache.ssm.get(li)
        if prefix is None:
            prefix = xbc.new_zeros(batch, K - 1, xbc.shape[-1])
        docs = None
        if self.doc_ids is not None:
            docs = torch.cat([self.doc_ids.new_full((batch, K - 1), -1), self.doc_ids], dim=1)
        y, states = mamba_mix(
            mixer,
            gate,
            xbc,
            dt,
            conv_prefix=prefix,
            ssm_state=ssm_state,
            chunk_size=bs,
            docs=docs,
        )
        rows = torch.cat([prefix.to(xbc.dtype), xbc], dim=1)  # [B, K-1+T, C] pre-conv
        self.new.conv[li], self.new.ssm[li] = rows[:, length:], states[:, -1]
        if self.boundaries:
            starts = torch.arange(0, length, bs, device=x.device)
            idx = starts[:, None] + torch.arange(K - 1, device=x.device)[None]  # [nb, K-1]
            # Chunks are blocks (chunk_size = block_size), so the chunk-end states are the
            # block boundaries: block n starts from the state after block n-1.
            first = ssm_state if ssm_state is not None else states.new_zeros(states[:, 0].shape)
            self.conv_windows[li] = rows[:, idx]
            self.ssm_init[li] = torch.cat([first.float()[:, None], states[:, :-1]], dim=1)
        return y


@dataclass
class DenoiserRun:
    """One denoiser call over ``T = nb * bs`` noisy tokens at ``positions [T]``, reading
    ``ctx`` (context K/V, mask, Mamba states). ``shared``: the time-conditioning MLP's output
    ``[B, T, 2, D]`` (None: no conditioning)."""

    ctx: DenoiserContext
    positions: torch.Tensor
    block_size: int
    time_cond: nn.Module | None = None
    shared: torch.Tensor | None = None
    mamba_bidirectional: bool = False
    _masks: dict = field(default_factory=dict)

    def _mask(self, window: int | None, context_len: int):
        """The block mask, narrowed to a sliding window when the layer has one (cached)."""
        mask = self.ctx.attn_mask
        if window is None:
            return mask
        if window not in self._masks:
            key_pos = torch.cat(
                [torch.arange(context_len, device=self.positions.device), self.positions]
            )
            rel = self.positions[:, None] - key_pos[None]  # [T, S+T]
            allowed = rel < window  # HF's window: keys more than ``window - 1`` back drop out
            if mask is None:
                self._masks[window] = allowed[None, None]
            elif isinstance(mask, torch.Tensor):
                self._masks[window] = mask & allowed
            else:  # a FlexAttention BlockMask
                self._masks[window] = window_block_mask(mask, self.ctx.mask_mod, allowed)
        return self._masks[window]

    def attention(self, module, q, k, v, *, scale, window, softcap, dropout):
        li = module._twotower_layer
        context_len = 0
        if li in self.ctx.keys:
            context_len = self.ctx.keys[li].shape[2]
            k = torch.cat([self.ctx.keys[li].to(k.dtype), k], dim=2)
            v = torch.cat([self.ctx.values[li].to(v.dtype), v], dim=2)
        mask = self._mask(window, context_len)
        return attend(q, k, v, scale=scale, mask=mask, softcap=softcap, dropout=dropout)

    def mamba(self, mixer, x: torch.Tensor) -> torch.Tensor:
        """Every block scanned on its own (``[B * nb, bs, ...]``) from its context state."""
        li = mixer._twotower_layer
        ctx, block_size = self.ctx, self.block_size
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
            # state (what lies "before" a reversed block is the unseen future); averaged
            # with the context-seeded left-to-right pass.
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


# -- the functions transformers calls ------------------------------------------------------------


def twotower_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
):
    """An ``AttentionInterface`` function: ``query [B, H, T, d]``, ``key/value [B, Hkv, T, d]``
    (after the family's RoPE) -> ``([B, T, H, d], None)``. HF's own ``attention_mask`` is
    ignored: the run holds the tower's mask."""
    run = _RUN.get()
    if run is None:
        raise RuntimeError("the 'twotower' attention runs only inside a tower call")
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise UnsupportedBackbone(f"attention with {name!r} is not supported")
    if not getattr(module, "is_causal", True):
        raise UnsupportedBackbone("bidirectional (non-causal) attention layers")
    if not hasattr(module, "_twotower_layer"):
        raise UnsupportedBackbone(
            f"attention module {type(module).__name__} outside the decoder layer list"
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if isinstance(sliding_window, (tuple, list)):
        raise UnsupportedBackbone("two-sided sliding windows")
    out = run.attention(
        module,
        query,
        key,
        value,
        scale=scale,
        window=sliding_window or None,
        softcap=softcap or None,
        dropout=dropout if module.training else 0.0,
    )
    return out, None


def _mamba_forward(self, hidden_states, *args, **kwargs):
    run = _RUN.get()
    if run is None:
        return self._twotower_base.forward(self, hidden_states, *args, **kwargs)
    return run.mamba(self, hidden_states)


_MAMBA_CLASSES: dict[type, type] = {}


def _mamba_class(cls: type) -> type:
    """``cls`` with its ``forward`` routed to the active run (same state dict, same weights)."""
    if getattr(cls, "_twotower_base", None) is not None:
        return cls
    if cls not in _MAMBA_CLASSES:
        _MAMBA_CLASSES[cls] = type(
            f"TwoTower{cls.__name__}",
            (cls,),
            {"forward": _mamba_forward, "_twotower_base": cls, "__module__": __name__},
        )
    return _MAMBA_CLASSES[cls]


def _time_hook(module, args, output):
    run = _RUN.get()
    if run is None or getattr(run, "shared", None) is None:
        return None
    return run.time_cond.modulate(output, run.shared, module._twotower_norm)


# -- preparing a backbone ------------------------------------------------------------------------


def refuse(model_type: str, what: str) -> UnsupportedBackbone:
    return UnsupportedBackbone(f"backbone model_type {model_type!r} not supported: {what}")


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layer list: the shallowest ``nn.ModuleList`` of ``num_hidden_layers``."""
    config = model.config
    n = getattr(config, "num_hidden_layers", None)
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) == n
    ]
    if not found:
        raise refuse(config.model_type, f"no decoder layer list of num_hidden_layers={n}")
    return min(found, key=lambda item: item[0].count("."))


def is_mamba2(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in _MAMBA2_ATTRS)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower()


def prepare_backbone(backbone: nn.Module) -> None:
    """Make an HF causal LM runnable as a tower, in place: every module of decoder layer i
    tagged with i (``_twotower_layer``), Mamba-2 mixers routed to the active run. Refuses
    (``UnsupportedBackbone``, one line) what the structure already rules out."""
    register()
    config = backbone.config
    model_type = getattr(config, "model_type", type(backbone).__name__)
    if getattr(config, "is_encoder_decoder", False):
        raise refuse(model_type, "an encoder-decoder model (a decoder-only causal LM is needed)")
    sub = [k for k in ("text_config", "vision_config", "audio_config") if hasattr(config, k)]
    if sub:
        raise refuse(
            model_type, f"a composite model (has {', '.join(sub)}); load its text causal LM"
        )
    if backbone.get_output_embeddings() is None:
        raise refuse(model_type, "no LM head (get_output_embeddings() is None)")
    _, layers = layer_list(backbone)
    for i, layer in enumerate(layers):
        for module in layer.modules():
            module._twotower_layer = i
            if is_mamba2(module):
                module.__class__ = _mamba_class(type(module))


def layer_norms(layer: nn.Module) -> list[nn.Module]:
    """The norms a decoder layer owns directly (pre-/post-norms of its sub-layers), in order."""
    return [m for m in layer.children() if is_norm(m)]


def hook_time_conditioning(layers: nn.ModuleList) -> int:
    """Hook every layer-owned norm for time conditioning; returns how many there are."""
    j = 0
    for layer in layers:
        for norm in layer_norms(layer):
            norm._twotower_norm = j
            norm.register_forward_hook(_time_hook)
            j += 1
    return j


# -- probing a built model -----------------------------------------------------------------------


@contextmanager
def _quiet_transformers():
    """transformers' warnings off (e.g. Mamba's 'slow reference kernel' on the probe)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _probe_forward(model, clean, noisy, fail):
    try:
        return model(clean, noisy)
    except UnsupportedBackbone as exc:
        raise fail(str(exc)) from None
    except Exception as exc:
        raise fail(
            f"the denoiser fails on it ({type(exc).__name__}: {first_line(exc)[:200]})"
        ) from None


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = max(1.0, expected.abs().max().item())
    return (actual.float() - expected.float()).abs().max().item() / scale


@torch.no_grad()
def check_backbone(model) -> None:
    """Refuse (``UnsupportedBackbone``) a built ``TwoTowerModel`` whose towers do not do what
    they promise on a short random input: context logits equal to the HF model's own, a
    cache grown chunk by chunk equal to one pass, no denoiser block reading another block's
    noisy tokens or a later clean block. Skipped for weights it cannot read whole: on the
    meta device, or ZeRO-3 partitions (``ds_id``) in either tower."""
    backbone = model.backbone
    params = list(backbone.parameters())
    if not params or params[0].is_meta or any(hasattr(p, "ds_id") for p in model.parameters()):
        return
    model_type = backbone.config.model_type
    bs = model.block_size
    device = params[0].device
    vocab = backbone.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, vocab, (1, 2 * bs), generator=g).to(device)
    dtype = params[0].dtype
    tol = 1e-4 if dtype == torch.float32 else 3e-2

    def fail(what: str) -> UnsupportedBackbone:
        return refuse(model_type, what)

    try:
        with _quiet_transformers():
            expected = backbone(clean, use_cache=False).logits.float()
    except Exception as exc:
        raise fail(
            f"its own forward fails ({type(exc).__name__}: {first_line(exc)[:200]})"
        ) from None
    try:
        ours = model.context(clean, block_size=bs).logits
        run_seen = model.context.last_seen
        cache, first = model.context_extend(None, clean[:, :bs])
        _, second = model.context_extend(cache, clean[:, bs:])
    except UnsupportedBackbone as exc:
        raise fail(str(exc)) from None
    except Exception as exc:  # the towers cannot run it: say how, in one line
        raise fail(
            f"the towers fail on it ({type(exc).__name__}: {first_line(exc)[:200]})"
        ) from None
    _, layers = layer_list(backbone)
    silent = sorted(set(range(len(layers))) - run_seen)
    if _rel_err(ours, expected) > tol or _rel_err(torch.cat([first, second], 1), expected) > tol:
        kinds = sorted({type(c).__name__ for i in silent for c in layers[i].children()})
        hint = f"; layers {silent} mix tokens outside the registry? ({', '.join(kinds)})"
        raise fail(
            "its own forward and the context tower's disagree (attention outside "
            "transformers' attention registry, or a bias/state we do not reproduce"
            + (hint if silent else ")")
        )
    mask = model.mask_token_id
    noisy = clean.clone()
    noisy[:, 1::2] = mask
    modes = [(m, m.training) for m in model.denoiser.modules()]
    model.denoiser.eval()
    try:
        base = _probe_forward(model, clean, noisy, fail)
        other = noisy.clone()
        other[:, : bs - 1 : 2] = (other[:, : bs - 1 : 2] + 1) % vocab  # noisy block 0 changes
        if _rel_err(_probe_forward(model, clean, other, fail)[:, bs:], base[:, bs:]) > tol:
            raise fail("block 1 of the denoiser reads block 0's noisy tokens (a leak)")
        later = clean.clone()
        later[:, bs:] = (later[:, bs:] + 1) % vocab  # a later clean block changes
        if _rel_err(_probe_forward(model, later, noisy, fail), base) > tol:
            raise fail("the denoiser reads a later clean block (a leak)")
    finally:
        for module, mode in modes:
            module.training = mode
