"""Where a backbone's files are: a shipped name, a local folder, a hub id, or a GGUF file.

A GGUF file (llama.cpp's quantized format) is dequantized once, with transformers' own GGUF
reader, into an HF model folder in the cache (``<cache>/gguf/<name>-<sha256 prefix>/``:
fp32 safetensors + the tokenizer read from the same file); every later load reads that
folder. Keyed by the file's content, so a changed file is converted again, and a release
that references the backbone pins the converted weights' sha256 like any other folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from twotower_train.errors import TwoTowerError, first_line
from twotower_train.files import cache_dir, sha256_file

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED_BACKBONES = {
    "tiny_llama": ASSETS / "backbones" / "tiny_llama",
    "tiny_nemotron_h": ASSETS / "backbones" / "tiny_nemotron_h",
}


class BackboneError(TwoTowerError, RuntimeError):
    """A backbone or tokenizer that cannot be loaded; the message is one line."""


def resolve(name_or_path: str, gguf_file: str | None = None) -> str:
    """A shipped name -> its folder; a ``.gguf`` file (or a folder + ``gguf_file``) -> its
    dequantized HF folder in the cache; an existing local folder -> itself; else a hub id."""
    if name_or_path in SHIPPED_BACKBONES:
        path = SHIPPED_BACKBONES[name_or_path]
        if not (path / "config.json").is_file():
            raise BackboneError(f"shipped backbone '{name_or_path}' is missing at {path}")
        return str(path)
    p = Path(name_or_path).expanduser()
    if gguf_file is not None:
        return str(gguf_folder(p / gguf_file))
    if p.suffix == ".gguf":
        return str(gguf_folder(p))
    if p.exists():
        if not (p / "config.json").is_file():
            raise BackboneError(f"{p} is not a Hugging Face model folder (no config.json)")
        return str(p)
    if name_or_path.startswith(("/", ".", "~")):
        raise BackboneError(f"backbone path {name_or_path} does not exist")
    return name_or_path


def gguf_folder(path: Path) -> Path:
    """The HF model folder of the GGUF file ``path``, converted on first use (see the module
    docstring). Written beside its final name and renamed: never half there."""
    if not path.is_file():
        raise BackboneError(f"GGUF file {path} does not exist")
    out = cache_dir() / "gguf" / f"{path.stem}-{sha256_file(path)[:16]}"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    except Exception as exc:
        raise BackboneError(f"cannot read GGUF file {path}: {first_line(exc)}") from None
    # A dequantized model is a plain one: drop the quantizer so it saves as safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(f"dequantized from {path.resolve()}\n")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
