"""Where a released model runs and in which precision: ``--device`` / ``--dtype`` of
``python -m twotower_train.generate``, ``eval.device`` / ``eval.dtype`` of ``mode=eval``, and
the ``device=`` / ``dtype=`` model args of the lm-eval model (CPU here: cpu and bf16)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, subprocess_env
from tiny_models import tiny_backbone

from twotower_train.backbones import load_release
from twotower_train.config import ConfigError, compose
from twotower_train.decoding import DecodeConfig, diffusion_generate
from twotower_train.devices import DeviceError, parse_device, resolve_device, resolve_dtype
from twotower_train.model import TwoTowerModel
from twotower_train.release import save_release
from twotower_train.tiny_world import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

NO_CUDA = not torch.cuda.is_available()
PROMPTS = ["add 12 34 =", "copy a b c ="]


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """An fp32 release of a tiny random two-tower model over the tiny world's vocabulary."""
    model = TwoTowerModel.from_backbone(
        tiny_backbone("llama", vocab_size=2048), block_size=4, mask_token_id=2
    )
    path = tmp_path_factory.mktemp("devices") / "release"
    save_release(model.eval(), load_tokenizer(), path, dtype=torch.float32)
    return path


def test_device_and_dtype_names() -> None:
    assert parse_device(None) is None and parse_device("auto") is None
    assert parse_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device().type == ("cpu" if NO_CUDA else "cuda")
    assert (resolve_dtype("fp32"), resolve_dtype("bf16")) == (torch.float32, torch.bfloat16)
    for bad, message in [
        (lambda: parse_device("gpu"), "device 'gpu' is not one of cpu, cuda, mps, xpu"),
        (lambda: parse_device("cuda:x"), "device 'cuda:x' is not one of"),
        (lambda: resolve_dtype("fp16"), "dtype 'fp16' is not one of fp32, bf16"),
    ]:
        with pytest.raises(DeviceError) as err:
            bad()
        assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_a_missing_gpu_is_refused() -> None:
    with pytest.raises(DeviceError, match="^device cuda: this machine has no CUDA device$"):
        resolve_device("cuda")


def _generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "twotower_train.generate", *args],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )


def test_generate_device_and_dtype(release: Path) -> None:
    """``--device cpu --dtype bf16`` decodes what the bf16-loaded model decodes in process;
    a bad value is one line, exit 2, before any weights load."""
    model, tokenizer = load_release(release, dtype=torch.bfloat16)
    cfg = DecodeConfig(max_new_tokens=8)
    with torch.no_grad():
        want, _ = diffusion_generate(
            model, [tokenizer.encode(p) for p in PROMPTS], cfg, tokenizer.eos_token_id
        )
    base = [str(release), "--max-new-tokens", "8", "--json", *PROMPTS]
    proc = _generate(*base, "--device", "cpu", "--dtype", "bf16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [row["tokens"] for row in rows[:-1]] == want
    bad = [("--dtype", "fp16", "dtype 'fp16' is not one of fp32, bf16")]
    bad.append(("--device", "gpu", "device 'gpu' is not one of cpu, cuda, mps, xpu"))
    if NO_CUDA:
        bad.append(("--device", "cuda", "device cuda: this machine has no CUDA device"))
    for flag, value, message in bad:
        proc = _generate(*base, flag, value)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"twotower_train.generate: error: {message}")


SMALL_EVAL = [
    "eval.tasks=[add,tiny_world_mc]",
    "eval.max_examples_per_task=2",
    "eval.max_new_tokens=6",
    "eval.threshold_sweep=[0.95]",
    "eval.speed_examples=1",
]


