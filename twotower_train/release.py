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

Weights are stored in bf16 unless fp32 is asked for. `load_release(path)` /
`TwoTowerModel.from_release(path)` read it back without pickle; a reference-only release
finds its backbone (a local folder, the shipped name, or the hub) and refuses one whose
sha256 differs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from twotower_train.errors import first_line
from twotower_train.model import TwoTowerConfig, TwoTowerModel
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


class ReleaseError(ValueError):
    """A release that cannot be written or read as asked; the message is one line."""


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
        hashes = _weight_hashes(tmp / "backbone")
    else:
        hashes = _weight_hashes(source)
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
    from twotower_train.model_card import model_card

    (tmp / "README.md").write_text(model_card(model, reference, run_info))
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
    folder, revision = _find_backbone(name, revision, download=False)
    if not list(folder.glob("*.safetensors")):
        raise ReleaseError(
            f"backbone {name!r} has no safetensors weight files in {folder} to reference; "
            "bundle it instead (export.backbone=bundle)"
        )
    return folder, revision


def _find_backbone(name: str, revision: str | None, download: bool) -> tuple[Path, str | None]:
    """A backbone's folder: a shipped name or a local path as is, a hub id from the local
    cache (or downloaded, with ``download``); the revision is the snapshot's commit."""
    from twotower_train.backbones import BackboneError, resolve

    try:
        source = resolve(name)
    except BackboneError as exc:
        raise FileNotFoundError(first_line(exc)) from None
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
        raise FileNotFoundError(
            f"backbone {name!r} (revision {revision}) not found in {where}: {first_line(exc)}"
        ) from None
    return Path(folder), revision or Path(folder).name


def _decoding_defaults(run_info: dict) -> dict:
    """The decoding settings the run evaluated with (``DecodeConfig``'s defaults otherwise)."""
    from twotower_train.generate import DecodeConfig

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


def _weight_hashes(folder: Path) -> dict[str, str]:
    """sha256 of each weight file of a saved HF model folder."""
    return {p.name: _sha256(p) for p in sorted(folder.glob("*.safetensors"))}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def decoding_defaults(path: str | Path) -> dict:
    """The decoding settings a release was evaluated with (empty when none are stored)."""
    try:
        saved = json.loads((Path(path) / CONFIG_FILE).read_text()).get("decoding")
    except (OSError, ValueError, AttributeError):
        return {}
    return saved if isinstance(saved, dict) else {}


def is_release(path: str | Path) -> bool:
    """A two-tower release folder (not, e.g., a plain HF model folder with a config.json)."""
    path = Path(path)
    if (path / LEGACY_CONFIG_FILE).is_file():
        return True
    try:
        return json.loads((path / CONFIG_FILE).read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def load_release(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = True,
    backbone_path: str | Path | None = None,
):
    """``(TwoTowerModel, tokenizer)`` from a folder written by ``save_release`` (the
    tokenizer is None with ``tokenizer=False``). Safetensors only, never pickle.

    A reference-only release loads its backbone from ``backbone_path`` when given, else
    from where its reference points (a local folder, a shipped name, or the hub: found in
    the cache or downloaded); each weight file must match the sha256 the release pins."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file() and (path / LEGACY_CONFIG_FILE).is_file():
        config_file = path / LEGACY_CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a two-tower release: {CONFIG_FILE} is missing")
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
        raise FileNotFoundError(
            f"{path} is not a two-tower release: backbone/config.json is missing"
        )
    for name, expected in (reference.get("sha256") or {}).items():
        weights = folder / name
        if not weights.is_file():
            where = "backbone/" if bundled else f"{folder}/"
            raise FileNotFoundError(f"{path} is not a two-tower release: {where}{name} is missing")
        if _sha256(weights) != expected:
            raise ReleaseError(
                f"{weights}: sha256 does not match the release's backbone reference "
                f"(trained from {reference.get('name_or_path')!r}); refusing a different backbone"
            )
    state = _load_denoiser_state(path)
    try:
        backbone = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except Exception as exc:
        raise ReleaseError(f"cannot load the backbone in {folder}: {first_line(exc)}") from None
    model = TwoTowerModel.from_backbone(backbone, config)
    if version in (1, 2):
        state = _legacy_denoiser_state(model, state)
    model.denoiser.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    tok = _load_tokenizer(path) if tokenizer else None
    return model.eval(), tok


def _load_tokenizer(path: Path):
    """The release's tokenizer (transformers' warning that config.json's model type
    ``twotower`` is not one of its own is expected here, so it is kept quiet)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(path)
    finally:
        hf_logging.set_verbosity(level)


def _referenced_backbone(path: Path, reference: dict, backbone_path) -> Path:
    """The folder of a reference-only release's backbone (``backbone_path`` or found)."""
    if backbone_path is not None:
        folder = Path(backbone_path).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"backbone folder {folder} does not exist")
        return folder
    name = reference.get("name_or_path")
    if not name:
        raise ReleaseError(f"{path}: reference-only release without a backbone name")
    try:
        folder, _ = _find_backbone(name, reference.get("revision"), download=True)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{path} references backbone {name!r}, which was not found ({exc}); "
            "pass its folder as backbone_path"
        ) from None
    return folder


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
            raise FileNotFoundError(f"{path} is not a two-tower release: {name} is missing")
        try:
            state.update(load_file(str(file)))
        except Exception as exc:
            raise ReleaseError(f"{file} is corrupt: {first_line(exc)}") from None
    if weight_map is not None and set(weight_map) - set(state):
        lost = sorted(set(weight_map) - set(state))[0]
        raise ReleaseError(f"{index}: {lost!r} is in none of its shards")
    return state


def _legacy_denoiser_state(model: TwoTowerModel, state: dict) -> dict:
    """Denoiser weights of a version 1-2 release under today's names: ``embed.``,
    ``layers.``, ``norm.``, ``head.`` become the paths of those modules in the HF model."""
    denoiser = model.denoiser
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
    from twotower_train.metrics import info

    url = f"https://huggingface.co/{cfg.push_to_hub}"
    info(f"published {folder} to {url}")
    return url
