"""A released two-tower model: one folder, safetensors only, that rebuilds the model.

    release/
        backbone/                  the frozen context tower (HF save_pretrained, safetensors)
        denoiser.safetensors       every trainable weight (the denoiser tower)
        twotower_config.json       TwoTowerModel.from_backbone arguments + format version
        tokenizer files            (tokenizer.json, tokenizer_config.json, ...)

`load_release(path)` reads it back without pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from twotower_train.model import TwoTowerModel

FORMAT_VERSION = 1
CONFIG_FILE = "twotower_config.json"
DENOISER_FILE = "denoiser.safetensors"


def save_release(model: TwoTowerModel, tokenizer, out_dir: Path, dtype=None) -> Path:
    """Write `model` (and its tokenizer) into `out_dir` (replaced if it exists)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous()
        for k, v in model.denoiser.state_dict().items()
    }
    # Tied weights are stored once per name by safetensors only if they are distinct tensors.
    save_file({k: v.clone() for k, v in state.items()}, str(out_dir / DENOISER_FILE))
    model.backbone.save_pretrained(out_dir / "backbone", safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    config = {"format_version": FORMAT_VERSION, **model.config.to_dict()}
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out_dir


def load_release(path: str | Path, dtype: torch.dtype = torch.float32):
    """(TwoTowerModel, tokenizer) from a folder written by `save_release`."""
    path = Path(path)
    for needed in (CONFIG_FILE, DENOISER_FILE, "backbone/config.json"):
        if not (path / needed).is_file():
            raise FileNotFoundError(f"{path} is not a two-tower release: {needed} is missing")
    config = json.loads((path / CONFIG_FILE).read_text())
    if config.pop("format_version", None) != FORMAT_VERSION:
        raise ValueError(f"{path / CONFIG_FILE}: unsupported format version")
    backbone = AutoModelForCausalLM.from_pretrained(path / "backbone", dtype=dtype)
    context_dtype = config.pop("context_dtype", None)
    model = TwoTowerModel.from_backbone(
        backbone,
        **config,
        context_dtype=getattr(torch, context_dtype) if context_dtype else None,
    )
    try:
        state = load_file(str(path / DENOISER_FILE))
    except Exception as exc:
        raise ValueError(f"{path / DENOISER_FILE} is corrupt: {exc}") from None
    model.denoiser.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer
