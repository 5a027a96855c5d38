"""Two-tower block-diffusion model over a frozen HF causal LM (see docs/architecture.md).

Files: ``two_tower.py`` (``TwoTowerModel``), ``towers.py`` (context / denoiser towers),
``registry.py`` (how the towers run an HF model: attention registry, Mamba mixers, probe), ``attention.py`` (SDPA / FlexAttention),
``masks.py`` (pure mask functions), ``mamba.py`` (SSD scan from explicit states),
``cache.py`` (what flows between the towers), ``time_conditioning.py`` (adaLN-single),
``config.py`` (``TwoTowerConfig``, the one settings object).
"""

from .cache import ContextCache, ContextOutputs, DenoiserContext
from .config import AttnImpl, DType, TwoTowerConfig
from .masks import block_causal_mask, block_causal_mask_mod, denoiser_attention_mask
from .towers import ContextTower, DenoiserTower
from .two_tower import TwoTowerModel

__all__ = [
    "AttnImpl",
    "DType",
    "ContextCache",
    "ContextOutputs",
    "ContextTower",
    "DenoiserContext",
    "DenoiserTower",
    "TwoTowerConfig",
    "TwoTowerModel",
    "block_causal_mask",
    "block_causal_mask_mod",
    "denoiser_attention_mask",
]
