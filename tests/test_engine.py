"""The DeepSpeed engine for real: ZeRO stages, frozen parameters, checkpoints,
exact resume after kill -9, preemption signals, two processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO,
    TINY,
    losses,
    read_metrics,
    run_cli,
    run_torchrun,
    subprocess_env,
)

from twotower_train.config import OptimConfig, compose
from twotower_train.engine.deepspeed_engine import lr_lambda
from twotower_train.engine.distributed import init_distributed
from twotower_train.run.train import engine_for, train


def _train_in_process(tmp_path: Path, *overrides: str) -> dict[int, float]:
    run_dir = tmp_path / "run"
    train(compose([*TINY, f"run.dir={run_dir}", *overrides]))
    return losses(run_dir)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_match_plain_data_parallel(tmp_path: Path, stage: int) -> None:
    common = ("train.steps=4", "train.log_every=1", "precision=fp32")
    ref = _train_in_process(tmp_path / "z0", "deepspeed=zero0", *common)
    got = _train_in_process(tmp_path / f"z{stage}", f"deepspeed=zero{stage}", *common)
    assert sorted(got) == [1, 2, 3, 4]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-4), step
    ckpts = tmp_path / f"z{stage}" / "run" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000004"


def test_bf16_zero2_trains(tmp_path: Path) -> None:
    got = _train_in_process(
        tmp_path,
        "deepspeed=zero2",
        "precision=bf16",
        "precision.cpu_bf16=on",  # bf16 even on a CPU without native bf16 matmuls
        "train.steps=12",
        "train.log_every=1",
        "optim.lr=3e-3",
    )
    assert all(torch.isfinite(torch.tensor(v)) for v in got.values())
    assert sum(got[s] for s in (10, 11, 12)) < sum(got[s] for s in (1, 2, 3))


class _HalfFrozen(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = torch.nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.trained = torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": self.trained(self.frozen(x.float())).pow(2).mean()}


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_frozen_parameters_never_reach_the_optimizer(stage: int) -> None:
    init_distributed()
    cfg = compose(["precision=fp32", f"deepspeed=zero{stage}", "train.micro_batch_size=2"])
    torch.manual_seed(0)
    module = _HalfFrozen()
    before = module.frozen.weight.detach().clone()
    engine, optimizer, _ = engine_for(module, cfg)
    for _ in range(3):
        engine.backward(engine(torch.randn(2, 8))["loss"])
        engine.step()
    frozen_ids = {id(p) for p in module.frozen.parameters()}
    inner = getattr(optimizer, "optimizer", optimizer)
    in_opt = [p for g in inner.param_groups for p in g["params"]]
    assert not any(id(p) in frozen_ids for p in in_opt)
    state_ids = {id(p) for p in inner.state}
    assert not state_ids & frozen_ids
    assert all(p.grad is None for p in module.frozen.parameters())
    assert torch.equal(module.frozen.weight.detach(), before)
    n_frozen = sum(p.numel() for p in module.frozen.parameters())
    n_opt = sum(p.numel() for p in in_opt)
    # ZeRO flattens the trainable params; whatever the layout, frozen ones are not in it.
    assert n_opt < n_frozen + sum(p.numel() for p in module.trained.parameters())


def test_lr_schedules() -> None:
    cos = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_lambda(0, 100, cos) == pytest.approx(0.1)
    assert lr_lambda(9, 100, cos) == pytest.approx(1.0)
    assert lr_lambda(55, 100, cos) == pytest.approx(0.55)
    assert lr_lambda(100, 100, cos) == pytest.approx(0.1)
    wsd = OptimConfig(lr=1.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_lambda(50, 100, wsd) == 1.0
    assert lr_lambda(80, 100, wsd) == pytest.approx(1.0)
    assert lr_lambda(90, 100, wsd) == pytest.approx(0.5)


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        path = run_dir / "metrics.jsonl"
        if path.is_file() and any(r.get("step", 0) >= step for r in read_metrics(run_dir)):
            return
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached")


def _popen(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "twotower_train", *args],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


RESUME = [
    "precision=fp32",
    "train.steps=40",
    "train.log_every=1",
    "train.ckpt_every=4",
    "train.keep_last=2",
]


@pytest.mark.slow
def test_kill_9_then_rerun_gives_identical_losses(tmp_path: Path) -> None:
    ref_dir, dir_ = tmp_path / "ref", tmp_path / "killed"
    ref = run_cli([*TINY, *RESUME, f"run.dir={ref_dir}"])
    assert ref.returncode == 0, ref.stderr
    proc = _popen([*TINY, *RESUME, f"run.dir={dir_}"])
    _wait_for_step(dir_, 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = int((dir_ / "checkpoints" / "latest").read_text().removeprefix("step_"))
    assert 4 <= resumed < 40  # killed mid-run
    again = run_cli([*TINY, *RESUME, f"run.dir={dir_}"])
    assert again.returncode == 0, again.stderr
    assert f"resumed at step {resumed}" in again.stdout
    want, got = losses(ref_dir), losses(dir_)
    assert sorted(got) == list(range(1, 41))  # records past the checkpoint were replaced
    for step in range(resumed + 1, 41):
        assert got[step] == want[step], step
    tags = sorted(p.name for p in (dir_ / "checkpoints").glob("step_*"))
    assert tags == ["step_00000036", "step_00000040"]  # keep_last=2


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=lambda s: s.name)
def test_preemption_signal_saves_and_exits_cleanly(tmp_path: Path, sig) -> None:
    run_dir = tmp_path / "run"
    proc = _popen(
        [
            *TINY,
            "precision=fp32",
            "train.steps=1000",
            "train.log_every=1",
            "train.ckpt_every=1000",
            f"run.dir={run_dir}",
        ]
    )
    _wait_for_step(run_dir, 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    tag = (run_dir / "checkpoints" / "latest").read_text()
    step = json.loads((run_dir / "checkpoints" / tag / "trainer_state.json").read_text())["step"]
    assert step >= 3 and f"{sig.name}: checkpoint saved" in out
    assert step < 1000  # it stopped early, at the signal


def test_incomplete_and_corrupt_checkpoints(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*TINY, "precision=fp32", "train.steps=4", "train.ckpt_every=2", f"run.dir={run_dir}"]
    assert run_cli(args).returncode == 0
    ckpts = run_dir / "checkpoints"
    # A crash mid-save: the new folder has no COMPLETE marker and `latest` is untouched.
    (ckpts / "step_00000006").mkdir()
    (ckpts / "step_00000006" / "partial").write_text("x")
    longer = [*args[:-2], "run.resume=changed"]  # more steps: a training change, on purpose
    proc = run_cli([*longer, "train.steps=6", "train.ckpt_every=2", f"run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr
    assert "resumed at step 4" in proc.stdout
    assert (ckpts / "latest").read_text() == "step_00000006"
    assert (ckpts / "step_00000006" / "COMPLETE").is_file()
    # A corrupt checkpoint is refused with one line naming it.
    for f in (ckpts / "step_00000006").glob("*model_states.pt"):
        f.write_bytes(b"garbage")
    bad = run_cli([*longer, "train.steps=8", f"run.dir={run_dir}"])
    assert bad.returncode != 0
    err = [ln for ln in bad.stderr.splitlines() if ln.startswith("twotower_train: error:")]
    assert len(err) == 1 and "step_00000006 is corrupt" in err[0], bad.stderr


@pytest.mark.slow
def test_two_processes_train_resume_and_refuse_other_world_size(tmp_path: Path) -> None:
    args = [
        *TINY,
        "precision=fp32",
        "deepspeed=zero2",
        "train.steps=6",
        "train.log_every=1",
        "train.ckpt_every=3",
    ]
    ref = run_torchrun(2, [*args, f"run.dir={tmp_path / 'ref'}"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    split = tmp_path / "split"
    first = run_torchrun(2, [*args, "train.stop_after=3", f"run.dir={split}"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(losses(split)) == [1, 2, 3]
    wrong = run_cli([*args, f"run.dir={split}"])
    assert wrong.returncode != 0 and "written by 2 ranks but this run has 1" in wrong.stderr
    second = run_torchrun(2, [*args, f"run.dir={split}"])
    assert second.returncode == 0, second.stderr[-3000:]
    want, got = losses(tmp_path / "ref"), losses(split)
    assert sorted(got) == list(range(1, 7))
    for step in range(4, 7):
        assert got[step] == pytest.approx(want[step], rel=1e-6), step


def test_wandb_offline_run_continues_same_id(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [
        *TINY,
        "precision=fp32",
        "logger=wandb",
        "logger.mode=offline",
        "train.log_every=1",
        f"run.dir={run_dir}",
    ]
    first = run_cli([*args, "train.steps=2"], WANDB_SILENT="true")
    assert first.returncode == 0, first.stderr
    run_id = (run_dir / "wandb_id.txt").read_text()
    # one more step: a training change, resumed on purpose
    second = run_cli([*args, "train.steps=3", "run.resume=changed"], WANDB_SILENT="true")
    assert second.returncode == 0, second.stderr
    assert (run_dir / "wandb_id.txt").read_text() == run_id
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1
