"""A released two-tower model: one folder, safetensors only, that rebuilds the model.

    release/
        README.md                  the model card (what, backbone, training, results, usage)
        backbone/                  the frozen context tower (HF save_pretrained, safetensors)
        denoiser.safetensors       every trainable weight (the denoiser tower)
        config.json                model_type "twotower", the TwoTowerConfig, format version,
                                   decoding defaults, the backbone reference (name, revision,
                                   sha256 of each weight file)
        retained_vs_tokens_per_forward.png   the harness's plot, when the run evaluated
        tokenizer files            (tokenizer.json, tokenizer_config.json, ...)

`load_release(path)` / `TwoTowerModel.from_release(path)` read it back without pickle.
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

FORMAT_VERSION = 4
# Versions 1-2 stored the denoiser as loose parts (embed., layers.i., norm., head.); version 3
# stores the HF model it is (model.<the family's own names>); version 4 moves
# twotower_config.json to an HF-style config.json (model_type "twotower").
# Version 1 (before TwoTowerConfig) named two settings differently and spelled dtypes as torch does.
_V1_NAMES = {"denoiser_layers": "layers", "tie_denoiser_head": "tie_head"}
_V1_DTYPES = {"bfloat16": "bf16", "float32": "fp32"}
CONFIG_FILE = "config.json"
LEGACY_CONFIG_FILE = "twotower_config.json"  # formats 1-3
MODEL_TYPE = "twotower"
DENOISER_FILE = "denoiser.safetensors"


def save_release(
    model: TwoTowerModel, tokenizer, out_dir: Path, dtype=None, run_info: dict | None = None
) -> Path:
    """Write ``model`` (and its tokenizer) into ``out_dir``, replacing a release there.

    Written into a sibling temporary folder first and renamed into place, so an
    interrupted export never leaves a half-written release. ``dtype`` casts the stored
    denoiser weights (e.g. bf16 for a bf16-trained run). ``run_info`` (from a training run:
    ``backbone``, ``revision``, ``config``, ``report``, ``plot``, ``wandb_url``) feeds the
    backbone reference and the model card."""
    out_dir = Path(out_dir)
    run_info = run_info or {}
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = {
        k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous()
        for k, v in model.denoiser.state_dict().items()
    }
    # safetensors refuses tensors that share memory (a tied head): store each name apart.
    save_file({k: v.clone() for k, v in state.items()}, str(tmp / DENOISER_FILE))
    model.backbone.save_pretrained(tmp / "backbone", safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    backbone = {
        "name_or_path": run_info.get("backbone") or model.backbone.config.name_or_path or None,
        "revision": run_info.get("revision"),
        "sha256": _weight_hashes(tmp / "backbone"),
    }
    config = {
        "architectures": ["TwoTowerModel"],
        "model_type": MODEL_TYPE,
        "library_name": "twotower_train",
        "format_version": FORMAT_VERSION,
        **model.config.to_dict(),
        "decoding": _decoding_defaults(run_info),
        "backbone": backbone,
    }
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    if run_info.get("plot") and Path(run_info["plot"]).is_file():
        shutil.copy(run_info["plot"], tmp / Path(run_info["plot"]).name)
    from twotower_train.model_card import model_card

    (tmp / "README.md").write_text(model_card(model, backbone, run_info))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


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


def is_release(path: str | Path) -> bool:
    """A two-tower release folder (not, e.g., a plain HF model folder with a config.json)."""
    path = Path(path)
    if (path / LEGACY_CONFIG_FILE).is_file():
        return True
    try:
        return json.loads((path / CONFIG_FILE).read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def load_release(path: str | Path, dtype: torch.dtype = torch.float32, tokenizer: bool = True):
    """``(TwoTowerModel, tokenizer)`` from a folder written by ``save_release`` (the
    tokenizer is None with ``tokenizer=False``). Safetensors only, never pickle."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file() and (path / LEGACY_CONFIG_FILE).is_file():
        config_file = path / LEGACY_CONFIG_FILE
    for needed in (config_file.name, DENOISER_FILE, "backbone/config.json"):
        if not (path / needed).is_file():
            raise FileNotFoundError(f"{path} is not a two-tower release: {needed} is missing")
    try:
        values = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file} is corrupt: {exc}") from None
    if values.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise ValueError(
            f"{config_file}: model_type {values['model_type']!r} is not a two-tower release"
        )
    version = values.pop("format_version", None)
    reference = values.pop("backbone", None)
    for key in ("architectures", "model_type", "library_name", "decoding"):
        values.pop(key, None)
    if version == 1:
        values = {_V1_NAMES.get(k, k): v for k, v in values.items()}
        values["context_dtype"] = _V1_DTYPES.get(values.get("context_dtype"))
    elif version not in (2, 3, FORMAT_VERSION):
        raise ValueError(
            f"{config_file}: format version {version} is not supported "
            f"(this version of twotower_train reads 1 to {FORMAT_VERSION})"
        )
    config = TwoTowerConfig.from_dict(values)
    if reference and reference.get("sha256"):
        for name, expected in reference["sha256"].items():
            weights = path / "backbone" / name
            if not weights.is_file():
                raise FileNotFoundError(
                    f"{path} is not a two-tower release: backbone/{name} is missing"
                )
            if _sha256(weights) != expected:
                raise ValueError(
                    f"{weights}: sha256 does not match the release's backbone reference "
                    f"(trained from {reference.get('name_or_path')!r}); refusing a different backbone"
                )
    backbone = AutoModelForCausalLM.from_pretrained(path / "backbone", dtype=dtype)
    model = TwoTowerModel.from_backbone(backbone, config)
    try:
        state = load_file(str(path / DENOISER_FILE))
    except Exception as exc:
        raise ValueError(f"{path / DENOISER_FILE} is corrupt: {first_line(exc)}") from None
    if version in (1, 2):
        state = _legacy_denoiser_state(model, state)
    model.denoiser.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    tok = AutoTokenizer.from_pretrained(path) if tokenizer else None
    return model.eval(), tok


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
