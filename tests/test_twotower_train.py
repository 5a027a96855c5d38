"""The two-tower objective through the real engine: frozen context tower, both
families end to end, exact resume of the random masking."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, losses, read_metrics, run_cli

from twotower_train.backbones import load_backbone, load_tokenizer
from twotower_train.config import compose
from twotower_train.engine.distributed import init_distributed
from twotower_train.run.train import build_objective, engine_for, train

# A random tiny Llama (scratch) as backbone, trained as a two-tower model.
TT = [
    *TINY,
    "train.objective=twotower",
    "distill=kd",
    "denoiser.block_size=8",
    "precision=fp32",
    "train.log_every=1",
]


def test_context_tower_is_frozen_and_out_of_the_optimizer() -> None:
    init_distributed()
    cfg = compose([*TT, "train.micro_batch_size=2"])
    tokenizer = load_tokenizer(cfg.backbone)
    module = build_objective(cfg, load_backbone(cfg.backbone, tokenizer), tokenizer)
    ctx_params = list(module.model.context.parameters())
    assert ctx_params and not any(p.requires_grad for p in ctx_params)
    before = [p.detach().clone() for p in ctx_params]
    engine, optimizer, _ = engine_for(module, cfg)
    ids = torch.randint(3, 2048, (2, 32))
    batch = {"input_ids": ids, "loss_mask": torch.ones_like(ids, dtype=torch.bool)}
    for _ in range(2):
        out = engine(batch)
        engine.backward(out["loss"])
        engine.step()
    assert set(out) >= {"loss", "ce", "kd", "masked_acc"}
    assert all(p.grad is None for p in ctx_params)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, ctx_params))
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in ctx_params}
    den = [p for p in module.model.denoiser.parameters()]
    assert in_opt == {id(p) for p in den}


LEVERS = [
    "diffusion.block_curriculum=[4]",
    "diffusion.complementary=true",
    "diffusion.suffix_prob=0.5",
]


@pytest.mark.parametrize("levers", [[], LEVERS], ids=["plain", "levers"])
def test_two_tower_training_resumes_exactly(tmp_path: Path, levers: list[str]) -> None:
    """A run stopped at step 3 and resumed logs the losses of an uninterrupted one (with the
    levers: the curriculum's block size follows the step, so the resumed half trains at 8)."""
    args = [*TT, *levers, "train.steps=6", "train.ckpt_every=3"]
    train(compose([*args, f"run.dir={tmp_path / 'ref'}"]))
    split = tmp_path / "split"
    train(compose([*args, "train.stop_after=3", f"run.dir={split}"]))
    train(compose([*args, f"run.dir={split}"]))
    want, got = losses(tmp_path / "ref"), losses(split)
    assert sorted(got) == list(range(1, 7))
    for step in range(4, 7):
        assert got[step] == want[step], step
    assert want[6] < want[1]


SMALL_EVAL = [
    "eval.max_examples_per_task=3",
    "eval.speed_examples=2",
    "eval.threshold_sweep=[0.8]",
    "eval.elbo_samples=1",
    "eval.tasks=[add,recall,perplexity]",
]


@pytest.mark.slow
def test_nemotron_h_two_tower_end_to_end(tmp_path: Path) -> None:
    """Shipped Nemotron-H backbone: Mamba state seeding through the engine, bf16, then the
    retained-performance report, the release folder, and mode=eval on it."""
    train(
        compose(
            [
                "recipe=tiny_nemotron_h",
                "data.seq_len=32",
                "data.val_sequences=4",
                "train.micro_batch_size=2",
                "train.steps=2",
                "train.log_every=1",
                *SMALL_EVAL,
                f"run.dir={tmp_path / 'run'}",
            ]
        )
    )
    records = read_metrics(tmp_path / "run")
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    for key in ("retained", "retained_mean_of_ratios", "tokens_per_forward", "speedup_vs_ar"):
        assert key in report
    assert {t["name"] for t in report["tasks"]} >= {"add", "recall"}
    assert (tmp_path / "run" / "release" / "denoiser.safetensors").is_file()
    # the model card says what the run did and what the harness measured
    card = (tmp_path / "run" / "release" / "README.md").read_text()
    assert "recipe: `tiny_nemotron_h`" in card and "base_model: tiny_nemotron_h" in card
    assert f"**{report['retained']:.3f}**" in card and "| add | exact_match |" in card
    assert (tmp_path / "run" / "release" / "retained_vs_tokens_per_forward.png").is_file()
    # mode=eval scores the released folder again, from the command line.
    # (any-order commits, no speed rows: the report says so and the summary line copes)
    proc = run_cli(
        [
            "recipe=tiny_nemotron_h",
            "mode=eval",
            *SMALL_EVAL,
            "eval.speed_examples=0",
            "eval.order=any",
            f"run.dir={tmp_path / 'run'}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "retained" in proc.stdout
    again = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert again["order"] == "any" and again["speedup_vs_ar"] is None
    assert report["order"] == "prefix"  # the default
    assert "order any" in (tmp_path / "run" / "eval" / "report.md").read_text()
    # the decode-mirroring validation metrics were logged at the end of training
    assert any("val_answer_exact" in r for r in records)
    steps = [r for r in records if "ce" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert any("val_masked_acc" in r for r in records)


def scratch(model_type: str, *extra: str) -> list[str]:
    """A random two-tower run on a scratch backbone of ``model_type`` (no code of ours knows
    the family)."""
    return [
        "recipe=tiny",
        f"backbone.name_or_path=tiny_{model_type}",
        "backbone.init=scratch",
        f"+backbone.config.model_type={model_type}",
        "+backbone.config.hidden_size=32",
        "+backbone.config.num_hidden_layers=2",
        "+backbone.config.num_attention_heads=4",
        "+backbone.config.num_key_value_heads=2",
        "+backbone.config.intermediate_size=64",
        "+backbone.config.head_dim=8",
        *extra,
        "data.seq_len=32",
        "data.val_sequences=8",
        "train.micro_batch_size=4",
        "train.steps=2",
        "train.log_every=1",
        "train.eval_at_end=false",
        "optim.warmup_steps=1",
    ]


def test_a_family_without_code_here_trains_and_a_refused_one_says_why(tmp_path: Path) -> None:
    """Gemma3 (sliding-window + global layers, post-norms) trains from the command line with
    no family-specific code; gpt-oss (attention sinks) is refused in one line, exit 2."""
    run = tmp_path / "gemma"
    proc = run_cli(
        scratch(
            "gemma3_text",
            "+backbone.config.sliding_window=8",
            "+backbone.config.layer_types=[sliding_attention,full_attention]",
            f"run.dir={run}",
        )
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = [r for r in read_metrics(run) if "ce" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    proc = run_cli(
        scratch("gpt_oss", "+backbone.config.num_local_experts=4", f"run.dir={tmp_path / 'oss'}")
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(
        "twotower_train: error: backbone model_type 'gpt_oss' not supported"
    )
    assert "'s_aux'" in lines[-1]
    assert not (tmp_path / "oss" / "checkpoints").exists()


def _objective_loss(after_eos: str, clean: torch.Tensor, seed: int = 0) -> float:
    """The objective's loss with (almost surely) every position masked."""
    init_distributed()
    cfg = compose(
        [
            *TT,
            "distill=none",
            "diffusion.mask_range=[0.9999,1.0]",
            f"diffusion.after_eos={after_eos}",
        ]
    )
    tokenizer = load_tokenizer(cfg.backbone)
    torch.manual_seed(0)
    module = build_objective(cfg, load_backbone(cfg.backbone, tokenizer), tokenizer)
    end = (clean == tokenizer.eos_token_id).long()
    batch = {
        "input_ids": clean,
        "loss_mask": torch.ones_like(clean, dtype=torch.bool),
        "doc_ids": torch.cumsum(end, 1) - end,
    }
    torch.manual_seed(seed)
    with torch.no_grad():
        return module(batch)["loss"].item()


@pytest.mark.parametrize("after_eos,moves", [("ignore", False), ("eos", False), ("keep", True)])
def test_after_eos_positions_in_the_loss(after_eos: str, moves: bool) -> None:
    """Positions after an EOS inside the last block belong to the next document: with
    ``ignore`` / ``eos`` the loss cannot depend on their clean tokens, with ``keep`` it does."""
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(3, 2048, (2, 32), generator=g)
    clean[:, 27] = 1  # EOS inside the last block (positions 24..31)
    other = clean.clone()
    other[:, 28:] = torch.randint(3, 2048, (2, 4), generator=g)
    a, b = _objective_loss(after_eos, clean), _objective_loss(after_eos, other)
    assert (abs(a - b) > 1e-4) == moves, (a, b)


def test_rerunning_a_finished_run_is_a_no_op(tmp_path: Path) -> None:
    """The same command again on a finished run: resumes at the last step, trains nothing,
    exits cleanly (and exports again)."""
    args = [*TT, "train.steps=2", "eval.tasks=[]", f"run.dir={tmp_path / 'run'}"]
    train(compose(args))
    before = losses(tmp_path / "run")
    train(compose(args))
    assert losses(tmp_path / "run") == before
    assert (tmp_path / "run" / "release" / "denoiser.safetensors").is_file()


def test_bench_levers_times_every_lever(capsys) -> None:
    from twotower_train.tools import bench

    overrides = [ov for ov in TT if not ov.startswith("recipe=")]
    assert bench.main(["levers", "--steps", "1", "--warmup", "0", *overrides]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bench"] == "levers" and result["base"]["ratio"] == 1.0
    assert {"complementary", "suffix_prob=0.5", "block 4 (curriculum stage)"} <= set(result)


def test_bench_objectives_steps_ar_and_two_tower_in_turn(capsys) -> None:
    from twotower_train.tools import bench

    small = ["--steps", "1", "--warmup", "0", "data.seq_len=64", "train.micro_batch_size=2"]
    assert bench.main(["objectives", *small, "precision=fp32", "deepspeed=zero0"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rates = result["tokens_per_s"]
    assert set(rates) == {"ar", "twotower"} and min(rates.values()) > 0
    assert result["ratio"] == pytest.approx(rates["twotower"] / rates["ar"])


def test_bench_compare_against_a_git_ref(capsys) -> None:
    """`bench compare` extracts a ref's package, imports it beside this one and times both on
    the same inputs; a ref that does not exist is one line, exit 2."""
    from twotower_train.tools import bench

    small = ["--steps", "1", "--rounds", "1", "--calls", "1", "--batch", "2", "--seq-len", "32"]
    assert bench.main(["compare", "--ref", "HEAD", *small]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bench"] == "compare" and result["train_ratio"] > 0
    assert set(result["decode_ms"]) == {"prefill 24", "AR step", "denoiser block", "context chunk"}
    assert not any(m.startswith("twotower_train_ref") for m in sys.modules)
    assert bench.main(["compare", "--ref", "no-such-ref-x", *small]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("twotower_train.tools.bench: error: cannot extract twotower_train/")


@pytest.mark.parametrize(
    "shape, params, vocab",
    [
        ("smollm2_135m", 134.5e6, 49152),
        ("qwen3_0_6b", 596.0e6, 151936),
        ("gemma3_270m", 268.1e6, 262144),
    ],
)
def test_bench_memory_shapes_are_the_published_architectures(shape, params, vocab) -> None:
    """`bench memory --shape` builds the published architecture (random weights): its
    parameter count and vocabulary, on the meta device here."""
    from twotower_train.config import compose
    from twotower_train.run.plan import meta_model
    from twotower_train.tools.bench import shape_overrides

    model = meta_model(compose(["recipe=tiny", *shape_overrides(shape)]))
    backbone = model.backbone
    assert sum(p.numel() for p in backbone.parameters()) == pytest.approx(params, rel=2e-3)
    assert backbone.get_output_embeddings().weight.shape[0] == vocab
    with pytest.raises(ValueError, match="unknown --shape"):
        shape_overrides("no_such_shape")


@pytest.mark.slow
def test_bench_memory_compare_runs_every_setting(capsys) -> None:
    """`bench memory --compare`: AR and two-tower, full logits and scored rows, one process
    each, on the tiny recipe."""
    from twotower_train.tools import bench

    small = ["--recipe", "tiny", "--steps", "1", "data.seq_len=64", "train.micro_batch_size=2"]
    assert bench.main(["memory", "--compare", *small, "deepspeed=zero0", "precision=fp32"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["settings"]) == set(bench.COMPARE_SETTINGS)
    assert all(
        r["step_peak_gib"] > 0 and r["tokens_per_s"] > 0 for r in result["settings"].values()
    )
