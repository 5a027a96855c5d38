"""Activation checkpointing of the trained tower's decoder layers, applied from outside.

Each decoder layer's ``forward`` (an instance attribute: names, parameters and state dict
unchanged) runs through ``torch.utils.checkpoint`` (non-reentrant): the layer keeps only
its inputs, and its forward runs again in the backward to rebuild the activations.

The catch: a tower's per-call state -- which attention function the HF model's config
names, and the run (context K/V, block mask, Mamba states, time conditioning) the
``"twotower"`` attention and the Mamba mixers read -- lives in ``registry.running(...)``,
which has returned by the time the backward recomputes a layer. Without it the recompute
would raise (attention outside a tower call) or, worse, run the HF Mamba forward and
produce wrong gradients. So the run active at the layer's forward is captured, and the
recompute re-enters it (``checkpoint``'s ``context_fn``), together with the tower's FP8
autocast if it has one (``engine/precision.py``). RNG state (dropout) is restored by
``checkpoint`` itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from twotower_train.model.registry import current_run, layer_list, running


@contextmanager
def _reenter(model: nn.Module, run, autocast: Callable[[], AbstractContextManager] | None):
    with ExitStack() as stack:
        if run is not None:
            stack.enter_context(running(model, run))
        if autocast is not None:
            stack.enter_context(autocast())
        yield


def _checkpointed(inner, model: nn.Module, autocast, *args, **kwargs):
    """A decoder layer's forward through ``checkpoint``, its recompute inside the same run."""
    if not torch.is_grad_enabled():  # evaluation: nothing to save
        return inner(*args, **kwargs)
    run = current_run()

    def contexts():
        return nullcontext(), _reenter(model, run, autocast)

    return checkpoint(inner, *args, use_reentrant=False, context_fn=contexts, **kwargs)


def checkpoint_layers(
    model: nn.Module,
    layers: nn.ModuleList,
    autocast: Callable[[], AbstractContextManager] | None = None,
) -> int:
    """Checkpoint every layer of ``layers``, the decoder layers of ``model`` (an HF causal
    LM run as a tower, or plainly). ``autocast``: a context the recompute must also run in.
    Returns the number of layers."""
    for layer in layers:
        # a partial of the bound method and the model: a deep copy re-points both
        layer.forward = functools.partial(_checkpointed, layer.forward, model, autocast)
    return len(layers)


def checkpoint_trained_tower(
    model: nn.Module, autocast: Callable[[], AbstractContextManager] | None = None
) -> int:
    """``checkpoint_layers`` on the denoiser of a ``TwoTowerModel`` (the HF model it runs),
    or on an HF causal LM itself (AR objective). The frozen context tower has no backward."""
    denoiser = getattr(model, "denoiser", None)
    if denoiser is not None:  # its own layer list (``denoiser.layers`` may copy only the top k)
        return checkpoint_layers(denoiser.model, denoiser.layers, autocast)
    return checkpoint_layers(model, layer_list(model)[1], autocast)
