"""Every recipe composes; bad input is refused in one line before any work."""

from __future__ import annotations

import pytest
from conftest import REPO, run_cli

from twotower_train.config import (
    Config,
    ConfigError,
    TrainConfig,
    batch_arithmetic,
    compose,
)
from twotower_train.engine.distributed import first_slurm_host, resolve_env

RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes(recipe: str) -> None:
    cfg = compose([f"recipe={recipe}"])
    assert isinstance(cfg, Config)
    assert cfg.recipe == recipe
    assert cfg.run.dir == f"runs/{recipe}"


def test_default_recipe_is_tiny_and_overrides_apply() -> None:
    cfg = compose(["train.steps=7", "deepspeed=zero2", "optim.lr=0.01"])
    assert cfg.recipe == "tiny"
    assert (cfg.train.steps, cfg.deepspeed.stage, cfg.optim.lr) == (7, 2, 0.01)


def test_recipe_overrides_base_groups() -> None:
    cfg = compose(["recipe=tiny_backbone"])
    assert cfg.optim.schedule.value == "wsd"  # recipe's `override /optim: adamw_wsd`
    assert cfg.backbone.config["model_type"] == "llama"


@pytest.mark.parametrize(
    "override, message",
    [
        ("foo=1", "unknown config key 'foo'"),
        ("+train.foo=1", "unknown config key 'train.foo'"),
        ("train.steps=abc", "train.steps"),
        ("logger.mode=bogus", "logger.mode"),
        ("deepspeed=zero9", "deepspeed/zero9"),
        ("recipe=does_not_exist", "unknown recipe 'does_not_exist'"),
        ("train.steps=0", "train.steps must be > 0"),
        ("deepspeed.stage=5", "deepspeed.stage must be"),
    ],
)
def test_bad_input_is_one_clear_line(override: str, message: str) -> None:
    proc = run_cli([override], timeout=60)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("twotower_train: error:")
    assert message in lines[0]
    assert proc.stdout == ""  # nothing started


def test_batch_arithmetic() -> None:
    assert batch_arithmetic(TrainConfig(micro_batch_size=4, grad_accum_steps=2), 2) == (2, 16)
    t = TrainConfig(micro_batch_size=4, grad_accum_steps=None, global_batch_size=32)
    assert batch_arithmetic(t, 2) == (4, 32)
    with pytest.raises(ConfigError, match="not divisible"):
        batch_arithmetic(
            TrainConfig(micro_batch_size=4, grad_accum_steps=None, global_batch_size=30), 2
        )
    with pytest.raises(ConfigError, match="disagree"):
        batch_arithmetic(
            TrainConfig(micro_batch_size=4, grad_accum_steps=2, global_batch_size=32), 1
        )


def test_launcher_environments() -> None:
    values, launcher = resolve_env({})
    assert launcher == "single" and values["RANK"] == "0" and values["WORLD_SIZE"] == "1"
    torchrun = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "1",
    }
    assert resolve_env(torchrun) == (torchrun, "torchrun")
    slurm = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[012-013]",
        "SLURM_JOB_ID": "4242",
    }
    values, launcher = resolve_env(slurm)
    assert launcher == "slurm"
    assert (values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]) == ("5", "8", "1")
    assert values["MASTER_ADDR"] == "gpu012" and values["MASTER_PORT"] == "24242"


@pytest.mark.parametrize(
    "nodelist, host",
    [("node1", "node1"), ("gpu[012-015,020]", "gpu012"), ("a[3,5],b7", "a3"), ("x-1,y-2", "x-1")],
)
def test_first_slurm_host(nodelist: str, host: str, monkeypatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert first_slurm_host(nodelist) == host
