"""The package as a user installs it: a plain (non-editable) wheel holds the Hydra configs
and the recipes, installs into a fresh virtual environment, and trains from a folder outside
the checkout, by recipe name and by recipe file. (The search paths themselves:
tests/test_config.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO, subprocess_env

pytestmark = pytest.mark.slow

# A two-step run of the shipped tiny Llama on a small jsonl corpus (the shipped
# conf/data/jsonl_example.yaml, whose token cache is made in the test's folder), no evaluation,
# no release.
SMALL = [
    "data=jsonl_example",
    "data.seq_len=32",
    "data.val_sequences=2",
    "train.micro_batch_size=2",
    "train.log_every=1",
    "train.eval_at_end=false",
    "export.release=false",
    "eval.tasks=[]",
]


def _source_tree(dst: Path) -> None:
    """The checkout's files as a fresh clone (plus uncommitted work) would have them: no build
    leftovers, caches or run folders, which an in-place build would pick up."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file() and not rel.startswith(("tests/", "docs/")):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def _env() -> dict[str, str]:
    # no PYTHONPATH: the venv's own copy must be the one imported
    env = subprocess_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    env.pop("PYTHONPATH")
    env.pop("TWOTOWER_RECIPE_PATH", None)
    env.pop("TWOTOWER_CONFIG_PATH", None)
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    assert not tmp_path.is_relative_to(REPO)
    src, dist, venv, work = (tmp_path / d for d in ("src", "dist", "venv", "work"))
    _source_tree(src)
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
        + ["-q", "-w", str(dist), "."],
        cwd=src,
    )
    (wheel,) = dist.glob("twotower_train-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for data in (
        "twotower_train/conf/config.yaml",
        "twotower_train/conf/denoiser/top3.yaml",
        "twotower_train/conf/hydra/launcher/slurm.yaml",
        "twotower_train/recipes/tiny.yaml",
        "twotower_train-lm_eval.pth",
    ):
        assert data in names, data

    # A fresh environment that sees this machine's packages (torch, ...) but not the
    # checkout; the wheel alone, from the file (no network, no dependencies).
    _run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
        tmp_path,
    )
    python = str(venv / ("Scripts" if os.name == "nt" else "bin") / "python")
    _run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed"]
        + [str(wheel)],
        cwd=tmp_path,
    )
    work.mkdir()
    where = _run([python, "-c", "import twotower_train; print(twotower_train.__file__)"], work)
    package = Path(where.stdout.strip()).parent
    assert package.is_relative_to(venv) and not package.is_relative_to(REPO), package
    info = _run([python, "-m", "twotower_train", "--info"], work).stdout
    assert f"  {package / 'conf'}  [shipped]" in info.splitlines()
    assert f"  {package / 'recipes'}  [shipped]" in info.splitlines()

    corpus = work / "corpus.jsonl"
    docs = [f"add {a} {b} = {a + b}" for a in range(20) for b in range(20)]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    data = [f"data.sources.0.path={corpus}", f"data.cache_dir={work / 'cache'}"]
    _run(
        [python, "-m", "twotower_train", "recipe=tiny", "train.steps=2", *SMALL, *data]
        + ["run.dir=by_name"],
        work,
    )
    cfg = yaml.safe_load((work / "by_name" / "config.yaml").read_text())
    assert cfg["recipe"] == "tiny" and cfg["train"]["steps"] == 2
    metrics = [
        json.loads(ln) for ln in (work / "by_name" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in metrics if "loss" in r] == [1, 2]

    # A recipe copied out of the installed package and edited, picked by its path.
    mine = work / "recipes" / "mine.yaml"
    mine.parent.mkdir()
    mine.write_text(
        (package / "recipes" / "tiny.yaml").read_text().replace("steps: 150", "steps: 1")
    )
    _run([python, "-m", "twotower_train", "recipe=recipes/mine.yaml", *SMALL, *data], work)
    cfg = yaml.safe_load((work / "runs" / "mine" / "config.yaml").read_text())
    assert (cfg["recipe"], cfg["train"]["steps"]) == ("mine", 1)
    assert (work / "runs" / "mine" / "metrics.jsonl").is_file()
