"""The frozen context tower under ZeRO-3: never in the optimizer, no gradients, unchanged by
training, and placed as `deepspeed.context_placement` says (partitioned by ZeRO-3, or whole
on every rank) -- with the same losses either way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_TWO_TOWER_ZERO3, losses

from twotower_train.config import compose
from twotower_train.run.train import setup, train

TWO_TOWER_ZERO3 = [*TINY_TWO_TOWER_ZERO3, "train.ckpt_every=100", "eval.tasks=[]"]


def test_context_tower_never_trains_under_zero3_in_either_placement() -> None:
    got = {}
    for placement in ("shard", "replicate"):
        # a scratch backbone: drawn whole, then partitioned (shard) or kept (replicate), so
        # both placements start from the same weights
        run = setup(compose([*TWO_TOWER_ZERO3, f"deepspeed.context_placement={placement}"]), None)
        context = run.objective.model.context
        denoiser = run.objective.model.denoiser
        ctx_params = list(context.parameters())
        assert ctx_params and not any(p.requires_grad for p in ctx_params)
        # what the optimizer holds: exactly the denoiser's parameters, none of the tower's
        in_optimizer = {id(p) for group in run.engine.optimizer.fp16_groups for p in group}
        assert not in_optimizer & {id(p) for p in ctx_params}
        assert in_optimizer == {id(p) for p in denoiser.parameters()}
        if placement == "shard":  # partitioned by ZeRO-3 like the denoiser
            assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in ctx_params)
        else:  # whole on this rank, outside what DeepSpeed manages
            assert not any(hasattr(p, "ds_id") for p in ctx_params)
            assert not {id(p) for p in ctx_params} & {id(p) for p in run.engine.parameters()}
            before = {k: v.clone() for k, v in context.state_dict().items()}
        got[placement] = []
        for _ in range(2):
            out = run.engine(run.next_batch())
            run.engine.backward(out["loss"])
            run.engine.step()
            got[placement].append(out["loss"].item())
        assert all(p.grad is None for p in ctx_params)  # no gradient buffers
        if placement == "replicate":
            for k, v in context.state_dict().items():
                assert torch.equal(v, before[k]), k
    # the placement changes where the weights live, not the math: same batches, same noise
    assert got["replicate"] == pytest.approx(got["shard"], rel=1e-5)
    assert got["shard"][1] != got["shard"][0]


def test_replicated_context_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """Checkpoints of a replicated run hold no context tower (frozen: rebuilt from the
    backbone) and resume exactly."""
    args = [*TWO_TOWER_ZERO3, "deepspeed.context_placement=replicate", "train.ckpt_every=2"]
    train(compose([*args, f"run.dir={tmp_path / 'ref'}"]))
    split = tmp_path / "split"
    train(compose([*args, "train.stop_after=2", f"run.dir={split}"]))
    train(compose([*args, f"run.dir={split}"]))
    want, got = losses(tmp_path / "ref"), losses(split)
    assert sorted(got) == [1, 2, 3]
    assert got[3] == want[3]
