"""The Hydra-style command line: --help, --info, --cfg job|all [--resolve], -m sweeps."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from conftest import TINY, run_cli


def test_help_lists_groups_options_and_recipes() -> None:
    proc = run_cli(["--help"])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("usage: python -m twotower_train")
    assert "  diffusion: " in out and "mdlm" in out and "  deepspeed: " in out
    assert "  tiny_full " in out and "  tiny_nemotron_h " in out
    assert "recipe" not in [line.split(":")[0].strip() for line in out.splitlines()]


def test_info_prints_the_search_paths(tmp_path: Path) -> None:
    from twotower_train.config import CONF_DIR, RECIPES_DIR

    proc = run_cli(["--info"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("twotower_train ") and lines[0].endswith(str(CONF_DIR.parent))
    assert f"  {CONF_DIR}  [shipped]" in lines and f"  {RECIPES_DIR}  [shipped]" in lines
    mine, gone = tmp_path / "recipes", tmp_path / "gone"
    mine.mkdir()
    proc = run_cli(
        ["--info"], TWOTOWER_RECIPE_PATH=f"{mine}{os.pathsep}{gone}", TWOTOWER_CONFIG_PATH=""
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    at = lines.index(f"  {mine}  [TWOTOWER_RECIPE_PATH]")
    assert lines[at + 1 : at + 3] == [
        f"  {gone} (not a folder)  [TWOTOWER_RECIPE_PATH]",
        f"  {RECIPES_DIR}  [shipped]",
    ]


def test_help_lists_the_users_recipes_and_options(tmp_path: Path) -> None:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mine.yaml").write_text("# @package _global_\n# My recipe.\n")
    (tmp_path / "conf" / "backbone").mkdir(parents=True)
    (tmp_path / "conf" / "backbone" / "my_model.yaml").write_text("# @package backbone\n")
    env = {
        "TWOTOWER_RECIPE_PATH": str(tmp_path / "recipes"),
        "TWOTOWER_CONFIG_PATH": str(tmp_path / "conf"),
    }
    proc = run_cli(["--help"], **env)
    assert proc.returncode == 0, proc.stderr
    assert "  backbone: my_model, tiny_llama, tiny_nemotron_h" in proc.stdout.splitlines()
    mine = next(ln for ln in proc.stdout.splitlines() if ln.startswith("  mine "))
    assert mine.split()[1:] == ["My", "recipe.", f"({tmp_path / 'recipes' / 'mine.yaml'})"]
    missing = run_cli(["--help"], TWOTOWER_CONFIG_PATH=str(tmp_path / "nope"))
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"twotower_train: error: TWOTOWER_CONFIG_PATH: {tmp_path / 'nope'} is not a folder"
    ]


def test_recipe_path_from_the_command_line(tmp_path: Path) -> None:
    from twotower_train.config import RECIPES_DIR

    (tmp_path / "mine.yaml").write_text((RECIPES_DIR / "tiny_full.yaml").read_text())
    proc = run_cli(["--cfg", "job", f"recipe={tmp_path / 'mine.yaml'}"])
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert (cfg["recipe"], cfg["run"]["dir"], cfg["train"]["steps"]) == ("mine", "runs/mine", 3000)
    for value, message in [
        ("nope", "unknown recipe 'nope' (known: llama_3_2_1b, "),
        (str(tmp_path / "gone.yaml"), f"recipe file not found: {tmp_path / 'gone.yaml'}"),
    ]:
        proc = run_cli([f"recipe={value}", f"run.dir={tmp_path / 'run'}"])
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
        assert not (tmp_path / "run").exists()


def test_cfg_job_prints_the_composed_validated_config() -> None:
    proc = run_cli(["recipe=tiny_full", "--cfg", "job", "train.steps=7"])
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["recipe"] == "tiny_full" and cfg["train"]["steps"] == 7
    assert cfg["data"]["seq_len"] == 128 and "hydra" not in cfg
    resolved = run_cli(["recipe=tiny_full", "--cfg=job", "--resolve"])
    assert resolved.returncode == 0 and yaml.safe_load(resolved.stdout)["train"]["steps"] == 3000
    full = run_cli(["--cfg", "all"])
    assert full.returncode == 0, full.stderr
    both = yaml.safe_load(full.stdout)
    assert both["recipe"] == "tiny" and "run" in both["hydra"] and "sweep" in both["hydra"]


def test_cli_errors_are_one_line() -> None:
    for args, message in [
        (["--cfg", "job", "train.nope=1"], "unknown config key 'train.nope'"),
        (["--cfg", "yaml"], "--cfg takes job or all"),
        (["--resolve"], "--resolve goes with --cfg"),
        (["train"], "arguments must be key=value overrides or flags"),
        (["-m", "train.steps=[1"], "bad sweep override"),
    ]:
        proc = run_cli(args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, lines)


def test_a_run_that_cannot_start_writes_nothing(tmp_path: Path) -> None:
    """A backbone or data that fails to load: one line, exit 2, no run folder left behind."""
    for override in ["backbone.name_or_path=/nonexistent/model", "data.source=jsonl"]:
        run_dir = tmp_path / override.split("=")[0]
        proc = run_cli([override, f"run.dir={run_dir}"])
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith("twotower_train: error: ")
        assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())


def test_multirun_sweeps_each_job_in_its_own_dir(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    proc = run_cli(["-m", *TINY, "train.steps=1,2", f"run.dir={root}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for n, steps in enumerate([1, 2]):
        cfg = yaml.safe_load((root / str(n) / "config.yaml").read_text())
        assert cfg["train"]["steps"] == steps and cfg["run"]["dir"] == str(root / str(n))
        assert (root / str(n) / "metrics.jsonl").is_file()
    record = yaml.safe_load((root / "multirun.yaml").read_text())
    assert [j["returncode"] for j in record["jobs"]] == [0, 0]
    # a sweep with one invalid job is refused before any job runs
    bad = tmp_path / "bad"
    proc = run_cli(["-m", *TINY, "train.steps=1,0", f"run.dir={bad}"])
    assert proc.returncode == 2 and "train.steps must be > 0" in proc.stderr
    assert not bad.exists()
