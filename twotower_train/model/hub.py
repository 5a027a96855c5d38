"""Where a backbone's files are: a shipped name, a local folder, or a hub id."""

from __future__ import annotations

from pathlib import Path

from twotower_train.errors import TwoTowerError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED_BACKBONES = {
    "tiny_llama": ASSETS / "backbones" / "tiny_llama",
    "tiny_nemotron_h": ASSETS / "backbones" / "tiny_nemotron_h",
}


class BackboneError(TwoTowerError, RuntimeError):
    """A backbone or tokenizer that cannot be loaded; the message is one line."""


def resolve(name_or_path: str) -> str:
    """A shipped name -> its folder; an existing local path -> itself; else a hub id."""
    if name_or_path in SHIPPED_BACKBONES:
        path = SHIPPED_BACKBONES[name_or_path]
        if not (path / "config.json").is_file():
            raise BackboneError(f"shipped backbone '{name_or_path}' is missing at {path}")
        return str(path)
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise BackboneError(f"{p} is not a Hugging Face model folder (no config.json)")
        return str(p)
    if name_or_path.startswith(("/", ".", "~")):
        raise BackboneError(f"backbone path {name_or_path} does not exist")
    return name_or_path
