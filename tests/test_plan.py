"""`mode=plan`: every real-backbone recipe planned from its shipped config on the meta device
(no weights, no network), the memory formula against hand counts and against what autograd
really saves, and the command line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from twotower_train.__main__ import main
from twotower_train.backbones import SHIPPED_CONFIGS
from twotower_train.config import RECIPES_DIR, compose
from twotower_train.run.plan import (
    ModelShape,
    build_bytes,
    estimate,
    meta_model,
    model_shape,
    plan_text,
    saved_bytes,
)

# recipe -> (hub id, trainable parameters of the published architecture, denoiser layers)
REAL = {
    "nemotron_3_nano_30b_a3b": (
        "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16",
        31_577_937_344,  # "31.6B total" (model card)
        {("mamba",): 23, ("moe",): 23, ("attention",): 6},
    ),
    "qwen3_0_6b": ("Qwen/Qwen3-0.6B", 596_049_920, {("attention", "mlp"): 28}),
    "llama_3_2_1b": ("meta-llama/Llama-3.2-1B", 1_235_814_400, {("attention", "mlp"): 16}),
}


def test_every_real_backbone_recipe_is_listed() -> None:
    import yaml

    named = set()
    for path in RECIPES_DIR.glob("*.yaml"):
        backbone = (yaml.safe_load(path.read_text()) or {}).get("backbone", {})
        if backbone.get("name_or_path") in SHIPPED_CONFIGS:
            named.add(path.stem)
    assert named == set(REAL)


@pytest.mark.parametrize("recipe", sorted(REAL))
def test_plan_builds_each_real_recipe_on_the_meta_device(recipe: str) -> None:
    hub_id, params, kinds = REAL[recipe]
    cfg = compose([f"recipe={recipe}", "mode=plan"])
    assert cfg.backbone.name_or_path == hub_id
    model = meta_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    shape = model_shape(model)
    assert shape.trainable == shape.frozen == params  # the denoiser copies every layer
    counted: dict[tuple, int] = {}
    for layer in shape.layers:
        counted[layer.kinds] = counted.get(layer.kinds, 0) + 1
    assert counted == kinds
    text = plan_text(cfg, shape)
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert len(rows) == 8  # ZeRO 0-3 x checkpointing off/on
    totals = [estimate(shape, cfg, stage, ckpt).total for stage in range(4) for ckpt in (0, 1)]
    assert all(a > b for a, b in zip(totals[0::2], totals[1::2]))  # checkpointing saves
    assert totals[0] > totals[2] > totals[4] > totals[6]  # each ZeRO stage saves


def test_model_states_follow_the_zero_formula() -> None:
    """bf16 mixed precision: 2 (context) + 2 + 2 + 12 bytes per parameter, divided by the
    world size as each ZeRO stage partitions (Rajbhandari et al., 2020), plus DeepSpeed's
    fp32 gradient partition for the master weights."""
    shape = ModelShape(10**9, 3 * 10**9, 64, 100, [], [], largest_module=1000)
    cfg = compose(["plan.gpus=4", "precision=bf16", "data.val_sequences=0"])
    parts = {}
    for stage in range(4):
        e = estimate(shape, cfg, stage, checkpointing=False)
        parts[stage] = (e.context, e.weights, e.grads, e.optimizer)
    pd, pc = 10**9, 3 * 10**9
    assert parts[0] == (2 * pc, 2 * pd, 2 * pd, 12 * pd)
    # from stage 1 on, the fp32 master's gradient partition (4 bytes / N) comes with the grads
    assert parts[1] == (2 * pc, 2 * pd, 2 * pd + pd, 3 * pd)
    assert parts[2] == (2 * pc, 2 * pd, pd / 2 + pd, 3 * pd)
    assert parts[3] == (pc / 2, pd / 2, pd / 2 + pd, 3 * pd)
    replicated = compose(["plan.gpus=4", "deepspeed.context_placement=replicate"])
    assert estimate(shape, replicated, 3, False).context == 2 * pc
    fp32 = compose(["plan.gpus=4", "precision=fp32"])
    e = estimate(shape, fp32, 0, False)
    assert (e.weights, e.grads, e.optimizer) == (4 * pd, 4 * pd, 8 * pd)
    e = estimate(shape, fp32, 3, False)  # ZeRO keeps an fp32 master even of fp32 weights
    assert (e.weights, e.grads, e.optimizer) == (pd, pd, 3 * pd)


def test_building_partitioned_needs_a_slice_of_the_whole() -> None:
    """Built whole: fp32 backbone + denoiser copy + template copy on every process. Built
    partitioned (ZeRO-3, deepspeed.zero_init): w (Ψc + Ψd) / N plus one tensor gathered
    whole; a replicated context tower is built whole (fp32) on every rank."""
    shape = ModelShape(10**9, 3 * 10**9, 64, 100, [], [], 1000, largest_tensor=10**6)
    pd, pc = 10**9, 3 * 10**9
    cfg = compose(["plan.gpus=4", "precision=bf16", "deepspeed=zero3"])
    assert build_bytes(shape, cfg, 2) == 8 * (pd + pc)
    assert build_bytes(shape, cfg, 3) == 2 * (pd + pc) / 4 + 4 * 10**6
    whole = compose(["plan.gpus=4", "deepspeed=zero3", "deepspeed.zero_init=false"])
    assert build_bytes(shape, whole, 3) == 8 * (pd + pc)  # bf16: model + template copy
    whole_fp32 = compose(
        ["plan.gpus=4", "deepspeed=zero3", "deepspeed.zero_init=false", "precision=fp32"]
    )
    assert build_bytes(shape, whole_fp32, 3) == 4 * (pd + pc)  # fp32: the template is meta
    replicated = compose(
        ["plan.gpus=4", "deepspeed=zero3", "deepspeed.context_placement=replicate"]
    )
    assert build_bytes(shape, replicated, 3) == 2 * pd / 4 + 4 * pc
    scratch = compose(["recipe=qwen3_0_6b_smoke", "plan.gpus=4"])  # drawn whole, then cut
    assert build_bytes(shape, scratch, 3) == 2 * (pd + pc) / 4 + 4 * pc
    # and no fp32 template copy on the host beside a CPU run built partitioned
    cpu = compose(["plan.gpus=4", "plan.device=cpu", "deepspeed=zero3"])
    assert estimate(shape, cpu, 3, False).host == 0
    cpu_whole = compose([*["plan.gpus=4", "plan.device=cpu"], "deepspeed.zero_init=false"])
    assert estimate(shape, cpu_whole, 3, False).host == 4 * (pd + pc)
    fp32_whole = compose(
        ["plan.gpus=4", "plan.device=cpu", "deepspeed.zero_init=false", "precision=fp32"]
    )
    assert estimate(shape, fp32_whole, 3, False).host == 0  # live weights are exact


@pytest.mark.parametrize("model_type", ["qwen3", "llama"])
def test_saved_activations_match_what_autograd_saves(model_type: str) -> None:
    """The per-layer formula against the bytes autograd really saves in a two-tower
    training forward (fp32, CPU): within 10%."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from twotower_train.model import TwoTowerModel

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=384,
        vocab_size=1024,
    )
    model = TwoTowerModel.from_backbone(
        AutoModelForCausalLM.from_config(config), block_size=16, mask_token_id=3
    )
    batch, seq = 2, 64
    clean = torch.randint(4, 1024, (batch, seq))
    clean[:, 30] = 1  # an EOS: two documents per row
    masked = torch.rand(batch, seq) < 0.5
    noisy = torch.where(masked, 3, clean)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        # parameters, and the weight copies some CPU kernels keep, are not activations
        if storage.data_ptr() not in params and tuple(t.shape) not in weight_shapes:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        end = (clean == 1).long()
        logits = model(clean, noisy, doc_ids=torch.cumsum(end, dim=1) - end)
        F.cross_entropy(logits[masked], clean[masked]).backward()
    planned = saved_bytes(model_shape(model), tokens=batch * seq, seq_len=seq, block=16, a=4)
    assert sum(saved.values()) == pytest.approx(planned, rel=0.1)


