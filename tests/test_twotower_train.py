"""The two-tower objective through the real engine: frozen context tower, both
families end to end, exact resume of the random masking."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY, losses, read_metrics

from twotower_train.backbones import load_backbone, load_tokenizer
from twotower_train.config import compose
from twotower_train.engine.deepspeed_engine import build_engine
from twotower_train.engine.distributed import init_distributed
from twotower_train.train import build_objective, train

# A random tiny Llama (scratch) as backbone, trained as a two-tower model.
TT = [
    *TINY,
    "train.objective=twotower",
    "denoiser.block_size=8",
    "precision=fp32",
    "train.log_every=1",
]


def test_context_tower_is_frozen_and_out_of_the_optimizer() -> None:
    init_distributed()
    cfg = compose([*TT, "train.micro_batch_size=2"])
    tokenizer = load_tokenizer(cfg.backbone)
    module = build_objective(cfg, load_backbone(cfg.backbone, tokenizer), tokenizer)
    ctx_params = list(module.model.context.parameters())
    assert ctx_params and not any(p.requires_grad for p in ctx_params)
    before = [p.detach().clone() for p in ctx_params]
    engine, optimizer, _ = build_engine(module, cfg, grad_accum=1, world_size=1)
    ids = torch.randint(3, 2048, (2, 32))
    batch = {"input_ids": ids, "loss_mask": torch.ones_like(ids, dtype=torch.bool)}
    for _ in range(2):
        out = engine(batch)
        engine.backward(out["loss"])
        engine.step()
    assert set(out) >= {"loss", "ce", "kd", "masked_acc"}
    assert all(p.grad is None for p in ctx_params)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, ctx_params))
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in ctx_params}
    den = [p for p in module.model.denoiser.parameters()]
    assert in_opt == {id(p) for p in den}


def test_two_tower_training_resumes_exactly(tmp_path: Path) -> None:
    args = [*TT, "train.steps=6", "train.ckpt_every=3"]
    train(compose([*args, f"run.dir={tmp_path / 'ref'}"]))
    split = tmp_path / "split"
    train(compose([*args, "train.stop_after=3", f"run.dir={split}"]))
    train(compose([*args, f"run.dir={split}"]))
    want, got = losses(tmp_path / "ref"), losses(split)
    assert sorted(got) == list(range(1, 7))
    for step in range(4, 7):
        assert got[step] == want[step], step
    assert want[6] < want[1]


def test_nemotron_h_two_tower_end_to_end(tmp_path: Path) -> None:
    """Shipped Nemotron-H backbone: Mamba state seeding through the engine, bf16."""
    train(
        compose(
            [
                "recipe=tiny_nemotron_h",
                "data.seq_len=32",
                "data.val_sequences=4",
                "train.micro_batch_size=2",
                "train.steps=2",
                "train.log_every=1",
                f"run.dir={tmp_path / 'run'}",
            ]
        )
    )
    records = read_metrics(tmp_path / "run")
    steps = [r for r in records if "ce" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert any("val_masked_acc" in r for r in records)


@pytest.mark.parametrize(
    "override", ["diffusion=elbo", "distill=none", "denoiser.time_conditioning=true"]
)
def test_objective_variants_train(tmp_path: Path, override: str) -> None:
    train(compose([*TT, "train.steps=2", override, f"run.dir={tmp_path / 'run'}"]))
    got = losses(tmp_path / "run")
    assert sorted(got) == [1, 2] and all(torch.isfinite(torch.tensor(v)) for v in got.values())
