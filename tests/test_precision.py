"""Precision backends (engine/precision.py).

Transformer Engine does not install on a CPU machine, so the conversion is tested against a
stand-in of the few TE entry points it uses (``te.Linear``, ``te.autocast``,
``te.is_fp8_available`` / ``is_mxfp8_available``, the recipe classes), put in ``sys.modules``:
which modules are swapped, weights copied, the frozen tower untouched, odd shapes skipped,
the autocast entered around the denoiser only, the recipe chosen from config. The tests at
the end run the real libraries and are skipped without a GPU and the library."""

from __future__ import annotations

import copy
import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from tiny_models import tiny_backbone
from torch import nn

from twotower_train.config import (
    ConfigError,
    FP8Recipe,
    PrecisionBackend,
    PrecisionConfig,
    compose,
)
from twotower_train.engine import precision as prec
from twotower_train.model import TwoTowerModel

VOCAB, MASK, BS = 128, 127, 4

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the stand-in ------------------------------------------------------------------------------


class FakeTE:
    """Records every TE linear call with the recipe active at that moment."""

    def __init__(self, fp8: bool = True, mxfp8: bool = True) -> None:
        self.available = {"fp8": fp8, "mxfp8": mxfp8}
        self.recipes: list = []  # the autocast stack
        self.calls: list[tuple[nn.Module, object]] = []
        self.entered: list = []
        fake = self

        class Linear(nn.Module):
            def __init__(
                self, in_features, out_features, bias=True, params_dtype=None, device=None
            ):
                super().__init__()
                self.in_features, self.out_features = in_features, out_features
                kw = dict(dtype=params_dtype, device=device)
                self.weight = nn.Parameter(torch.full((out_features, in_features), 0.5, **kw))
                self.bias = nn.Parameter(torch.full((out_features,), 0.5, **kw)) if bias else None

            def forward(self, x):
                fake.calls.append((self, fake.recipes[-1] if fake.recipes else None))
                return F.linear(x, self.weight, self.bias)

        @contextmanager
        def autocast(enabled=True, calibrating=False, recipe=None, amax_reduction_group=None):
            fake.entered.append(recipe)
            fake.recipes.append(recipe)
            try:
                yield
            finally:
                fake.recipes.pop()

        def support(what):
            def check(return_reason=False):
                ok = fake.available[what]
                return (ok, "" if ok else f"{what} needs another GPU") if return_reason else ok

            return check

        self.pytorch = types.ModuleType("transformer_engine.pytorch")
        self.pytorch.Linear = Linear
        self.pytorch.autocast = autocast
        self.pytorch.is_fp8_available = support("fp8")
        self.pytorch.is_mxfp8_available = support("mxfp8")
        self.recipe = types.ModuleType("transformer_engine.common.recipe")

        class Format:
            HYBRID, E4M3 = "HYBRID", "E4M3"

        @dataclass
        class DelayedScaling:
            fp8_format: str = "HYBRID"
            amax_history_len: int = 1024
            amax_compute_algo: str = "max"

        @dataclass
        class Float8CurrentScaling:
            fp8_format: str = "HYBRID"

        @dataclass
        class MXFP8BlockScaling:
            fp8_format: str = "E4M3"

        for cls in (Format, DelayedScaling, Float8CurrentScaling, MXFP8BlockScaling):
            setattr(self.recipe, cls.__name__, cls)

    def install(self, monkeypatch) -> None:
        root = types.ModuleType("transformer_engine")
        common = types.ModuleType("transformer_engine.common")
        root.pytorch, root.common, common.recipe = self.pytorch, common, self.recipe
        for name, module in {
            "transformer_engine": root,
            "transformer_engine.pytorch": self.pytorch,
            "transformer_engine.common": common,
            "transformer_engine.common.recipe": self.recipe,
        }.items():
            monkeypatch.setitem(sys.modules, name, module)


@pytest.fixture
def fake_te(monkeypatch) -> FakeTE:
    fake = FakeTE()
    fake.install(monkeypatch)
    return fake


@pytest.fixture(scope="module")
def model() -> TwoTowerModel:
    # intermediate 72: the MLP linears (64 <-> 72) are not multiples of 16 and stay torch
    backbone = tiny_backbone("llama", intermediate_size=72)
    return TwoTowerModel.from_backbone(backbone, mask_token_id=MASK, block_size=BS).train()


def _inputs():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(3, VOCAB - 1, (2, 16), generator=g)
    noisy = torch.where(torch.rand(clean.shape, generator=g) < 0.5, MASK, clean)
    return clean, noisy


def _linears(module: nn.Module, cls) -> dict[str, nn.Module]:
    return {k: m for k, m in module.named_modules() if type(m) is cls}


