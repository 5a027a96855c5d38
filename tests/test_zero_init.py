"""Building a run partitioned under ZeRO-3 (``deepspeed.zero_init``, engine/zero_init.py):
the same model, losses and trained weights as building it whole, each rank holding only its
slice from the start, tied weights tied, and one-line refusals for what it cannot do."""

from __future__ import annotations

import pytest
import torch
from conftest import SHIPPED_TWO_TOWER_ZERO3, TINY_TWO_TOWER_ZERO3, run_torchrun

from twotower_train.config import ConfigError, compose
from twotower_train.engine.zero_init import is_partitioned
from twotower_train.run.train import setup


def _two_steps(run) -> list[float]:
    out = []
    for _ in range(2):
        loss = run.engine(run.next_batch())["loss"]
        run.engine.backward(loss)
        run.engine.step()
        out.append(loss.item())
    return out


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([], id="llama"),
        # the options that add modules or ties to the denoiser's copy
        pytest.param(
            ["denoiser.time_conditioning=true", "denoiser.tie_head=true"], id="llama-opts"
        ),
        # top 5 of 8 hybrid layers (Mamba-2, MoE, attention, MLP): the kept layers by index
        pytest.param(
            [
                "backbone.name_or_path=tiny_nemotron_h",
                "denoiser.layers=5",
                "denoiser.mamba_bidirectional=true",
            ],
            id="nemotron_h",
        ),
    ],
)
def test_a_partitioned_build_trains_like_a_whole_one(extra) -> None:
    runs, got, models = {}, {}, {}
    for zero_init in (True, False):
        run = setup(
            compose([*SHIPPED_TWO_TOWER_ZERO3, *extra, f"deepspeed.zero_init={zero_init}"]), None
        )
        params = list(run.objective.parameters())
        assert all(is_partitioned(p) for p in params)  # both end partitioned by DeepSpeed
        # no template copy: built partitioned, or trained in fp32 (live weights are exact)
        assert run.cfg.precision.dtype.value == "fp32"
        assert next(run.template.parameters()).is_meta
        runs[zero_init] = (run.n_params, run.flops_per_sequence)
        got[zero_init] = _two_steps(run)
        trained = run.trained_model()
        models[zero_init] = {
            **trained.state_dict(),
            **{f"buffer:{k}": v for k, v in trained.named_buffers()},
        }
    assert runs[True] == runs[False]
    assert got[True] == got[False]
    a, b = models[True], models[False]
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["shard", "replicate"])
def test_each_of_two_ranks_holds_only_its_slice(placement) -> None:
    args = [*SHIPPED_TWO_TOWER_ZERO3, f"deepspeed.context_placement={placement}"]
    proc = run_torchrun(2, args, script="tests/zero_init_probe.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert f"probe rank {rank}: " in proc.stdout


def test_tied_embeddings_stay_tied_in_the_trained_model() -> None:
    tied = [*TINY_TWO_TOWER_ZERO3, "+backbone.config.tie_word_embeddings=true", "eval.tasks=[]"]
    run = setup(compose(tied), None)
    _two_steps(run)
    model = run.trained_model()
    for tower in (model.context.backbone, model.denoiser.model):
        head, embed = tower.get_output_embeddings().weight, tower.get_input_embeddings().weight
        assert head is embed and not head.is_meta
    assert not any(t.is_meta for t in model.state_dict().values())
    ids = torch.randint(0, 100, (1, 16))
    assert torch.isfinite(model(ids, ids)).all()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("precision.backend=te", "precision.backend=te swaps linear layers"),
        ("denoiser.context_dtype=bf16", "denoiser.context_dtype=bf16 differs"),
    ],
)
def test_what_a_partitioned_build_cannot_do_is_refused(override, message) -> None:
    with pytest.raises(ConfigError, match=message):
        compose([*TINY_TWO_TOWER_ZERO3, override])
    compose([*TINY_TWO_TOWER_ZERO3, override, "deepspeed.zero_init=false"])  # whole: fine


def test_zero3_gather_limits_reach_deepspeed_and_the_plan() -> None:
    """deepspeed.max_live_parameters / max_reuse_distance / prefetch_bucket_size are
    DeepSpeed's stage3_* keys; the plan's ZeRO-3 buffers follow them."""
    from twotower_train.run.plan import estimate, meta_model, model_shape

    knobs = [
        "deepspeed.max_live_parameters=123456",
        "deepspeed.max_reuse_distance=654321",
        "deepspeed.prefetch_bucket_size=7777",
    ]
    run = setup(compose([*TINY_TWO_TOWER_ZERO3, *knobs]), None)
    engine = run.engine
    assert engine.zero_max_live_parameters() == 123456
    assert engine.zero_max_reuse_distance() == 654321
    assert engine.zero_prefetch_bucket_size() == 7777
    plan = ["recipe=qwen3_0_6b", "plan.gpus=2"]
    shape = model_shape(meta_model(compose(plan)))
    default = estimate(shape, compose(plan), 3, False).buffers
    lowered = compose([*plan, "deepspeed.max_live_parameters=1", "deepspeed.max_reuse_distance=1"])
    # only the largest module (the tied 151936 x 1024 embedding) stays gathered
    low = estimate(shape, lowered, 3, False).buffers
    assert low < default
    w = lowered.precision.dtype.torch.itemsize
    assert low == w * (shape.largest_module + 50_000_000 + 50_000_000)
    with pytest.raises(ConfigError, match="deepspeed.max_live_parameters must be >= 0"):
        compose([*TINY_TWO_TOWER_ZERO3, "deepspeed.max_live_parameters=-1"])
