"""MFU (mfu.py): the model FLOP count against a hand count of tiny configs, the peak, and
``mfu`` in the step log of a run."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_backbone

from twotower_train.engine import mfu
from twotower_train.model import TwoTowerModel
from twotower_train.model.registry import layer_list

L = 16

# tiny llama (tiny_models.tiny_config): hidden 64, MLP 96, 4 heads x 16, 2 KV heads, 3 layers,
# vocabulary 128, untied head
LLAMA_LAYER = 64 * 64 + 2 * (32 * 64) + 64 * 64 + 3 * (96 * 64)  # q, k, v, o, gate/up/down
LLAMA_N = 3 * LLAMA_LAYER + 128 * 64  # + LM head (the embedding is a lookup)
# tiny nemotron_h: mamba, attention, moe, mamba, mlp, attention
MAMBA = 328 * 64 + 64 * 128  # in_proj, out_proj (conv1d left out)
ATTN = 64 * 64 + 2 * (32 * 64) + 64 * 64
MOE = (
    (4 * 32 * 64 + 4 * 64 * 32) * 2 / 4 + 4 * 64 + (32 * 64 + 64 * 32)
)  # top-2 of 4, router, shared
MLP = 2 * 96 * 64
NEMOTRON_N = 2 * MAMBA + 2 * ATTN + MOE + MLP + 128 * 64


@pytest.mark.parametrize(
    "family, n, attn_layers", [("llama", LLAMA_N, 3), ("nemotron_h", NEMOTRON_N, 2)]
)
def test_flops_match_a_hand_count(family, n, attn_layers) -> None:
    backbone = tiny_backbone(family)
    shape = mfu.tower_shape(backbone, backbone.config, layer_list(backbone)[1])
    assert shape == mfu.TowerShape(n, attn_layers, 64)
    model = TwoTowerModel.from_backbone(backbone, mask_token_id=127, block_size=4)
    den = mfu.tower_shape(model.denoiser, model.denoiser.model.config, model.denoiser.layers)
    assert den == shape  # a full copy

    context = 2 * n * L + 4 * attn_layers * 64 * L * L
    denoiser = 2 * n * L + 4 * attn_layers * 64 * L * (2 * L)
    assert mfu.training_flops_per_sequence(model, L) == context + 3 * denoiser
    assert mfu.training_flops_per_sequence(model, L, passes=2) == context + 6 * denoiser
    # the AR objective: forward + backward of the backbone
    assert mfu.training_flops_per_sequence(backbone, L) == 3 * context


def test_top_k_denoiser_counts_only_its_layers() -> None:
    backbone = tiny_backbone("llama")
    model = TwoTowerModel.from_backbone(backbone, mask_token_id=127, block_size=4, layers=1)
    den = mfu.tower_shape(model.denoiser, model.denoiser.model.config, model.denoiser.layers)
    assert den == mfu.TowerShape(LLAMA_LAYER + 128 * 64, 1, 64)


def test_peak_and_mfu(monkeypatch) -> None:
    assert mfu.gpu_peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert mfu.gpu_peak_tflops("NVIDIA H100 PCIe") == 756
    assert mfu.gpu_peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert mfu.gpu_peak_tflops("Some GPU") is None
    cpu = torch.device("cpu")
    assert mfu.device_peak_tflops(cpu, torch.bfloat16, False, 12.5) == (12.5, "train.peak_tflops")
    measured, source = mfu.device_peak_tflops(cpu, torch.bfloat16, False, None)
    assert measured > 0 and source == "measured bf16 matmul on this CPU"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    gpu = torch.device("cuda", 0)
    assert mfu.device_peak_tflops(gpu, torch.bfloat16, False, None)[0] == 989
    assert mfu.device_peak_tflops(gpu, torch.bfloat16, True, None)[0] == 2 * 989
    # 1e12 FLOP per 1000-token row, 4000 tokens/s over 2 devices of 4 TFLOP/s peak: 50%
    assert mfu.mfu(1e12, 4000, 1000, 2, 4.0) == pytest.approx(0.5)
    assert mfu.mfu(1e12, 4000, 1000, 2, None) is None
