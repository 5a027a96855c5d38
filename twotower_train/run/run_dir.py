"""A run folder's lifecycle: what a rerun in an existing ``run.dir`` may do.

``prepare_run_dir`` runs before anything is built or written. When the folder already holds
a run (``config.yaml``, checkpoints, metrics):

* ``run.resume=auto`` (default): resume from its latest checkpoint if every key that changes
  training is as the saved ``config.yaml`` has it; otherwise refuse, in one line that lists
  the keys and the ways to go on. A folder with no checkpoint starts over (its files are
  moved aside, never deleted).
* ``run.resume=changed``: resume even though training keys changed; the old config is kept
  as ``config.before_<time>.yaml``.
* ``run.resume=restart``: start over; the old run moves to ``previous/<time>/``.

Keys that do not change what is trained (logging, evaluation, export, checkpoint and log
intervals, Slurm, time limits) may change on any rerun.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from twotower_train.config import Config, ConfigError, ResumeMode
from twotower_train.console import info
from twotower_train.files import atomic_write_text

CONFIG_FILE = "config.yaml"
# What a run folder holds; moved aside together when a run starts over.
RUN_FILES = (CONFIG_FILE, "metrics.jsonl", "checkpoints", "eval", "release", "hf", "wandb_id.txt")
# Keys (or sections, ending in ".") that do not change the trained weights.
NOT_TRAINING = (
    "recipe",
    "mode",
    "run.dir",
    "run.resume",
    "run.dist_timeout_s",
    "logger.",
    "eval.",
    "export.",
    "plan.",
    "slurm.",
    "data.cache_dir",
    "data.val_sequences",
    "train.log_every",
    "train.eval_every",
    "train.eval_at_end",
    "train.ckpt_every",
    "train.keep_last",
    "train.time_limit_s",
    "train.stop_after",
    "train.peak_tflops",
    "train.lm_head",
    "train.lm_head_chunk",
)


@dataclass
class RunFolder:
    """The decision of ``prepare_run_dir``; ``commit`` carries it out (rank 0, once the run
    has been built: a run that cannot start changes nothing)."""

    path: Path
    resume: bool  # the folder's checkpoints are this run's
    move_aside: bool  # the old run is kept under previous/<time>/
    keep_old_config: bool

    def commit(self, config_yaml: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if self.move_aside:
            dest = self.path / "previous" / stamp
            dest.mkdir(parents=True, exist_ok=True)
            for name in RUN_FILES:
                if (self.path / name).exists():
                    shutil.move(str(self.path / name), str(dest / name))
            info(f"the previous run in {self.path} moved to {dest}")
        elif self.keep_old_config and (self.path / CONFIG_FILE).is_file():
            shutil.copy(self.path / CONFIG_FILE, self.path / f"config.before_{stamp}.yaml")
        atomic_write_text(self.path / CONFIG_FILE, config_yaml)


def flat(node, prefix: str = "") -> dict[str, object]:
    """``{"a.b.c": value}`` of a nested dict (lists compared whole)."""
    out: dict[str, object] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, name + "."))
        else:
            out[name] = value
    return out


def training_changes(saved: dict, cfg: Config) -> list[str]:
    """The keys that change training whose values differ between a saved config and ``cfg``:
    ``["optim.lr (0.001 -> 0.002)", ...]``."""
    now = flat(OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True))
    old = flat(saved)
    changes = []
    for key in sorted(set(now) | set(old)):
        if key.startswith(NOT_TRAINING) or key in NOT_TRAINING:
            continue
        a, b = old.get(key, "<unset>"), now.get(key, "<unset>")
        if a != b:
            changes.append(f"{key} ({a} -> {b})")
    return changes


def _has_checkpoint(path: Path) -> bool:
    return (path / "checkpoints" / "latest").is_file()


def _holds_a_run(path: Path) -> bool:
    return any((path / name).exists() for name in RUN_FILES)


def prepare_run_dir(cfg: Config, path: Path) -> RunFolder:
    """Decide what this run does with ``path`` (see the module docstring); raises
    ``ConfigError`` when a rerun would resume with different training settings."""
    mode = cfg.run.resume
    if not _holds_a_run(path):
        return RunFolder(path, resume=False, move_aside=False, keep_old_config=False)
    if mode == ResumeMode.restart or not _has_checkpoint(path):
        return RunFolder(path, resume=False, move_aside=True, keep_old_config=False)
    saved_file = path / CONFIG_FILE
    if mode == ResumeMode.changed or not saved_file.is_file():
        return RunFolder(path, resume=True, move_aside=False, keep_old_config=True)
    try:
        saved = yaml.safe_load(saved_file.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{saved_file} is not YAML ({exc.__class__.__name__})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{saved_file} is not a config (a YAML mapping)")
    changes = training_changes(saved, cfg)
    if changes:
        shown = ", ".join(changes[:8]) + (
            f" and {len(changes) - 8} more" if len(changes) > 8 else ""
        )
        raise ConfigError(
            f"{path} holds a run trained with other settings: {shown}; resume it anyway with "
            "run.resume=changed, start over with run.resume=restart (the old run is kept), "
            "or choose another run.dir"
        )
    return RunFolder(path, resume=True, move_aside=False, keep_old_config=False)
