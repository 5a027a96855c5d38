"""Shared helpers: run the CLI as a subprocess, read metrics, tiny overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A random ~0.2M-parameter Llama (AR objective) on 32-token sequences: fast engine tests.
TINY = [
    "recipe=tiny",
    "train.objective=ar",
    "backbone.name_or_path=tiny_scratch",
    "backbone.init=scratch",
    "+backbone.config.model_type=llama",
    "+backbone.config.hidden_size=32",
    "+backbone.config.num_hidden_layers=2",
    "+backbone.config.num_attention_heads=4",
    "+backbone.config.num_key_value_heads=2",
    "+backbone.config.intermediate_size=64",
    "data.seq_len=32",
    "data.val_sequences=8",
    "train.micro_batch_size=4",
    "train.eval_at_end=false",
    "optim.warmup_steps=2",
]

# A two-tower run of the TINY model under ZeRO-3, 3 steps, every step logged, no release.
TINY_TWO_TOWER_ZERO3 = [
    *TINY,
    "train.objective=twotower",
    "denoiser.block_size=8",
    "precision=fp32",
    "deepspeed=zero3",
    "train.steps=3",
    "train.log_every=1",
    "export.release=false",
]

# The shipped (pretrained) tiny Llama as a two-tower run under ZeRO-3, fp32, 32-token rows:
# runs that must start from the same weights however they are built.
SHIPPED_TWO_TOWER_ZERO3 = [
    "recipe=tiny",
    "precision=fp32",
    "deepspeed=zero3",
    "data.seq_len=32",
    "data.val_sequences=8",
    "train.micro_batch_size=2",
    "train.eval_at_end=false",
    "denoiser.block_size=8",
    "eval.tasks=[]",
    "export.release=false",
]


def subprocess_env(**extra: str) -> dict[str, str]:
    # no SLURM_*: tests run inside a Slurm job must not requeue it (tests/test_slurm.py fakes it)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        and not k.startswith("SLURM_")
    }
    env.update(PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", **extra)
    return env


def run_cli(args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "twotower_train", *args],
        cwd=REPO,
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_torchrun(
    nproc: int, args: list[str], timeout: float = 400, script: str | None = None
) -> subprocess.CompletedProcess:
    """``torchrun`` of ``python -m twotower_train ARGS`` (or of the file ``script``)."""
    target = [script] if script else ["-m", "twotower_train"]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--standalone",
            *target,
            *args,
        ],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture(autouse=True)
def _restore_torch_linear():
    """An in-process ZeRO-3 engine swaps ``torch.nn.functional.linear`` for DeepSpeed's
    memory-efficient version and leaves it so ("persists unless manually reset"); later tests
    in the same process must see torch's own."""
    import torch

    original = torch.nn.functional.linear
    yield
    torch.nn.functional.linear = original


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add sync overhead, and stall on a busy 2-core box.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_args(tmp_path: Path) -> list[str]:
    return [*TINY, f"run.dir={tmp_path / 'run'}"]


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests need CUDA: skipped (with the reason) where there is none."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (CUDA)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
