"""Checkpoints: save every N steps, keep the last k, resume automatically.

Layout of `run.dir/checkpoints/`:

    step_00000100/          DeepSpeed's files (model, ZeRO optimizer shards, scheduler)
        trainer_state.json  step, data position, world size (written by rank 0)
        rng_rank00000.pt    each rank's RNG states
        COMPLETE            written last, after every rank finished
    latest                  the tag of the newest COMPLETE checkpoint (atomic replace)

A crash during a save leaves a folder without COMPLETE that `latest` never
points to; the next save of that step removes it.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twotower_train.engine.distributed import DistEnv, barrier
from twotower_train.errors import TwoTowerError, first_line
from twotower_train.files import atomic_write_text

LATEST = "latest"
COMPLETE = "COMPLETE"
STATE = "trainer_state.json"


class CheckpointError(TwoTowerError, RuntimeError):
    """A checkpoint that cannot be resumed from; the message is one line."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class CheckpointManager:
    root: Path
    env: DistEnv
    keep_last: int = 2

    def latest_tag(self) -> str | None:
        """Tag of the newest complete checkpoint, or None when there is none."""
        latest = self.root / LATEST
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        if not (self.root / tag / COMPLETE).is_file():
            raise CheckpointError(
                f"{latest} points to '{tag}', which is missing or incomplete "
                f"(delete {self.root} to start over)"
            )
        return tag

    def save(self, engine, step: int, trainer_state: dict[str, Any]) -> Path:
        tag = tag_for(step)
        path = self.root / tag
        if self.env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if path.exists():  # leftover of a crashed save of this step
                shutil.rmtree(path)
        barrier()
        engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        torch.save(rng_state(), path / f"rng_rank{self.env.rank:05d}.pt")
        barrier()
        if self.env.is_main:
            state = {**trainer_state, "step": step, "world_size": self.env.world_size}
            atomic_write_text(path / STATE, json.dumps(state, indent=2))
            atomic_write_text(path / COMPLETE, "")
            atomic_write_text(self.root / LATEST, tag)
            self._prune(keep=tag)
        barrier()
        return path

    def _prune(self, keep: str) -> None:
        tags = sorted(p.name for p in self.root.glob("step_*") if p.is_dir())
        complete = [t for t in tags if (self.root / t / COMPLETE).is_file()]
        doomed = complete[: max(0, len(complete) - self.keep_last)]
        doomed += [t for t in tags if t not in complete and t != keep]
        for t in doomed:
            if t != keep:
                shutil.rmtree(self.root / t, ignore_errors=True)

    def load(self, engine, tag: str) -> dict[str, Any]:
        """Restore engine, optimizer, scheduler and this rank's RNG; return trainer state."""
        path = self.root / tag
        try:
            state = json.loads((path / STATE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"checkpoint {path} is corrupt: {STATE}: {exc}") from None
        if state.get("world_size") != self.env.world_size:
            raise CheckpointError(
                f"checkpoint {path} was written by {state.get('world_size')} ranks but this run "
                f"has {self.env.world_size}; resume with the same world size, or start a new "
                f"run.dir from a consolidated model"
            )
        try:
            load_path, _ = engine.load_checkpoint(str(self.root), tag=tag)
        except Exception as exc:
            raise CheckpointError(f"checkpoint {path} is corrupt: {first_line(exc)}") from None
        if load_path is None:
            raise CheckpointError(f"checkpoint {path} is corrupt: DeepSpeed found no model states")
        rng_file = path / f"rng_rank{self.env.rank:05d}.pt"
        try:
            set_rng_state(torch.load(rng_file, weights_only=False))
        except Exception as exc:
            raise CheckpointError(f"checkpoint {path} is corrupt: {rng_file.name}: {exc}") from None
        return state


def consolidated_state(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """The module's fp32 weights of checkpoint ``root/tag`` on one process, whatever the
    ZeRO stage and the number of ranks that wrote it (ZeRO 1-3: DeepSpeed's ``zero_to_fp32``
    merge of the partitions; ZeRO 0: rank 0's module states)."""
    path = Path(root) / tag
    try:
        if any(path.glob("*optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
        # our own checkpoint (trusted): DeepSpeed's ZeRO-0 model states
        states = torch.load(
            path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
        )
        # (not a tensor: a module's extra state, e.g. Transformer Engine's FP8 metadata)
        return {k: v.float() for k, v in states["module"].items() if torch.is_tensor(v)}
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: {first_line(exc)}") from None
