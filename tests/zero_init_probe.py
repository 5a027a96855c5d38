"""Run by tests/test_zero_init.py under torchrun (not a test module): builds a run
partitioned (ZeRO-3, ``deepspeed.zero_init``) from the overrides on its command line and
checks on every rank that each parameter is a partition of its own size (1/world of the
tensor) holding this rank's slice of the right values: the context tower's from the
backbone's files, each denoiser layer's from the backbone layer it is aligned with."""

from __future__ import annotations

import math
import sys

import torch

from twotower_train.backbones import load_backbone
from twotower_train.config import compose
from twotower_train.engine.zero_init import is_partitioned
from twotower_train.model.registry import layer_list
from twotower_train.run.train import setup


def main() -> None:
    cfg = compose(sys.argv[1:])
    run = setup(cfg, None)
    rank, world = run.env.rank, run.env.world_size
    assert world > 1, "run me with torchrun --nproc_per_node 2"
    assert next(run.template.parameters()).is_meta
    reference = dict(load_backbone(cfg.backbone, run.tokenizer).named_parameters())
    model = run.objective.model
    replicate = cfg.deepspeed.context_placement.value == "replicate"

    def check(p: torch.Tensor, whole: torch.Tensor, name: str) -> None:
        assert is_partitioned(p) and p.numel() == 0, name
        assert tuple(p.ds_shape) == tuple(whole.shape), name
        n = p.ds_tensor.numel()
        assert n == math.ceil(whole.numel() / world), (name, n)
        mine = whole.reshape(-1)[rank * n : (rank + 1) * n]
        assert torch.equal(p.ds_tensor[: mine.numel()].float(), mine), name

    for name, p in model.context.backbone.named_parameters():
        if replicate:  # whole on every rank, not DeepSpeed's
            assert not is_partitioned(p) and torch.equal(p.float(), reference[name]), name
        else:
            check(p, reference[name], name)
    path, _ = layer_list(model.denoiser.model)
    ids = model.denoiser.layer_ids
    checked = 0
    for name, p in model.denoiser.model.named_parameters():
        source = name
        if name.startswith(path + "."):
            i, rest = name[len(path) + 1 :].split(".", 1)
            source = f"{path}.{ids[int(i)]}.{rest}"
        check(p, reference[source], name)
        checked += 1
    print(f"probe rank {rank}: {checked} denoiser partitions of {world} checked", flush=True)


if __name__ == "__main__":
    main()
