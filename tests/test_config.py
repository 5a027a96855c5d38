"""Every recipe composes; recipes by name or path and the search paths; bad input is
refused in one line before any work."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

from twotower_train.config import (
    CONF_DIR,
    RECIPES_DIR,
    Config,
    ConfigError,
    TrainConfig,
    batch_arithmetic,
    compose,
    config_dirs,
    known_recipes,
    recipe_dirs,
    resolve_recipe,
)
from twotower_train.engine.distributed import first_slurm_host, resolve_env

RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


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
        ("recipe=missing/mine.yaml", "recipe file not found: missing/mine.yaml"),
        ("eval.device=gpu", "eval.device 'gpu' is not one of cpu, cuda"),
        ("eval.dtype=fp16", "eval.dtype"),
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


# -- recipes by name or path, and the search paths ---------------------------------------------


@pytest.fixture
def no_search_env(monkeypatch) -> None:
    monkeypatch.delenv("TWOTOWER_RECIPE_PATH", raising=False)
    monkeypatch.delenv("TWOTOWER_CONFIG_PATH", raising=False)


@pytest.mark.usefixtures("no_search_env")
def test_configs_and_recipes_ship_inside_the_package() -> None:
    import twotower_train

    package = Path(twotower_train.__file__).parent
    assert package / "conf" == CONF_DIR and (CONF_DIR / "config.yaml").is_file()
    assert package / "recipes" == RECIPES_DIR and (RECIPES_DIR / "tiny.yaml").is_file()
    assert config_dirs() == [CONF_DIR] and recipe_dirs() == [RECIPES_DIR]
    assert list(known_recipes()) == RECIPES
    assert resolve_recipe("tiny") == ("tiny", RECIPES_DIR / "tiny.yaml")


@pytest.mark.usefixtures("no_search_env")
def test_recipe_as_a_yaml_path(tmp_path: Path, monkeypatch) -> None:
    mine = tmp_path / "mine.yaml"
    text = (RECIPES_DIR / "tiny_backbone.yaml").read_text()  # with an `override /optim`
    mine.write_text(text.replace("steps: 3000", "steps: 7"))
    cfg = compose([f"recipe={mine}"])
    assert (cfg.recipe, cfg.train.steps, cfg.run.dir) == ("mine", 7, "runs/mine")
    assert cfg.optim.schedule.value == "wsd"  # the recipe's defaults list applied
    monkeypatch.chdir(tmp_path)  # relative to the working directory; .yml too
    shutil.copy(mine, tmp_path / "other.yml")
    assert compose(["recipe=mine.yaml"]).train.steps == 7
    assert compose(["recipe=./other.yml"]).recipe == "other"
    # a recipe file named like a shipped recipe is still the file
    shutil.copy(mine, tmp_path / "tiny.yaml")
    assert compose(["recipe=tiny.yaml"]).train.steps == 7
    assert compose(["recipe=tiny"]).train.steps == 150


def test_recipe_path_env_is_searched_before_the_shipped_recipes(
    tmp_path: Path, monkeypatch
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, steps in ((first, 11), (second, 22)):
        folder.mkdir()
        text = (RECIPES_DIR / "tiny.yaml").read_text().replace("steps: 150", f"steps: {steps}")
        (folder / "tiny.yaml").write_text(text)
        (folder / f"only_{folder.name}.yaml").write_text(text)
    monkeypatch.setenv("TWOTOWER_RECIPE_PATH", f"{first}{os.pathsep}{second}")
    monkeypatch.delenv("TWOTOWER_CONFIG_PATH", raising=False)
    assert recipe_dirs() == [first, second, RECIPES_DIR]
    assert compose([]).train.steps == 11  # the default recipe's name is looked up too
    assert compose(["recipe=only_second"]).train.steps == 22
    assert known_recipes()["tiny"] == first / "tiny.yaml"
    assert {"only_first", "only_second", "tiny_full"} <= set(known_recipes())


def test_config_path_env_adds_and_replaces_group_options(tmp_path: Path, monkeypatch) -> None:
    conf = tmp_path / "conf"
    (conf / "backbone").mkdir(parents=True)
    (conf / "denoiser").mkdir()
    (conf / "backbone" / "mine.yaml").write_text(
        "# @package backbone\nname_or_path: /models/mine\nrevision: v2\n"
    )
    (conf / "denoiser" / "top3.yaml").write_text("# @package denoiser\nlayers: 2\n")
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "on_mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /backbone: mine\ntrain:\n  steps: 5\n"
    )
    monkeypatch.setenv("TWOTOWER_CONFIG_PATH", str(conf))
    monkeypatch.setenv("TWOTOWER_RECIPE_PATH", str(recipes))
    assert config_dirs() == [conf, CONF_DIR]
    assert compose(["backbone=mine"]).backbone.revision == "v2"  # (the recipe sets the name)
    assert compose(["denoiser=top3"]).denoiser.layers == 2  # the user's option comes first
    assert compose(["denoiser=full"]).denoiser.layers is None  # shipped options still there
    cfg = compose(["recipe=on_mine"])  # a user recipe picking a user option
    assert (cfg.backbone.name_or_path, cfg.backbone.revision, cfg.train.steps) == (
        "/models/mine",
        "v2",
        5,
    )


def test_search_path_and_recipe_errors_are_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("TWOTOWER_CONFIG_PATH", raising=False)
    monkeypatch.setenv("TWOTOWER_RECIPE_PATH", str(tmp_path / "nope"))
    with pytest.raises(ConfigError) as err:
        compose([])
    assert str(err.value) == f"TWOTOWER_RECIPE_PATH: {tmp_path / 'nope'} is not a folder"
    monkeypatch.delenv("TWOTOWER_RECIPE_PATH")
    monkeypatch.setenv("TWOTOWER_CONFIG_PATH", f"{tmp_path}{os.pathsep}{tmp_path / 'gone'}")
    with pytest.raises(ConfigError, match=r"^TWOTOWER_CONFIG_PATH: .*gone is not a folder$"):
        compose([])
    monkeypatch.delenv("TWOTOWER_CONFIG_PATH")
    cases = {
        "recipe=nope": "unknown recipe 'nope' (known: llama_3_2_1b, ",
        f"recipe={tmp_path / 'absent.yaml'}": f"recipe file not found: {tmp_path / 'absent.yaml'}",
    }
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [steps\n")
    cases[f"recipe={bad}"] = f"recipe {bad}: "
    listed = tmp_path / "listed.yaml"
    listed.write_text("- a\n- b\n")
    cases[f"recipe={listed}"] = "expected a mapping of keys"
    for override, message in cases.items():
        with pytest.raises(ConfigError) as err:
            compose([override])
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    unknown = str(pytest.raises(ConfigError, compose, ["recipe=nope"]).value)
    assert unknown.endswith("tiny_nemotron_h; or recipe=PATH.yaml)")