# -- conversion ----------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", list(FP8Recipe))
def test_te_fp8_swaps_the_denoiser_and_autocasts_it_only(fake_te, model, recipe) -> None:
    plain, converted = copy.deepcopy(model), copy.deepcopy(model)
    context_before = copy.deepcopy(converted.context.state_dict())
    p = PrecisionConfig(backend=PrecisionBackend.te, fp8=True, recipe=recipe, amax_history_len=7)
    autocast = prec.apply_precision(converted, p, prec.PrecisionPlan(PrecisionBackend.te, True))
    assert autocast is not None

    swapped = _linears(converted.denoiser, fake_te.pytorch.Linear)
    layers = len(converted.denoiser.layers)
    assert sorted({k.rsplit(".", 1)[1] for k in swapped}) == [
        "k_proj",
        "o_proj",
        "q_proj",
        "v_proj",
    ]
    assert len(swapped) == 4 * layers
    # odd shapes (MLP 64 <-> 72) and the LM head stay torch linears
    kept = _linears(converted.denoiser, nn.Linear)
    assert sorted({k.rsplit(".", 1)[1] for k in kept}) == [
        "down_proj",
        "gate_proj",
        "lm_head",
        "up_proj",
    ]
    # weights copied, trainable, names and state dict unchanged
    ref = dict(plain.denoiser.named_parameters())
    for name, module in swapped.items():
        torch.testing.assert_close(module.weight, ref[f"{name}.weight"], rtol=0, atol=0)
        assert module.weight.requires_grad
    assert plain.denoiser.state_dict().keys() == converted.denoiser.state_dict().keys()
    # the frozen context tower untouched: torch linears, same values, frozen
    assert not _linears(converted.context, fake_te.pytorch.Linear)
    for k, v in converted.context.state_dict().items():
        assert torch.equal(v, context_before[k]), k
    assert not any(p.requires_grad for p in converted.context.parameters())

    clean, noisy = _inputs()
    context_recipes = []
    hooks = [
        m.register_forward_hook(
            lambda *_: context_recipes.append(fake_te.recipes[-1] if fake_te.recipes else None)
        )
        for m in _linears(converted.context, nn.Linear).values()
    ]
    logits = converted(clean, noisy)
    for h in hooks:
        h.remove()
    # the same function (the stand-in computes in full precision)
    torch.testing.assert_close(logits, plain(clean, noisy), rtol=1e-5, atol=1e-5)
    # every denoiser TE linear ran inside the autocast of the configured recipe; the context
    # tower ran outside any autocast
    assert len(fake_te.calls) == 4 * layers and context_recipes
    assert set(context_recipes) == {None}
    expected = {
        FP8Recipe.current: "Float8CurrentScaling",
        FP8Recipe.delayed: "DelayedScaling",
        FP8Recipe.mxfp8: "MXFP8BlockScaling",
    }[recipe]
    assert {type(r).__name__ for _, r in fake_te.calls} == {expected}
    assert len(fake_te.entered) == 1  # once per denoiser call
    if recipe == FP8Recipe.delayed:
        assert fake_te.entered[0].amax_history_len == 7
    # the backward reaches the swapped weights
    logits.sum().backward()
    assert all(m.weight.grad is not None for m in swapped.values())
    # a deep copy runs its own linears inside its own autocast
    clone = copy.deepcopy(converted)
    fake_te.calls.clear()
    clone(clean, noisy)
    cloned = set(_linears(clone.denoiser, fake_te.pytorch.Linear).values())
    assert {m for m, _ in fake_te.calls} == cloned and all(r for _, r in fake_te.calls)


def test_te_bf16_swaps_without_autocast(fake_te, model) -> None:
    converted = copy.deepcopy(model)
    p = PrecisionConfig(backend=PrecisionBackend.te)
    assert prec.apply_precision(converted, p, prec.PrecisionPlan(PrecisionBackend.te)) is None
    assert _linears(converted.denoiser, fake_te.pytorch.Linear)
    converted(*_inputs())
    assert fake_te.calls and not fake_te.entered


def test_context_fp8_uses_a_stateless_recipe(fake_te, model) -> None:
    converted = copy.deepcopy(model)
    p = PrecisionConfig(
        backend=PrecisionBackend.te, fp8=True, recipe=FP8Recipe.delayed, context_fp8=True
    )
    prec.apply_precision(converted, p, prec.PrecisionPlan(PrecisionBackend.te, True))
    ctx_swapped = _linears(converted.context, fake_te.pytorch.Linear)
    assert ctx_swapped and not any(m.weight.requires_grad for m in ctx_swapped.values())
    assert "backbone.lm_head" in _linears(converted.context, nn.Linear)
    converted(*_inputs())
    by_tower = {
        ("context" if m in ctx_swapped.values() else "denoiser", type(r).__name__)
        for m, r in fake_te.calls
    }
    # the frozen tower never runs delayed scaling (no amax history from a no-grad tower)
    assert by_tower == {("context", "Float8CurrentScaling"), ("denoiser", "DelayedScaling")}


