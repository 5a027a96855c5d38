"""The release folder format: what ``TwoTowerModel.from_release`` reads back.

    release/
        config.json                model_type "twotower", the TwoTowerConfig, format version,
                                   decoding defaults, the backbone reference (name, revision,
                                   sha256 of each weight file, bundled or not)
        denoiser.safetensors       every trainable weight (or shards + an HF-style index)
        backbone/                  the frozen context tower (absent when only referenced)
        tokenizer files, README.md (the model card)

Writing a release (with its model card) is ``twotower_train.release``; this module only
reads and checks, so the model knows nothing of runs or exports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from twotower_train.errors import TwoTowerError, first_line
from twotower_train.files import sha256_file
from twotower_train.model.config import TwoTowerConfig
from twotower_train.model.hub import BackboneError, resolve
from twotower_train.model.registry import is_norm

FORMAT_VERSION = 5
# Versions 1-2 stored the denoiser as loose parts (embed., layers.i., norm., head.); version 3
# stores the HF model it is (model.<the family's own names>); version 4 moves
# twotower_config.json to an HF-style config.json (model_type "twotower"); version 5 adds
# sharded denoiser weights and reference-only releases (``backbone.bundled``).
# Version 1 (before TwoTowerConfig) named two settings differently and spelled dtypes as torch does.
_V1_NAMES = {"denoiser_layers": "layers", "tie_denoiser_head": "tie_head"}
_V1_DTYPES = {"bfloat16": "bf16", "float32": "fp32"}
CONFIG_FILE = "config.json"
LEGACY_CONFIG_FILE = "twotower_config.json"  # formats 1-3
MODEL_TYPE = "twotower"
DENOISER_FILE = "denoiser.safetensors"
DENOISER_INDEX = "denoiser.safetensors.index.json"
BACKBONE_MODES = ("bundle", "reference")
REQUIRED_KEYS = ("block_size", "mask_token_id")


class ReleaseError(TwoTowerError, ValueError):
    """A release that cannot be written or read as asked; the message is one line."""


class MissingReleaseFile(TwoTowerError, FileNotFoundError):
    """A release (or its referenced backbone) lacks a file; the message is one line."""


@dataclass
class ReleaseFolder:
    """A checked release folder: what ``TwoTowerModel.from_release`` builds from."""

    config: TwoTowerConfig
    backbone_folder: Path  # an HF model folder (bundled ``backbone/`` or referenced)
    denoiser_state: dict[str, torch.Tensor]
    version: int | None


def is_release(path: str | Path) -> bool:
    """A two-tower release folder (not, e.g., a plain HF model folder with a config.json)."""
    path = Path(path)
    if (path / LEGACY_CONFIG_FILE).is_file():
        return True
    try:
        return json.loads((path / CONFIG_FILE).read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def decoding_defaults(path: str | Path) -> dict:
    """The decoding settings a release was evaluated with (empty when none are stored)."""
    try:
        saved = json.loads((Path(path) / CONFIG_FILE).read_text()).get("decoding")
    except (OSError, ValueError, AttributeError):
        return {}
    return saved if isinstance(saved, dict) else {}


def read_release(path: str | Path, backbone_path: str | Path | None = None) -> ReleaseFolder:
    """What a release folder holds, checked: its ``TwoTowerConfig``, the folder of its
    backbone (bundled, ``backbone_path``, or where its reference points: a local folder, a
    shipped name, or the hub, found in the cache or downloaded; each weight file must match
    the sha256 the release pins) and the denoiser's weights. Safetensors only, never pickle."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file() and (path / LEGACY_CONFIG_FILE).is_file():
        config_file = path / LEGACY_CONFIG_FILE
    if not config_file.is_file():
        raise MissingReleaseFile(f"{path} is not a two-tower release: {CONFIG_FILE} is missing")
    try:
        values = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ReleaseError(f"{config_file} is corrupt: {exc}") from None
    if not isinstance(values, dict):
        raise ReleaseError(f"{config_file} is corrupt: not a JSON object")
    if values.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise ReleaseError(
            f"{config_file}: model_type {values['model_type']!r} is not a two-tower release"
        )
    version = values.pop("format_version", None)
    reference = values.pop("backbone", None) or {}
    for key in ("architectures", "model_type", "library_name", "decoding", "dtype"):
        values.pop(key, None)
    if version == 1:
        values = {_V1_NAMES.get(k, k): v for k, v in values.items()}
        values["context_dtype"] = _V1_DTYPES.get(values.get("context_dtype"))
    elif version not in (2, 3, 4, FORMAT_VERSION):
        raise ReleaseError(
            f"{config_file}: format version {version} is not supported "
            f"(this version of twotower_train reads 1 to {FORMAT_VERSION})"
        )
    missing = [k for k in REQUIRED_KEYS if k not in values]
    if missing:
        raise ReleaseError(f"{config_file} lacks the setting {missing[0]!r}")
    config = TwoTowerConfig.from_dict(values)
    bundled = reference.get("bundled", True) and backbone_path is None
    folder = path / "backbone" if bundled else _referenced_backbone(path, reference, backbone_path)
    if not (folder / "config.json").is_file():
        raise MissingReleaseFile(
            f"{path} is not a two-tower release: backbone/config.json is missing"
        )
    for name, expected in (reference.get("sha256") or {}).items():
        weights = folder / name
        if not weights.is_file():
            where = "backbone/" if bundled else f"{folder}/"
            raise MissingReleaseFile(f"{path} is not a two-tower release: {where}{name} is missing")
        if sha256_file(weights) != expected:
            raise ReleaseError(
                f"{weights}: sha256 does not match the release's backbone reference "
                f"(trained from {reference.get('name_or_path')!r}); refusing a different backbone"
            )
    return ReleaseFolder(config, folder, _load_denoiser_state(path), version)


