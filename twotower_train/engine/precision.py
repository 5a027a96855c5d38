"""Precision applied to a built model from outside: Transformer Engine or torchao linears.

The model code knows nothing of this module. ``plan_precision`` decides at start what the
machine can run (``precision.*``, docs/training.md "Precision"); ``apply_precision`` then,
on the model already on its device and before DeepSpeed wraps it:

* ``backend=te``: every ``nn.Linear`` of the trained tower (the denoiser; the whole model
  for the AR objective) whose in/out features are multiples of 16 becomes a ``te.Linear``
  with the same weights -- except the LM head (FP8 logits hurt; torchtitan leaves its
  output layer out too) and weights tied to another module. With ``fp8=true`` the tower's
  ``forward`` runs inside ``te.autocast(recipe=...)`` (the denoiser only: the context
  tower, its losses and the optimizer stay outside). The frozen context tower is left as
  it is unless ``context_fp8=true``: then its linears are swapped too and its forward runs
  in an autocast of a *stateless* recipe (current scaling, or MXFP8 when that is the
  recipe): scales come from each tensor as it is quantised, so a frozen, no-grad tower
  keeps and updates no amax history whatever the denoiser's recipe.
* ``backend=torchao``: torchao's own float8 training (``convert_to_float8_training``,
  tensorwise dynamic scaling) on the same linears of the trained tower.

Without Transformer Engine or without CUDA, ``backend=te`` with bf16 says so in one line
and runs torch linears; FP8 that cannot run is refused (``PrecisionUnavailable``, one
line) before any work.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from twotower_train.config import (
    ConfigError,
    CpuBf16,
    DType,
    FP8Recipe,
    PrecisionBackend,
    PrecisionConfig,
)
from twotower_train.errors import first_line

ALIGN = 16  # FP8 GEMMs need both matrix dimensions divisible by 16


class PrecisionUnavailable(ConfigError):
    """The precision asked for cannot run on this machine (one-line message)."""


@dataclass
class PrecisionPlan:
    """What runs: ``backend`` after a te-bf16 fallback, ``fp8``, and ``note``: the line said
    at start when the run does not get what it asked for."""

    backend: PrecisionBackend
    fp8: bool = False
    note: str | None = None


def import_te():
    """``(transformer_engine.pytorch, transformer_engine.common.recipe)``; raises on failure."""
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe

    return te, recipe


def _te_reason(device: torch.device) -> str | None:
    """Why Transformer Engine cannot run here (None: it can)."""
    if device.type != "cuda":
        return f"Transformer Engine needs a CUDA device (this run is on {device.type})"
    try:
        import_te()
    except Exception as exc:  # ImportError, or a CUDA library that does not load
        return f"Transformer Engine does not import ({first_line(exc)[:160]})"
    return None


def _support(te, what: str) -> tuple[bool, str]:
    """``te.is_fp8_available`` / ``is_mxfp8_available`` (TE 2.x) with the reason."""
    check = getattr(te, f"is_{what}_available", None)
    if check is None:  # older TE: transformer_engine.pytorch.fp8.check_*_support
        from transformer_engine.pytorch import fp8 as te_fp8

        return getattr(te_fp8, f"check_{what}_support")()
    return check(return_reason=True)


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX-512 BF16 or AMX); True where
    it cannot be told (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return True
    flags = set(cpuinfo.split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def effective_dtype(p: PrecisionConfig, device: torch.device) -> tuple[DType, str | None]:
    """The dtype a run trains in on ``device``, and the line to say when it is not the one
    asked for: ``precision.dtype=bf16`` on a CPU without native bf16 matmuls is fp32 unless
    ``precision.cpu_bf16=on``."""
    if (
        p.dtype == DType.bf16
        and device.type == "cpu"
        and p.cpu_bf16 == CpuBf16.auto
        and not cpu_has_native_bf16()
    ):
        return DType.fp32, (
            "precision.dtype=bf16 on a CPU without native bf16 matmuls (no AVX-512 BF16 or "
            "AMX): training in fp32, 10-30x faster here (precision.cpu_bf16=on keeps bf16)"
        )
    return p.dtype, None


def plan_precision(p: PrecisionConfig, device: torch.device) -> PrecisionPlan:
    """What this machine runs for ``p``; ``PrecisionUnavailable`` for FP8 it cannot run."""
    if p.backend == PrecisionBackend.torch:
        return PrecisionPlan(PrecisionBackend.torch)
    if p.backend == PrecisionBackend.torchao:
        reason = _torchao_reason(device)
        if reason:
            raise PrecisionUnavailable(f"precision.backend=torchao cannot run here: {reason}")
        return PrecisionPlan(PrecisionBackend.torchao, fp8=True)
    reason = _te_reason(device)
    if reason and p.fp8:
        raise PrecisionUnavailable(f"precision.fp8=true (backend te) cannot run here: {reason}")
    if reason:
        return PrecisionPlan(
            PrecisionBackend.torch,
            note=f"precision.backend=te: {reason}; running torch {p.dtype.value} linears",
        )
    if p.fp8:
        te, _ = import_te()
        what = "mxfp8" if p.recipe == FP8Recipe.mxfp8 else "fp8"
        ok, why = _support(te, what)
        if not ok:
            raise PrecisionUnavailable(
                f"precision.recipe={p.recipe.value} (backend te) cannot run on "
                f"{torch.cuda.get_device_name(device)}: {why or what + ' unsupported'}"
            )
    return PrecisionPlan(PrecisionBackend.te, fp8=p.fp8)


def _torchao_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"torchao float8 training needs a CUDA GPU (this run is on {device.type})"
    try:
        import torchao.float8  # noqa: F401
    except Exception as exc:
        return f"torchao does not import ({first_line(exc)[:160]})"
    if torch.cuda.get_device_capability(device) < (8, 9):
        return f"{torch.cuda.get_device_name(device)} has no FP8 (needs compute capability 8.9+)"
    return None


# -- recipes ------------------------------------------------------------------------------------


def fp8_recipe(p: PrecisionConfig, recipe_module):
    """The TE recipe object of ``p.recipe`` (HYBRID: E4M3 forward, E5M2 gradients)."""
    fmt = recipe_module.Format.HYBRID
    if p.recipe == FP8Recipe.delayed:
        return recipe_module.DelayedScaling(
            fp8_format=fmt,
            amax_history_len=p.amax_history_len,
            amax_compute_algo=p.amax_compute_algo,
        )
    if p.recipe == FP8Recipe.mxfp8:
        return recipe_module.MXFP8BlockScaling(fp8_format=recipe_module.Format.E4M3)
    return recipe_module.Float8CurrentScaling(fp8_format=fmt)


def context_recipe(p: PrecisionConfig, recipe_module):
    """The frozen tower's recipe: stateless (no amax history to update from a no-grad
    tower): MXFP8 when that is the run's recipe, else per-tensor current scaling."""
    if p.recipe == FP8Recipe.mxfp8:
        return fp8_recipe(p, recipe_module)
    return recipe_module.Float8CurrentScaling(fp8_format=recipe_module.Format.HYBRID)


