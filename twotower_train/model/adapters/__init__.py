"""Backbone adapters: one small file per HF family (see ``base.py`` for the interface)."""

from __future__ import annotations

from .base import ATTENTION, FFN, MAMBA, BackboneAdapter, BackboneParts, SubLayer
from .llama import LlamaAdapter
from .nemotron_h import NemotronHAdapter
from .qwen3 import Qwen3Adapter

ADAPTERS: tuple[type[BackboneAdapter], ...] = (LlamaAdapter, Qwen3Adapter, NemotronHAdapter)


def adapter_for(backbone) -> BackboneAdapter:
    """The adapter for an HF causal LM, chosen by ``config.model_type``."""
    model_type = backbone.config.model_type
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            adapter = cls()
            adapter.validate(backbone.config)
            return adapter
    supported = sorted(t for cls in ADAPTERS for t in cls.model_types)
    raise NotImplementedError(
        f"backbone model_type {model_type!r} not supported; one of {supported}"
    )


__all__ = [
    "ADAPTERS",
    "ATTENTION",
    "FFN",
    "MAMBA",
    "BackboneAdapter",
    "BackboneParts",
    "LlamaAdapter",
    "NemotronHAdapter",
    "Qwen3Adapter",
    "SubLayer",
    "adapter_for",
]
