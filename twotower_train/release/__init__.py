"""Released model folders: writing one (safetensors, tokenizer, model card, the backbone
bundled or referenced by sha256) and publishing it to the hub. Reading one back is the
model's own business (``TwoTowerModel.from_release``, ``model/pretrained.py``)."""

from twotower_train.model.pretrained import ReleaseError, decoding_defaults, is_release

from .export import cast_state, publish, save_release, shard_bytes
from .model_card import model_card

__all__ = [
    "ReleaseError",
    "cast_state",
    "decoding_defaults",
    "is_release",
    "model_card",
    "publish",
    "save_release",
    "shard_bytes",
]
