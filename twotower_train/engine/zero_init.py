"""Building a run's model already partitioned under ZeRO-3 (``deepspeed.zero_init``).

Built whole, a run's model costs every process the fp32 backbone, the denoiser's copy of it
and a template copy of both before DeepSpeed partitions anything: ~470 GiB of host memory
for a 30B backbone. Built partitioned, each process holds 1/world of every tensor from the
moment it exists:

    backbone     ``from_pretrained`` under transformers' ZeRO-3 support (``HfDeepSpeedConfig``):
                 ``deepspeed.zero.Init``, weights loaded into the partitions. A scratch
                 backbone is drawn whole (the same weights as any other build, the same
                 random state on every rank), then partitioned like the denoiser below.
                 ``context_placement=replicate``: built whole, it is not DeepSpeed's
    denoiser     a fresh model of the backbone's class built under ``zero.Init``, its
                 partitions copied from the backbone's on each rank (``clone_partitioned``):
                 the same flat slice of the same tensor, so no communication
    template     the same structure on the meta device: no memory; ``Run.trained_model``
                 fills it on rank 0 with the gathered parameters and the live buffers

The backbone check (``model.registry.check_backbone``) needs whole weights and is skipped:
``mode=plan`` and a one-process run of the same family exercise the same towers.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def is_partitioned(p: torch.Tensor) -> bool:
    """A parameter ZeRO-3 has partitioned (its values live in ``p.ds_tensor``)."""
    return hasattr(p, "ds_id")


def full_numel(p: torch.Tensor) -> int:
    """Elements of the whole parameter, partitioned or not."""
    return p.ds_numel if is_partitioned(p) else p.numel()


def full_ndim(p: torch.Tensor) -> int:
    """Dimensions of the whole parameter (a partition is flat)."""
    return len(p.ds_shape) if is_partitioned(p) else p.ndim


@contextmanager
def zero3_construction(ds_config: dict) -> Iterator[None]:
    """While active, transformers builds models under ``deepspeed.zero.Init`` with
    ``ds_config`` (``from_config``, ``from_pretrained``: weights loaded into partitions)."""
    from transformers.integrations.deepspeed import (
        HfDeepSpeedConfig,
        unset_hf_deepspeed_config,
    )

    keep = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep


def clone_partitioned(src: nn.Module) -> nn.Module:
    """A copy of the HF model ``src`` whose parameters are ZeRO-3 partitions (call inside
    ``zero3_construction``): built empty under ``zero.Init``, then each rank copies its own
    slice of every tensor from ``src`` (partitioned alike, or whole on every rank). ``src``
    may have a shorter layer list than its config says (the denoiser's top k layers)."""
    from twotower_train.model.registry import layer_list

    clone = _built_empty(type(src), copy.deepcopy(src.config))
    path, built = layer_list(clone)  # all the config's layers
    layers = src.get_submodule(path)
    if len(built) != len(layers):  # keep the layers src kept, by their index in the stack
        kept = [layer_index(layer) for layer in layers]
        parent_path, _, attr = path.rpartition(".")
        setattr(clone.get_submodule(parent_path), attr, nn.ModuleList(built[i] for i in kept))
    # what prepare_backbone did to src's modules (layer tags, Mamba classes), as a deep
    # copy would have kept it
    built_modules = dict(clone.named_modules())
    for name, module in src.named_modules():
        twin = built_modules[name]
        twin.__class__ = type(module)
        for key, value in vars(module).items():
            if key.startswith("_twotower"):
                setattr(twin, key, value)
    copy_into_partitions(clone, src)
    return clone


def _built_empty(cls, config) -> nn.Module:
    """``cls`` from ``config`` under ``zero.Init`` without initialising its weights (they are
    overwritten next): transformers would gather every module to initialise it on rank 0,
    drawing random numbers there only, which would leave the ranks' generators apart."""
    import transformers.integrations.deepspeed as hf_deepspeed

    initialize = hf_deepspeed.initialize_weights_zero3
    hf_deepspeed.initialize_weights_zero3 = lambda model: None
    try:
        return cls._from_config(config, dtype=torch.float32)
    finally:
        hf_deepspeed.initialize_weights_zero3 = initialize


def layer_index(layer: nn.Module) -> int:
    """A decoder layer's index in its stack, as ``prepare_backbone`` tagged it."""
    index = getattr(layer, "_twotower_layer", None)
    if index is None:
        raise RuntimeError("the backbone's layers are not tagged: prepare_backbone first")
    return index


@torch.no_grad()
def copy_into_partitions(dst: nn.Module, src: nn.Module) -> None:
    """``dst``'s partitioned parameters set to ``src``'s values, rank-locally, and its
    buffers to ``src``'s. Names and shapes must match one to one."""
    import deepspeed.comm as dist

    rank = dist.get_rank()
    theirs = dict(src.named_parameters())
    ours = dict(dst.named_parameters())
    if theirs.keys() != ours.keys():
        raise RuntimeError(
            f"cannot copy {type(src).__name__}: parameters differ "
            f"({sorted(theirs.keys() ^ ours.keys())[:4]})"
        )
    for name, p in ours.items():
        s = theirs[name]
        if tuple(p.ds_shape) != tuple(s.ds_shape if is_partitioned(s) else s.shape):
            raise RuntimeError(f"cannot copy {name}: shapes differ")
        part = p.ds_tensor
        if is_partitioned(s):
            part.copy_(s.ds_tensor)
        else:  # whole on every rank: this rank's slice of the flat tensor (zero-padded)
            flat = s.detach().reshape(-1)
            chunk = flat[rank * part.numel() : (rank + 1) * part.numel()]
            part.zero_()
            part[: chunk.numel()].copy_(chunk)
    theirs_b = dict(src.named_buffers())
    for name, b in dst.named_buffers():
        if name in theirs_b:
            b.copy_(theirs_b[name])


def tower_parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model`` and any tower ``deepspeed_engine`` put back outside its module tree (the
    replicated context tower), as ``(name prefix, module)``."""
    parts = [("", model)]
    for name, value in vars(model).items():
        if isinstance(value, nn.Module):
            parts.append((f"{name}.", value))
    return parts


def _named(parts: list[tuple[str, nn.Module]]) -> Iterator[tuple[str, nn.Parameter]]:
    for prefix, module in parts:
        for name, p in module.named_parameters(remove_duplicate=False):
            yield prefix + name, p


def gathered_state(parts: list[tuple[str, nn.Module]], keep: bool) -> dict[str, torch.Tensor]:
    """Every parameter of ``parts`` (trainable and frozen) whole, fp32 on CPU, under its
    first name, gathered one at a time (collective under ZeRO-3: call on every rank). Only a
    rank with ``keep`` holds the copies (at 30B: 250 GB of fp32 on one rank, not on each)."""
    import deepspeed

    out, seen = {}, set()
    for name, p in _named(parts):
        if id(p) in seen:
            continue
        seen.add(id(p))
        with deepspeed.zero.GatheredParameters([p], enabled=is_partitioned(p)):
            if keep:
                out[name] = p.detach().float().cpu().clone()
    return out


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the meta device, made without copying one value: every
    parameter and buffer is replaced by a meta tensor of its shape and dtype (tied
    parameters stay tied). ``fill_meta`` makes a real model of it."""
    memo: dict[int, object] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in memo:
            meta = torch.empty_like(t, device="meta")
            if isinstance(t, nn.Parameter):
                meta = nn.Parameter(meta, requires_grad=t.requires_grad)
            memo[id(t)] = meta
    return copy.deepcopy(model, memo)


def fill_meta(
    template: nn.Module, parts: list[tuple[str, nn.Module]], state: dict[str, torch.Tensor]
) -> nn.Module:
    """A copy of the meta ``template`` holding ``state`` (names tied in ``parts`` share one
    tensor again) and the buffers of ``parts`` (non-persistent ones included), each in the
    dtype the template was built in."""
    model = copy.deepcopy(template)
    first: dict[int, nn.Parameter] = {}
    for name, p in _named(parts):
        if id(p) not in first:
            like = model.get_parameter(name)
            first[id(p)] = nn.Parameter(state[name].to(like.dtype), requires_grad=p.requires_grad)
        _set(model, name, first[id(p)])
    for prefix, module in parts:
        for name, b in module.named_buffers():
            like = model.get_buffer(prefix + name)
            _set(model, prefix + name, b.detach().to("cpu", like.dtype, copy=True))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"trained model incomplete: {left[:4]} left on the meta device")
    return model


def _set(model: nn.Module, name: str, value: torch.Tensor) -> None:
    parent, _, attr = name.rpartition(".")
    owner = model.get_submodule(parent)
    if isinstance(value, nn.Parameter):
        owner._parameters[attr] = value
    else:
        owner._buffers[attr] = value
