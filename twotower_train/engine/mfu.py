"""Model FLOPs utilisation (MFU): the model FLOPs of a training step over the device's peak.

Model FLOPs count the math the model needs, not what the hardware runs (no activation
recompute, no masked-out attention saved), per sequence of ``L`` tokens:

    tower forward       F(N, a, d, Lk) = 2 N L + 4 a d L Lk
    AR objective        3 F(N, a, d, L)                              (forward + 2x backward)
    two-tower           F(Nc, ac, dc, L) + passes x 3 F(Nd, ad, dd, 2L)

``N``: the tower's matmul weights per token (every >= 2-D weight of its linears, routers, LM
head -- also when tied to the embedding --; experts scaled by top-k / experts; embeddings
and convolutions out), ``a`` its attention layers, ``d`` their query width (heads x
head_dim), ``Lk`` the keys each query reads, counted dense: ``L`` for the causal context
tower, ``2L`` (context + own block keys) for the denoiser; ``passes`` = 2 with
``diffusion.complementary``. Mamba scans, norms, softmax and losses are left out (small
next to the matmuls).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch
from torch import nn

# Dense bf16 TFLOP/s of one device (vendor datasheets, SXM parts unless named); FP8 is twice.
GPU_PEAK_TFLOPS = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)

_EXPERTS = re.compile(r"(^|\.)experts(\.|$)")


@dataclass(frozen=True)
class TowerShape:
    """What the FLOP count reads of one tower."""

    matmul_params: float  # N: matmul weights per token (active experts only)
    attn_layers: int  # a
    attn_dim: int  # d: query heads x head_dim


def _experts_active(config) -> float:
    top_k = getattr(config, "num_experts_per_tok", None)
    for key in ("n_routed_experts", "num_experts", "num_local_experts"):
        n = getattr(config, key, None)
        if top_k and n:
            return top_k / n
    return 1.0


def tower_shape(module: nn.Module, config, layers: nn.ModuleList) -> TowerShape:
    """``TowerShape`` of ``module`` (a tower, or an HF model) with HF ``config`` and decoder
    ``layers``."""
    active = _experts_active(config)
    n = 0.0
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.Embedding, nn.modules.conv._ConvNd)):
            continue
        scale = active if _EXPERTS.search(name) else 1.0
        n += scale * sum(p.numel() for p in sub.parameters(recurse=False) if p.ndim >= 2)
    attn = sum(
        any(
            type(m).__name__.endswith("Attention") and "mamba" not in type(m).__name__.lower()
            for m in layer.modules()
        )
        for layer in layers
    )
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return TowerShape(n, attn, heads * head_dim)


def forward_flops(shape: TowerShape, length: int, keys: int) -> float:
    """F: one forward of a tower over ``length`` queries reading ``keys`` keys each."""
    return 2 * shape.matmul_params * length + 4 * shape.attn_layers * shape.attn_dim * length * keys


def ar_flops_per_sequence(shape: TowerShape, length: int) -> float:
    return 3 * forward_flops(shape, length, length)


def twotower_flops_per_sequence(
    context: TowerShape, denoiser: TowerShape, length: int, passes: int = 1
) -> float:
    return forward_flops(context, length, length) + passes * 3 * forward_flops(
        denoiser, length, 2 * length
    )


def training_flops_per_sequence(model: nn.Module, length: int, passes: int = 1) -> float:
    """Model FLOPs of one training sequence of an objective's ``model`` (``objectives.py``):
    a ``TwoTowerModel`` (``passes`` denoiser passes), or an HF causal LM (AR). Read from the
    shapes of the weights: pass a model whose tensors are whole (or on the meta device)."""
    from twotower_train.model.registry import layer_list

    denoiser = getattr(model, "denoiser", None)
    if denoiser is None:  # AR: the HF model itself
        shape = tower_shape(model, model.config, layer_list(model)[1])
        return ar_flops_per_sequence(shape, length)
    backbone = model.backbone
    context = tower_shape(backbone, backbone.config, layer_list(backbone)[1])
    den = tower_shape(denoiser, denoiser.model.config, denoiser.layers)
    return twotower_flops_per_sequence(context, den, length, passes)


# -- the peak --------------------------------------------------------------------------------------


def measure_matmul_tflops(dtype: torch.dtype, seconds: float = 0.2, n: int = 512) -> float:
    """This CPU's square-matmul rate in ``dtype`` (TFLOP/s): the best of 8 slices of about
    ``seconds / 8`` each (a peak: a slice another job slowed down does not lower it)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm up
    best = 0.0
    for _ in range(8):
        count, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds / 8:
            a @ b
            count += 1
        best = max(best, 2 * n**3 * count / elapsed / 1e12)
    return best


def gpu_peak_tflops(name: str) -> float | None:
    for key, value in GPU_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return value
    return None


def device_peak_tflops(
    device: torch.device, dtype: torch.dtype, fp8: bool, configured: float | None
) -> tuple[float | None, str]:
    """``(peak TFLOP/s of one device, where it comes from)``: ``train.peak_tflops``, the
    GPU table (doubled for FP8), or this CPU's measured matmul rate; None on an unknown GPU."""
    if configured is not None:
        return configured, "train.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_tflops(name)
        if peak is None:
            return None, f"unknown GPU {name!r}: set train.peak_tflops for mfu"
        return (2 * peak, f"{name} fp8") if fp8 else (peak, f"{name} bf16")
    label = "bf16" if dtype == torch.bfloat16 else "fp32"
    return measure_matmul_tflops(dtype), f"measured {label} matmul on this CPU"


def mfu(flops_per_sequence: float, tokens_per_s: float, seq_len: int, devices: int, peak_tflops):
    """Achieved model FLOP/s per device over the peak (None without a peak)."""
    if not peak_tflops:
        return None
    return flops_per_sequence * tokens_per_s / seq_len / devices / (peak_tflops * 1e12)