def test_command_line_plan_and_its_errors(capsys) -> None:
    assert main(["recipe=qwen3_0_6b", "mode=plan", "plan.gpus=4"]) == 0
    out = capsys.readouterr().out
    assert "0.596B trainable" in out and "4 x cuda" in out and "| 3 | on |" in out
    for args, message in [
        (["mode=plan", "backbone.name_or_path=nobody/no-such-model"], "no config for backbone"),
        (["recipe=qwen3_0_6b", "mode=plan", "plan.gpus=0"], "plan.gpus must be >= 1"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_smoke_recipe_is_the_published_qwen3_architecture() -> None:
    """`qwen3_0_6b_smoke` is the published Qwen3-0.6B architecture, all 28 layers."""
    from transformers import AutoConfig

    published = AutoConfig.from_pretrained(SHIPPED_CONFIGS["Qwen/Qwen3-0.6B"]).to_dict()
    published.update(published.get("rope_parameters") or {})  # transformers 5 nests rope_theta
    smoke = compose(["recipe=qwen3_0_6b_smoke"]).backbone.config
    assert smoke["model_type"] == published["model_type"]
    for key, value in smoke.items():
        if key != "model_type":
            assert published[key] == pytest.approx(value), key
    assert smoke["num_hidden_layers"] == published["num_hidden_layers"] == 28