def test_activation_checkpointing_recomputes_inside_the_autocast(fake_te, model) -> None:
    from twotower_train.engine.activation_checkpointing import checkpoint_trained_tower

    converted = copy.deepcopy(model)
    p = PrecisionConfig(backend=PrecisionBackend.te, fp8=True)
    autocast = prec.apply_precision(converted, p, prec.PrecisionPlan(PrecisionBackend.te, True))
    checkpoint_trained_tower(converted, autocast)
    converted(*_inputs()).sum().backward()
    layers = len(converted.denoiser.layers)
    assert len(fake_te.calls) == 2 * 4 * layers  # forward + recompute
    assert all(r is not None for _, r in fake_te.calls)


# -- what a machine can run ----------------------------------------------------------------------


def test_plan_on_this_cpu_machine() -> None:
    cpu = torch.device("cpu")
    assert prec.plan_precision(PrecisionConfig(), cpu).backend == PrecisionBackend.torch
    plan = prec.plan_precision(PrecisionConfig(backend=PrecisionBackend.te), cpu)
    assert plan.backend == PrecisionBackend.torch and not plan.fp8
    assert "running torch bf16 linears" in plan.note and "\n" not in plan.note
    for p in (
        PrecisionConfig(backend=PrecisionBackend.te, fp8=True),
        PrecisionConfig(backend=PrecisionBackend.torchao, fp8=True),
    ):
        with pytest.raises(prec.PrecisionUnavailable, match="cannot run here"):
            prec.plan_precision(p, cpu)


