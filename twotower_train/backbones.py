"""Loading AR backbones and their tokenizers: shipped names, local folders, hub ids,
or a fresh model built from a config (to pretrain one)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

from twotower_train.config import BackboneConfig, InitMode
from twotower_train.errors import first_line
from twotower_train.model import TwoTowerConfig, TwoTowerModel
from twotower_train.model.hub import ASSETS, SHIPPED_BACKBONES, BackboneError, resolve
from twotower_train.model.pretrained import is_release

TINY_WORLD_TOKENIZER = ASSETS / "tiny_world" / "tokenizer"
# Published config.json files (no weights) of the real backbones the recipes name, so
# `mode=plan` needs no network: assets/configs/README.md says where each comes from.
SHIPPED_CONFIGS = {
    "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16": ASSETS / "configs" / "nemotron_3_nano_30b_a3b",
    "Qwen/Qwen3-0.6B": ASSETS / "configs" / "qwen3_0_6b",
    "meta-llama/Llama-3.2-1B": ASSETS / "configs" / "llama_3_2_1b",
}


def load_tokenizer(cfg: BackboneConfig):
    if cfg.tokenizer is not None:
        source = resolve(cfg.tokenizer) if cfg.tokenizer in SHIPPED_BACKBONES else cfg.tokenizer
    elif cfg.init == InitMode.scratch:
        source = str(TINY_WORLD_TOKENIZER)
    else:
        source = resolve(cfg.name_or_path, cfg.gguf_file)
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=cfg.revision)
    except Exception as exc:
        raise BackboneError(f"cannot load tokenizer '{source}': {first_line(exc)}") from None
    if tok.eos_token_id is None:
        raise BackboneError(f"tokenizer '{source}' has no EOS token")
    return tok


def scratch_config(cfg: BackboneConfig, tokenizer) -> PretrainedConfig:
    """The HF config of ``backbone.init=scratch``: ``backbone.config``, with the vocabulary
    size and special tokens of ``tokenizer`` where it does not set them."""
    kwargs = dict(cfg.config)
    model_type = kwargs.pop("model_type")
    kwargs.setdefault("vocab_size", len(tokenizer))
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    kwargs.setdefault("bos_token_id", tokenizer.bos_token_id)
    try:
        return AutoConfig.for_model(model_type, **kwargs)
    except Exception as exc:
        raise BackboneError(f"cannot build a '{model_type}' backbone: {first_line(exc)}") from None


def backbone_config(cfg: BackboneConfig) -> PretrainedConfig:
    """The backbone's HF config without its weights and without the network: from
    ``backbone.config`` (scratch), a shipped backbone or config (``SHIPPED_CONFIGS``), a local
    folder, or the Hugging Face cache."""
    if cfg.init == InitMode.scratch:
        return scratch_config(cfg, load_tokenizer(cfg))
    name = cfg.name_or_path
    if name in SHIPPED_CONFIGS:
        source, offline = str(SHIPPED_CONFIGS[name]), {}
    else:
        source, offline = resolve(name, cfg.gguf_file), {"local_files_only": True}
    try:
        return AutoConfig.from_pretrained(source, revision=cfg.revision, **offline)
    except Exception as exc:
        known = ", ".join(sorted(SHIPPED_CONFIGS))
        raise BackboneError(
            f"no config for backbone '{name}' offline (a shipped name or config: {known}; a "
            f"local folder; or the Hugging Face cache): {first_line(exc)}"
        ) from None


def load_backbone(cfg: BackboneConfig, tokenizer) -> PreTrainedModel:
    """The AR backbone in fp32 on CPU (the engine moves and casts it)."""
    if cfg.init == InitMode.scratch:
        config = scratch_config(cfg, tokenizer)
        try:
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except Exception as exc:
            raise BackboneError(
                f"cannot build a '{config.model_type}' backbone: {first_line(exc)}"
            ) from None
    source = resolve(cfg.name_or_path, cfg.gguf_file)
    try:
        return AutoModelForCausalLM.from_pretrained(
            source, revision=cfg.revision, dtype=torch.float32
        )
    except Exception as exc:
        raise BackboneError(f"cannot load backbone '{source}': {first_line(exc)}") from None


def build_two_tower(
    backbone: PreTrainedModel, tokenizer, config: TwoTowerConfig, clone=copy.deepcopy
) -> TwoTowerModel:
    """The one way a run builds its two-tower model: ``config`` with the tokenizer's mask
    token unless ``config.mask_token_id`` is set. ``backbone`` becomes the context tower;
    ``clone`` copies it for the denoiser (``TwoTowerModel.from_backbone``)."""
    vocab = backbone.get_input_embeddings().num_embeddings
    mask = config.mask_token_id
    if mask is None:
        # the tokenizer's own mask token, else a new [MASK]: the first id past the embedding
        mask = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else vocab
    else:
        check_mask_id(mask, tokenizer)
    return TwoTowerModel.from_backbone(backbone, config, clone=clone, mask_token_id=mask)


def check_mask_id(mask_id: int, tokenizer) -> None:
    """Refuse (one line) a ``denoiser.mask_token_id`` the tokenizer produces from text: the
    denoiser would read a real token as "masked". Allowed: the tokenizer's mask token, an id
    past its vocabulary, or a reserved special token (Llama 3's
    ``<|reserved_special_token_N|>``)."""
    if mask_id == tokenizer.mask_token_id or mask_id >= len(tokenizer):
        return
    token = tokenizer.convert_ids_to_tokens(mask_id)
    special = mask_id in tokenizer.all_special_ids or token in tokenizer.get_added_vocab()
    used = {tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id}
    if special and "reserved" in str(token) and mask_id not in used:
        return
    raise BackboneError(
        f"denoiser.mask_token_id={mask_id} is {token!r}, a token the tokenizer produces; "
        "leave it null to give the denoiser its own [MASK]"
    )


def release_tokenizer_with_mask(tokenizer, mask_id: int):
    """The tokenizer a release ships: ``tokenizer`` itself, or a copy with ``[MASK]`` added
    as its mask token when the denoiser's mask is an added id (training never tokenizes it:
    the context tower must never see it)."""
    if tokenizer.mask_token_id == mask_id or mask_id != len(tokenizer):
        return tokenizer
    out = copy.deepcopy(tokenizer)
    out.add_special_tokens({"mask_token": "[MASK]"})
    if out.mask_token_id != mask_id:
        raise BackboneError(f"the added [MASK] got id {out.mask_token_id}, expected {mask_id}")
    return out


def backbone_name(cfg: BackboneConfig) -> str:
    """The backbone as a release names it: ``name_or_path``, or the GGUF file's path."""
    if cfg.gguf_file is not None:
        return str(Path(cfg.name_or_path).expanduser() / cfg.gguf_file)
    return cfg.name_or_path


