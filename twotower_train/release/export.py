"""A released two-tower model: one folder, safetensors only, that rebuilds the model.

    release/
        README.md                  the model card (what, backbone, training, results, usage)
        backbone/                  the frozen context tower (HF save_pretrained, safetensors);
                                   absent from a reference-only release
        denoiser.safetensors       every trainable weight (the denoiser tower); past
                                   ``max_shard_size``: denoiser-0000i-of-0000n.safetensors
                                   + denoiser.safetensors.index.json (HF's sharding layout)
        config.json                model_type "twotower", the TwoTowerConfig, format version,
                                   decoding defaults, the backbone reference (name, revision,
                                   sha256 of each weight file, bundled or not)
        retained_vs_tokens_per_forward.png   the harness's plot, when the run evaluated
        tokenizer files            (tokenizer.json, tokenizer_config.json, ...)

Weights are stored in bf16 unless fp32 is asked for. `TwoTowerModel.from_release(path)` (``model/pretrained.py``) and
`backbones.load_release(path)` read it back without pickle; a reference-only release
finds its backbone (a local folder, the shipped name, or the hub) and refuses one whose
sha256 differs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from twotower_train.console import info
from twotower_train.decoding import DecodeConfig
from twotower_train.errors import first_line
from twotower_train.model import TwoTowerModel
from twotower_train.model.pretrained import (
    CONFIG_FILE,
    DENOISER_INDEX,
    FORMAT_VERSION,
    MODEL_TYPE,
    ReleaseError,
    find_backbone,
    weight_hashes,
)
from twotower_train.release.model_card import model_card

BACKBONE_MODES = ("bundle", "reference")


def save_release(
    model: TwoTowerModel,
    tokenizer,
    out_dir: Path,
    dtype: torch.dtype | None = torch.bfloat16,
    run_info: dict | None = None,
    backbone: str = "bundle",
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write ``model`` (and its tokenizer) into ``out_dir``, replacing a release there.

    Written into a sibling temporary folder first and renamed into place, so an
    interrupted export never leaves a half-written release. ``dtype`` casts the stored
    weights (bf16 by default; fp32 or None = as they are). ``backbone``: ``"bundle"``
    stores the frozen backbone in ``backbone/`` (self-contained); ``"reference"`` stores
    only its name, revision and the sha256 of its weight files, which must be on disk (a
    local folder, a shipped name, or the hub cache). ``max_shard_size`` (bytes or e.g.
    ``"5GB"``) splits larger weights into shards. ``run_info`` (from a training run:
    ``backbone``, ``revision``, ``config``, ``report``, ``plot``, ``wandb_url``) feeds the
    backbone reference and the model card."""
    if backbone not in BACKBONE_MODES:
        raise ReleaseError(f"backbone must be one of {BACKBONE_MODES}, got {backbone!r}")
    max_shard_size = shard_bytes(max_shard_size)
    out_dir = Path(out_dir)
    run_info = run_info or {}
    name = run_info.get("backbone") or model.backbone.config.name_or_path or None
    revision = run_info.get("revision")
    if backbone == "reference":
        source, revision = _reference_source(name, revision)  # before anything is written
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    # safetensors refuses tensors that share memory (a tied head): store each name apart.
    state = {k: v.clone() for k, v in cast_state(model.denoiser.state_dict(), dtype).items()}
    _save_sharded(state, tmp, max_shard_size)
    if backbone == "bundle":
        model.backbone.save_pretrained(
            tmp / "backbone",
            state_dict=cast_state(model.backbone.state_dict(), dtype),
            safe_serialization=True,
            max_shard_size=max_shard_size,
        )
        hashes = weight_hashes(tmp / "backbone")
    else:
        hashes = weight_hashes(source)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    reference = {
        "name_or_path": name,
        "revision": revision,
        "bundled": backbone == "bundle",
        "sha256": hashes,
    }
    config = {
        "architectures": ["TwoTowerModel"],
        "model_type": MODEL_TYPE,
        "library_name": "twotower_train",
        "format_version": FORMAT_VERSION,
        **model.config.to_dict(),
        "dtype": str(dtype or model.backbone.dtype).removeprefix("torch."),
        "decoding": _decoding_defaults(run_info),
        "backbone": reference,
    }
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    if run_info.get("plot") and Path(run_info["plot"]).is_file():
        shutil.copy(run_info["plot"], tmp / Path(run_info["plot"]).name)
    (tmp / "README.md").write_text(model_card(model, reference, run_info))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def save_hf_model(model, tokenizer, out_dir: Path, dtype: torch.dtype | None = None) -> Path:
    """A trained AR backbone as a Hugging Face folder (safetensors + tokenizer), written
    beside ``out_dir`` and renamed into place (never half-written)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(
        tmp, state_dict=cast_state(model.state_dict(), dtype), safe_serialization=True
    )
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def shard_bytes(size: int | str) -> int:
    """``max_shard_size`` in bytes: an int, digits, or a size such as ``"5GB"``/``"200KB"``."""
    from huggingface_hub.serialization._base import parse_size_to_int

    if isinstance(size, int) or str(size).isdigit():
        return int(size)
    try:
        return parse_size_to_int(str(size))
    except ValueError:
        raise ReleaseError(
            f"max_shard_size {size!r} is not a size (bytes, or e.g. '5GB', '500MB')"
        ) from None


def cast_state(state: dict, dtype: torch.dtype | None) -> dict:
    """``state`` on CPU in ``dtype``, contiguous; tensors that shared memory still do."""
    memo: dict = {}
    out = {}
    for k, v in state.items():
        key = (v.data_ptr(), tuple(v.shape), v.dtype)
        if key not in memo:
            memo[key] = (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous()
        out[k] = memo[key]
    return out


def _save_sharded(state: dict, folder: Path, max_shard_size: int | str) -> None:
    """The denoiser's weights as one file, or as shards and HF's index past the size."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(
        state, filename_pattern="denoiser{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for file, names in split.filename_to_tensors.items():
        save_file({k: state[k] for k in names}, str(folder / file), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": split.metadata["total_size"]}}
        index["weight_map"] = split.tensor_to_filename
        (folder / DENOISER_INDEX).write_text(json.dumps(index, indent=2))


def _reference_source(name: str | None, revision: str | None) -> tuple[Path, str | None]:
    """The folder holding the backbone's weight files for a reference-only release, and
    the revision to pin (a hub snapshot's commit when none was given)."""
    if not name:
        raise ReleaseError(
            "a reference-only release needs a backbone loaded from a folder or the hub "
            "(this one was built in memory); bundle it instead (export.backbone=bundle)"
        )
    folder, revision = find_backbone(name, revision, download=False)
    if not list(folder.glob("*.safetensors")):
        raise ReleaseError(
            f"backbone {name!r} has no safetensors weight files in {folder} to reference; "
            "bundle it instead (export.backbone=bundle)"
        )
    return folder, revision


def _decoding_defaults(run_info: dict) -> dict:
    """The decoding settings the run evaluated with (``DecodeConfig``'s defaults otherwise)."""
    default = DecodeConfig()
    evaluated = (run_info.get("config") or {}).get("eval") or {}
    keys = (
        "threshold",
        "order",
        "score",
        "adjacent_threshold",
        "steps_per_block",
        "max_new_tokens",
    )
    return {k: evaluated.get(k, getattr(default, k)) for k in keys}


def publish(folder: Path, cfg, api=None) -> str | None:
    """Upload a finished release (or HF folder) to the hub repo ``cfg.push_to_hub`` (an
    ``ExportConfig``), creating it (private unless ``cfg.hub_private`` is false); None when
    no repo is set. ``api`` stands in for ``huggingface_hub.HfApi()`` (tests)."""
    if not cfg.push_to_hub:
        return None
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        api.create_repo(cfg.push_to_hub, private=cfg.hub_private, exist_ok=True)
        api.upload_folder(
            repo_id=cfg.push_to_hub,
            folder_path=str(folder),
            commit_message=f"Upload {Path(folder).name} (twotower_train)",
        )
    except Exception as exc:
        raise ReleaseError(
            f"cannot publish {folder} to {cfg.push_to_hub}: {first_line(exc)} "
            f"(the folder is complete; upload it later with `hf upload {cfg.push_to_hub} {folder}`)"
        ) from None
    url = f"https://huggingface.co/{cfg.push_to_hub}"
    info(f"published {folder} to {url}")
    return url
