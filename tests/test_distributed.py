"""The two-tower objective across processes and accumulation steps: two ranks under ZeRO-3
(per-rank noise restored exactly on resume, the release gathered from partitions), and
gradient accumulation equal to a larger micro batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY, losses, run_torchrun

from twotower_train.backbones import load_release
from twotower_train.config import compose
from twotower_train.run.train import train

TWO_TOWER = [
    *TINY,
    "train.objective=twotower",
    "denoiser.block_size=8",
    "precision=fp32",
    "deepspeed=zero3",
    "train.steps=4",
    "train.log_every=1",
    "train.ckpt_every=2",
    "eval.tasks=[]",
]


@pytest.mark.slow
def test_two_tower_on_two_ranks_zero3_resumes_exactly_and_releases(tmp_path: Path) -> None:
    ref = run_torchrun(2, [*TWO_TOWER, f"run.dir={tmp_path / 'ref'}"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    split = tmp_path / "split"
    first = run_torchrun(2, [*TWO_TOWER, "train.stop_after=2", f"run.dir={split}"])
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_torchrun(2, [*TWO_TOWER, f"run.dir={split}"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed at step 2" in second.stdout
    want, got = losses(tmp_path / "ref"), losses(split)
    assert sorted(got) == [1, 2, 3, 4]
    # steps 3-4 draw their masks from every rank's restored RNG: any rank restored wrongly
    # (or drawing another rank's noise) changes the loss
    for step in (3, 4):
        assert got[step] == want[step], step
    # ZeRO-3 export: the denoiser is gathered from both ranks' partitions
    a, _ = load_release(tmp_path / "ref" / "release")
    b, _ = load_release(split / "release")
    assert a.config == b.config and a.config.block_size == 8
    for name, p in a.denoiser.state_dict().items():
        torch.testing.assert_close(b.denoiser.state_dict()[name], p, rtol=0, atol=1e-6)
    fresh = b.denoiser.embed.weight
    assert fresh.numel() > 0 and torch.isfinite(fresh).all()
    # mode=release on ONE process from the 2-rank ZeRO-3 checkpoint: the same weights
    from conftest import run_cli

    (split / "release").rename(tmp_path / "split_end")
    proc = run_cli([*TWO_TOWER, "mode=release", f"run.dir={split}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    c, _ = load_release(split / "release")
    for name, p in b.denoiser.state_dict().items():
        torch.testing.assert_close(c.denoiser.state_dict()[name], p, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_grad_accumulation_equals_a_larger_micro_batch(tmp_path: Path) -> None:
    common = [*TINY, "precision=fp32", "train.steps=3", "train.log_every=1"]
    runs = {}
    for micro, accum in ((4, 1), (2, 2)):
        run_dir = tmp_path / f"m{micro}a{accum}"
        overrides = [f"train.micro_batch_size={micro}", f"train.grad_accum_steps={accum}"]
        train(compose([*common, *overrides, f"run.dir={run_dir}"]))
        runs[micro] = losses(run_dir)
    assert sorted(runs[4]) == [1, 2, 3]
    for step in (1, 2, 3):
        assert runs[2][step] == pytest.approx(runs[4][step], rel=1e-5), step
    assert runs[4][3] != runs[4][1]  # it trained


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero0", "zero2"])
def test_release_mode_exports_the_checkpoint_of_one_process(tmp_path: Path, stage) -> None:
    """`mode=release` rebuilds the release from the latest checkpoint (one process): the
    same weights as the release the run wrote at its end."""
    from conftest import run_cli

    run_dir = tmp_path / "run"
    args = [*TWO_TOWER, f"deepspeed={stage}", "train.steps=2", f"run.dir={run_dir}"]
    train(compose(args))
    end, _ = load_release(run_dir / "release")
    (run_dir / "release").rename(tmp_path / "end")
    proc = run_cli([*args, "mode=release"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    again, _ = load_release(run_dir / "release")
    for name, p in end.denoiser.state_dict().items():
        torch.testing.assert_close(again.denoiser.state_dict()[name], p, rtol=0, atol=0)
    assert "released step 2" in proc.stdout + proc.stderr
    empty = run_cli([*TWO_TOWER, "mode=release", f"run.dir={tmp_path / 'none'}"])
    assert empty.returncode == 2
    assert empty.stderr.strip().splitlines()[-1].startswith("twotower_train: error: no checkpoint")