def load_two_tower(source: str, config: TwoTowerConfig | None = None):
    """``(TwoTowerModel, tokenizer)`` from a release folder, or from a backbone (shipped
    name, local folder, hub id) with a fresh, untrained denoiser built with ``config``
    (smoke tests and speed benchmarks: its tokens per forward mean nothing)."""
    if is_release(source):
        if config is not None:
            raise ValueError(f"{source} is a release: its settings are in the release")
        return load_release(source)
    bcfg = BackboneConfig(name_or_path=source)
    tokenizer = load_tokenizer(bcfg)
    model = build_two_tower(load_backbone(bcfg, tokenizer), tokenizer, config or TwoTowerConfig())
    return model.eval(), tokenizer


def load_release(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = True,
    backbone_path: str | Path | None = None,
):
    """``(TwoTowerModel, tokenizer)`` from a release folder (``TwoTowerModel.from_release``;
    the tokenizer is None with ``tokenizer=False``)."""
    model = TwoTowerModel.from_release(path, dtype=dtype, backbone_path=backbone_path)
    return model, (release_tokenizer(path) if tokenizer else None)


def release_tokenizer(path: str | Path):
    """A release's tokenizer (transformers' warning that config.json's model type
    ``twotower`` is not one of its own is expected here, so it is kept quiet)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(path)
    finally:
        hf_logging.set_verbosity(level)
