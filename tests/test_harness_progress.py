"""The harness's progress bars: every long phase shows one, and the report is the same
bit for bit with the bars on or off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import tiny_backbone

from twotower_train.eval import likelihood
from twotower_train.eval.harness import EvalConfig, evaluate
from twotower_train.model import TwoTowerModel
from twotower_train.tiny_world import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# What the bars must not change (timings aside).
DETERMINISTIC = ("tasks", "retained", "retained_mean_of_ratios", "tokens_per_forward", "sweep")


@pytest.fixture(scope="module")
def model() -> TwoTowerModel:
    backbone = tiny_backbone("llama", vocab_size=2048)  # the tiny world's vocabulary
    return TwoTowerModel.from_backbone(backbone, block_size=4, mask_token_id=2).eval()


def test_one_elbo_draw_per_call_is_all_draws_in_one(model: TwoTowerModel) -> None:
    """The harness draws the ELBO one sample at a time (a bar step each): draw s is seeded by
    seed + s alone, so the values are exactly those of one call for all draws."""
    rows = torch.randint(3, 2000, (5, 16), generator=torch.Generator().manual_seed(0))
    mean, draws = likelihood.diffusion_elbo(model, rows, samples=3, seed=5, batch_size=2)
    one_by_one = [
        likelihood.diffusion_elbo(model, rows, samples=1, seed=5 + s, batch_size=2)[1][0]
        for s in range(3)
    ]
    assert one_by_one == draws and sum(one_by_one) / 3 == mean


def test_bars_show_every_phase_and_change_nothing(
    model: TwoTowerModel, tmp_path: Path, monkeypatch, capsys
) -> None:
    cfg = EvalConfig(
        tasks=["add", "tiny_world_mc", "perplexity"],
        max_examples_per_task=2,
        max_new_tokens=6,
        threshold=0.8,
        threshold_sweep=[0.5, 0.8],
        elbo_samples=2,
        speed_examples=2,
        perplexity_seq_len=16,
        verify=True,
    )
    reports, errs = {}, {}
    for shown in ("0", "1"):
        monkeypatch.setenv("TWOTOWER_PROGRESS", shown)
        reports[shown] = evaluate(model, load_tokenizer(), cfg, tmp_path / shown)
        errs[shown] = capsys.readouterr().err
    for key in DETERMINISTIC:
        assert reports["0"][key] == reports["1"][key], key
    assert reports["0"]["verified"]["tasks"] == reports["1"]["verified"]["tasks"]
    assert "[twotower_train]" not in errs["0"]
    for phase in (
        "generation, 2 prompts: backbone, then 2 threshold(s)",
        "speed, batch 1",
        "verified decoding, 2 prompts",
        "speed (verified), batch 1",
        "tiny_world_mc, ",
        "perplexity, 2 rows: backbone NLL, then 2 ELBO draw(s)",
    ):
        assert f"[twotower_train] {phase}" in errs["1"], phase