def _referenced_backbone(path: Path, reference: dict, backbone_path) -> Path:
    """The folder of a reference-only release's backbone (``backbone_path`` or found)."""
    if backbone_path is not None:
        folder = Path(backbone_path).expanduser()
        if not folder.is_dir():
            raise MissingReleaseFile(f"backbone folder {folder} does not exist")
        return folder
    name = reference.get("name_or_path")
    if not name:
        raise ReleaseError(f"{path}: reference-only release without a backbone name")
    try:
        folder, _ = find_backbone(name, reference.get("revision"), download=True)
    except FileNotFoundError as exc:
        raise MissingReleaseFile(
            f"{path} references backbone {name!r}, which was not found ({exc}); "
            "pass its folder as backbone_path"
        ) from None
    return folder


def find_backbone(name: str, revision: str | None, download: bool) -> tuple[Path, str | None]:
    """A backbone's folder: a shipped name or a local path as is, a hub id from the local
    cache (or downloaded, with ``download``); the revision is the snapshot's commit."""
    try:
        source = resolve(name)
    except BackboneError as exc:
        raise MissingReleaseFile(first_line(exc)) from None
    if Path(source).is_dir():
        return Path(source), revision
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            source,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"],
            local_files_only=not download,
        )
    except Exception as exc:
        where = "the hub" if download else "the local Hugging Face cache"
        raise MissingReleaseFile(
            f"backbone {name!r} (revision {revision}) not found in {where}: {first_line(exc)}"
        ) from None
    return Path(folder), revision or Path(folder).name


def _load_denoiser_state(path: Path) -> dict[str, torch.Tensor]:
    """The denoiser's weights: one file, or every shard its index names (all present)."""
    index = path / DENOISER_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ReleaseError(f"{index} is corrupt: {first_line(exc)}") from None
        files = sorted(set(weight_map.values()))
    else:
        weight_map, files = None, [DENOISER_FILE]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise MissingReleaseFile(f"{path} is not a two-tower release: {name} is missing")
        try:
            state.update(load_file(str(file)))
        except Exception as exc:
            raise ReleaseError(f"{file} is corrupt: {first_line(exc)}") from None
    if weight_map is not None and set(weight_map) - set(state):
        lost = sorted(set(weight_map) - set(state))[0]
        raise ReleaseError(f"{index}: {lost!r} is in none of its shards")
    return state


def legacy_denoiser_state(denoiser: nn.Module, state: dict) -> dict:
    """``denoiser``'s weights of a version 1-2 release under today's names: ``embed.``,
    ``layers.``, ``norm.``, ``head.`` become the paths of those modules in the HF model."""
    names = {id(m): name for name, m in denoiser.named_modules()}
    layers_path = names[id(denoiser.layers)]
    parent = denoiser.get_submodule(layers_path.rpartition(".")[0])
    norms = [m for m in parent.children() if is_norm(m)]
    prefixes = {
        "embed.": names[id(denoiser.embed)] + ".",
        "head.": names[id(denoiser.head)] + ".",
        "layers.": layers_path + ".",
        "norm.": names[id(norms[-1])] + "." if norms else "norm.",
    }
    out = {}
    for key, value in state.items():
        if key.startswith("rotary."):
            continue  # RoPE frequencies are buffers of the HF model, not weights
        old = next((p for p in prefixes if key.startswith(p)), None)
        out[prefixes[old] + key[len(old) :] if old else key] = value
    return out


def weight_hashes(folder: Path) -> dict[str, str]:
    """sha256 of each weight file of a saved HF model folder."""
    return {p.name: sha256_file(p) for p in sorted(folder.glob("*.safetensors"))}