def test_mode_eval_device_and_dtype(release: Path, tmp_path: Path, monkeypatch) -> None:
    from twotower_train.run import evaluate as run_evaluate

    args = ["mode=eval", f"run.dir={tmp_path}", f"eval.release={release}", *SMALL_EVAL]
    cfg = compose([*args, "eval.device=cpu", "eval.dtype=bf16"])
    assert (cfg.eval.device, cfg.eval.dtype.value) == ("cpu", "bf16")
    seen = []
    harness = run_evaluate.evaluate

    def spy(model, *a, **kw):
        seen.append({(p.device.type, p.dtype) for p in model.parameters()})
        return harness(model, *a, **kw)

    monkeypatch.setattr(run_evaluate, "evaluate", spy)
    report = run_evaluate.evaluate_run(cfg)
    assert seen == [{("cpu", torch.bfloat16)}]
    assert report["speed"]["device"] == "cpu" and "retained" in report
    assert compose(args).eval.dtype.value == "fp32" and compose(args).eval.device is None
    for override, message in [
        ("eval.device=gpu", "eval.device 'gpu' is not one of cpu, cuda, mps, xpu"),
        ("eval.dtype=fp16", "Invalid value 'fp16', expected one of [bf16, fp32]"),
    ]:
        with pytest.raises(ConfigError) as err:
            compose([*args, override])
        assert message in str(err.value) and "\n" not in str(err.value)
    if NO_CUDA:  # refused before the release is read
        with pytest.raises(DeviceError, match="this machine has no CUDA device"):
            run_evaluate.evaluate_run(compose([*args, "eval.device=cuda", "eval.release=/nope"]))


def test_lm_eval_model_device_and_dtype(release: Path) -> None:
    pytest.importorskip("lm_eval")
    from twotower_train.eval.lm_eval_adapter import LOCAL_TASKS, TwoTowerLM

    lm = TwoTowerLM.create_from_arg_string(f"release={release},device=cpu,dtype=bf16")
    assert {(p.device.type, p.dtype) for p in lm.model.parameters()} == {("cpu", torch.bfloat16)}
    request = SimpleNamespace(args=("add 12 34 =", " 46"))
    ((logp, _),) = lm.loglikelihood([request])
    assert torch.isfinite(torch.tensor(logp))
    # lm-eval's own --device, where the machine has it (its default is cuda:0); fp32 default
    lm = TwoTowerLM.create_from_arg_string(f"release={release}", {"device": "cpu"})
    assert {(p.device.type, p.dtype) for p in lm.model.parameters()} == {("cpu", torch.float32)}
    if NO_CUDA:
        lm = TwoTowerLM.create_from_arg_string(f"release={release}", {"device": "cuda:0"})
        assert {p.device.type for p in lm.model.parameters()} == {"cpu"}
        with pytest.raises(DeviceError, match="this machine has no CUDA device"):
            TwoTowerLM.create_from_arg_string(f"release={release},device=cuda")
    for args, message in [
        ("dtype=fp16", "dtype 'fp16' is not one of fp32, bf16"),
        ("device=gpu", "device 'gpu' is not one of cpu, cuda, mps, xpu"),
    ]:
        with pytest.raises(DeviceError) as err:
            TwoTowerLM.create_from_arg_string(f"release={release},{args}")
        assert str(err.value).startswith(message)
    proc = subprocess.run(
        [sys.executable, "-m", "twotower_train.eval.lm_eval_adapter"]
        + ["--model_args", f"release={release},dtype=fp16", "--tasks", "tiny_world_mc"]
        + ["--include_path", str(LOCAL_TASKS)],
        env=subprocess_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "twotower_train.eval.lm_eval_adapter: error: dtype 'fp16' is not one of fp32, bf16"
    )


def test_mode_eval_scores_the_untrained_copy(tmp_path: Path) -> None:
    """``eval.release=untrained``: the run's backbone with a fresh copy as denoiser, the
    baseline before training; the backbone's side is the backbone's own."""
    from twotower_train.run import evaluate as run_evaluate

    args = ["mode=eval", f"run.dir={tmp_path}", "eval.release=untrained", *SMALL_EVAL]
    report = run_evaluate.evaluate_run(compose(args))
    assert [t["name"] for t in report["tasks"]] == ["add", "tiny_world_mc"]
    assert (tmp_path / "eval" / "report.json").is_file()
    mc = next(t for t in report["tasks"] if t["name"] == "tiny_world_mc")
    assert 0.0 <= mc["twotower"] <= 1.0 and mc["backbone"] >= 0.0