def autocast_factory(te, recipe) -> Callable[[], AbstractContextManager]:
    """``te.autocast(recipe=...)`` (TE >= 2.8) or the older ``te.fp8_autocast``."""
    if hasattr(te, "autocast"):
        return lambda: te.autocast(enabled=True, recipe=recipe)
    return lambda: te.fp8_autocast(enabled=True, fp8_recipe=recipe)


def run_inside(module: nn.Module, make_context: Callable[[], AbstractContextManager]) -> None:
    """Make ``module``'s forward run inside ``make_context()`` (its own instance attribute:
    parameters, names and state dict unchanged; a partial of the bound method, so a deep
    copy of the module calls its own forward)."""
    module.forward = functools.partial(_forward_inside, module.forward, make_context)


def _forward_inside(inner, make_context, *args, **kwargs):
    with make_context():
        return inner(*args, **kwargs)


# -- swapping linears -----------------------------------------------------------------------------


def _tied(model: nn.Module) -> set[int]:
    """ids of parameters reachable under more than one name (tied weights)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def convertible(module: nn.Module, skip: set[int], tied: set[int]) -> bool:
    """An ``nn.Linear`` FP8 GEMMs can take: in/out features multiples of 16, not skipped, its
    weight not tied to another module."""
    return (
        type(module) is nn.Linear
        and module.in_features % ALIGN == 0
        and module.out_features % ALIGN == 0
        and id(module) not in skip
        and id(module.weight) not in tied
    )


@torch.no_grad()
def swap_te_linears(root: nn.Module, te, skip: tuple[nn.Module, ...] = ()) -> list[str]:
    """Replace every convertible ``nn.Linear`` under ``root`` by a ``te.Linear`` holding the
    same weights (dtype, device, ``requires_grad`` kept). Returns the swapped names."""
    skip_ids, tied = {id(m) for m in skip}, _tied(root)
    swapped = []
    for name, module in list(root.named_modules()):
        if not convertible(module, skip_ids, tied):
            continue
        w = module.weight
        new = te.Linear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            params_dtype=w.dtype,
            device=w.device,
        )
        new.weight.copy_(w)
        new.weight.requires_grad_(w.requires_grad)
        if module.bias is not None:
            new.bias.copy_(module.bias)
            new.bias.requires_grad_(module.bias.requires_grad)
        new.train(module.training)
        if hasattr(module, "_twotower_layer"):  # the registry's layer tag (registry.py)
            new._twotower_layer = module._twotower_layer
        parent, _, attr = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, attr, new)
        swapped.append(name)
    return swapped


def trained_tower(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """``(the module that trains, its LM head)``: the denoiser of a two-tower model, or the
    whole HF model for the AR objective."""
    tower = getattr(model, "denoiser", model)
    head_of = getattr(tower, "model", tower)
    return tower, head_of.get_output_embeddings()


def apply_precision(
    model: nn.Module, p: PrecisionConfig, plan: PrecisionPlan
) -> Callable[[], AbstractContextManager] | None:
    """Apply ``plan`` to ``model`` (a ``TwoTowerModel`` or an HF causal LM), in place.
    Returns the autocast the trained tower's forward runs in (None without one): an
    activation recompute must run in it too."""
    tower, head = trained_tower(model)
    skip = (head,) if head is not None else ()
    if plan.backend == PrecisionBackend.torchao:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        skip_ids, tied = {id(m) for m in skip}, _tied(tower)
        convert_to_float8_training(
            tower,
            module_filter_fn=lambda mod, fqn: convertible(mod, skip_ids, tied),
            config=Float8LinearConfig.from_recipe_name("tensorwise"),
        )
        return None
    if plan.backend != PrecisionBackend.te:
        return None
    te, recipes = import_te()
    swap_te_linears(tower, te, skip)
    autocast = None
    if plan.fp8:
        autocast = autocast_factory(te, fp8_recipe(p, recipes))
        run_inside(tower, autocast)
    context = getattr(model, "context", None)
    if p.context_fp8 and context is not None:
        swap_te_linears(context, te, (context.backbone.get_output_embeddings(),))
        run_inside(context, autocast_factory(te, context_recipe(p, recipes)))
    return autocast