def test_plan_with_te_on_a_gpu(monkeypatch) -> None:
    fake = FakeTE(fp8=True, mxfp8=False)  # a Hopper: FP8, no MXFP8
    fake.install(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    gpu = torch.device("cuda", 0)
    te_cfg = dict(backend=PrecisionBackend.te, fp8=True)
    plan = prec.plan_precision(PrecisionConfig(**te_cfg), gpu)
    assert plan.backend == PrecisionBackend.te and plan.fp8 and plan.note is None
    with pytest.raises(prec.PrecisionUnavailable, match="recipe=mxfp8 .* H100"):
        prec.plan_precision(PrecisionConfig(**te_cfg, recipe=FP8Recipe.mxfp8), gpu)
    fake.available["fp8"] = False  # an Ampere
    with pytest.raises(prec.PrecisionUnavailable, match="fp8 needs another GPU"):
        prec.plan_precision(PrecisionConfig(**te_cfg), gpu)
    assert prec.plan_precision(PrecisionConfig(backend=PrecisionBackend.te), gpu).backend == (
        PrecisionBackend.te
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["precision.fp8=true"], "needs precision.backend=te or torchao"),
        (["precision.backend=torchao"], "set precision.fp8=true"),
        (["precision=torchao_fp8", "precision.recipe=delayed"], "torchao runs recipe=current"),
        (["precision.backend=te", "precision.context_fp8=true"], "context_fp8=true needs"),
        (["precision=te_fp8_delayed", "train.activation_checkpointing=true"], "amax history"),
        (["train.peak_tflops=0"], "peak_tflops must be > 0"),
    ],
)
def test_config_refuses_impossible_combinations(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        compose(overrides)


def test_fp8_on_cpu_is_refused_in_one_line_before_any_work(tmp_path, capsys) -> None:
    from twotower_train.__main__ import main

    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main([*TINY, f"run.dir={run_dir}", "precision=te_fp8"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith("twotower_train: error: precision.fp8=true (backend te) cannot run")
    assert not run_dir.exists()  # nothing written, no data read


def test_bench_precision_trains_each_setting_from_the_same_start(capsys) -> None:
    import json

    from twotower_train.tools import bench

    tt = [o for o in TINY if not o.startswith(("recipe=", "train.objective"))]
    tt += ["train.objective=twotower", "denoiser.block_size=8", "data.val_sequences=0"]
    tt += ["precision.cpu_bf16=on"]  # bf16 even where this CPU has no native bf16
    argv = ["precision", "--steps", "3", "--warmup", "1", "--settings"]
    assert bench.main([*argv, "fp32", "te_bf16", "--", *tt]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    fp32, te_bf16 = result["fp32"], result["te_bf16"]
    assert te_bf16["backend"] == "torch" and not te_bf16["fp8"]  # the one-line fallback here
    assert fp32["max_loss_diff_vs_baseline"] == 0 and 0 < fp32["mfu"] < 1
    assert 0 < te_bf16["max_loss_diff_vs_baseline"] < 0.05  # bf16 against fp32
    assert te_bf16["tokens_per_s"] > 0
    # interleaved, one step of each in turn: each run keeps its own noise, so the same
    # setting written twice trains identically
    assert bench.main([*argv, "fp32", "precision=fp32", "--interleave", "--", *tt]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["precision=fp32"]["max_loss_diff_vs_baseline"] == 0
    assert bench.main([*argv, "fp32", "te_fp8", "--", *tt]) == 2  # refused before training
    assert "cannot run here" in capsys.readouterr().err


# -- the real libraries (GPU) ----------------------------------------------------------------------


def _gpu_model(dtype=torch.bfloat16):
    backbone = tiny_backbone("llama", hidden_size=128, intermediate_size=256, head_dim=32)
    model = TwoTowerModel.from_backbone(backbone, mask_token_id=MASK, block_size=BS)
    return model.to("cuda", dtype).train()


def _close_to_bf16(p: PrecisionConfig, model_cls) -> None:
    model = _gpu_model()
    plain = copy.deepcopy(model)
    plan = prec.plan_precision(p, torch.device("cuda"))
    prec.apply_precision(model, p, plan)
    assert any(isinstance(m, model_cls) for m in model.denoiser.modules())
    clean, noisy = (x.cuda() for x in _inputs())
    got, ref = model(clean, noisy), plain(clean, noisy)
    rel = (got - ref).float().norm() / ref.float().norm()
    assert rel < 0.1, rel
    got.float().logsumexp(-1).mean().backward()
    grads = [q.grad for q in model.denoiser.parameters() if q.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", list(FP8Recipe))
def test_real_te_fp8_matches_bf16(recipe) -> None:
    te = pytest.importorskip("transformer_engine.pytorch")
    p = PrecisionConfig(backend=PrecisionBackend.te, fp8=True, recipe=recipe)
    try:
        prec.plan_precision(p, torch.device("cuda"))
    except prec.PrecisionUnavailable as exc:
        pytest.skip(str(exc))
    _close_to_bf16(p, te.Linear)


@pytest.mark.gpu
def test_real_torchao_fp8_matches_bf16() -> None:
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    p = PrecisionConfig(backend=PrecisionBackend.torchao, fp8=True)
    try:
        prec.plan_precision(p, torch.device("cuda"))
    except prec.PrecisionUnavailable as exc:
        pytest.skip(str(exc))
    _close_to_bf16(p, Float8Linear)


@pytest.mark.gpu
def test_real_te_fp8_activation_checkpointing_matches_the_plain_step() -> None:
    """The recompute runs inside the same autocast: with current scaling it quantises the
    same tensors the same way, so the gradients are the plain FP8 step's."""
    pytest.importorskip("transformer_engine.pytorch")
    from twotower_train.engine.activation_checkpointing import checkpoint_trained_tower

    p = PrecisionConfig(backend=PrecisionBackend.te, fp8=True)
    try:
        plan = prec.plan_precision(p, torch.device("cuda"))
    except prec.PrecisionUnavailable as exc:
        pytest.skip(str(exc))
    clean, noisy = (x.cuda() for x in _inputs())
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = _gpu_model()
        autocast = prec.apply_precision(model, p, plan)
        if ckpt:
            checkpoint_trained_tower(model, autocast)
        model(clean, noisy).float().logsumexp(-1).mean().backward()
        grads.append(
            {k: q.grad for k, q in model.denoiser.named_parameters() if q.grad is not None}
        )
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-2, atol=1e-3, msg=k)


def test_bf16_on_a_cpu_without_native_bf16_trains_in_fp32(monkeypatch) -> None:
    from twotower_train.config import compose
    from twotower_train.engine import precision as prec

    assert prec.cpu_has_native_bf16("flags : fpu avx2 avx512f avx512_bf16 amx_tile")
    assert prec.cpu_has_native_bf16("flags : fpu avx2 amx_bf16")
    assert not prec.cpu_has_native_bf16("flags : fpu avx2 avx512f")
    cpu = torch.device("cpu")
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: False)
    dtype, note = prec.effective_dtype(compose(["precision=bf16"]).precision, cpu)
    assert dtype.value == "fp32" and "precision.cpu_bf16=on" in note and "\n" not in note
    kept = compose(["precision=bf16", "precision.cpu_bf16=on"]).precision
    assert prec.effective_dtype(kept, cpu) == (kept.dtype, None)
    fp32 = compose(["precision=fp32"]).precision
    assert prec.effective_dtype(fp32, cpu) == (fp32.dtype, None)
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: True)
    bf16 = compose(["precision=bf16"]).precision
    assert prec.effective_dtype(bf16, cpu) == (bf16.dtype, None)
