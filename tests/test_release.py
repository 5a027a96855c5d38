"""Released two-tower models: the round trip for every setting, the errors, and every entry
point that loads a release (``from_release``, lm-eval adapter and CLI, decode benchmark)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, subprocess_env
from tiny_models import tiny_backbone

from twotower_train.backbones import load_release
from twotower_train.model import TwoTowerConfig, TwoTowerModel
from twotower_train.model.pretrained import CONFIG_FILE, DENOISER_FILE, FORMAT_VERSION
from twotower_train.release import save_release
from twotower_train.tiny_world import load_tokenizer
from twotower_train.tools.bench_decode import _build as build_bench_model
from twotower_train.tools.bench_decode import add_args as bench_args

pytestmark = pytest.mark.usefixtures("one_thread")

MASK = 2  # the tiny world's [MASK]


def trained(family: str = "llama", **settings) -> TwoTowerModel:
    """A two-tower model whose denoiser differs from the backbone copy (as after training)."""
    backbone = tiny_backbone(family, vocab_size=2048)
    model = TwoTowerModel.from_backbone(backbone, block_size=4, mask_token_id=MASK, **settings)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.denoiser.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return model.eval()


def outputs(model: TwoTowerModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(3, 2000, (2, 16), generator=g)
    noisy = clean.masked_fill(torch.rand(clean.shape, generator=g) < 0.5, MASK)
    t = torch.rand(2, generator=g) if model.config.time_conditioning else None
    with torch.no_grad():
        return model(clean, noisy, t=t)


@pytest.mark.parametrize(
    "family,settings",
    [
        ("llama", {}),
        ("llama", {"tie_head": True}),
        ("qwen3", {"layers": 2}),
        ("llama", {"time_conditioning": True}),
        ("nemotron_h", {"mamba_bidirectional": True, "context_dtype": "bf16"}),
    ],
    ids=str,
)
def test_round_trip_is_exact_and_pickle_free(tmp_path: Path, family, settings) -> None:
    model = trained(family, **settings)
    tokenizer = load_tokenizer()
    save_release(model, tokenizer, tmp_path / "release", dtype=torch.float32)
    files = [p.name for p in (tmp_path / "release").rglob("*") if p.is_file()]
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    stored = json.loads((tmp_path / "release" / CONFIG_FILE).read_text())
    assert stored.pop("format_version") == FORMAT_VERSION
    reference = stored.pop("backbone")
    assert stored.pop("model_type") == "twotower" and stored.pop("architectures")
    assert stored.pop("library_name") == "twotower_train"
    assert stored.pop("dtype") == "float32"
    assert stored.pop("decoding")["threshold"] == 0.95
    assert set(reference["sha256"]) == {"model.safetensors"}
    assert TwoTowerConfig.from_dict(stored) == model.config
    card = (tmp_path / "release" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: twotower_train\n")
    for section in ("## Backbone", "## Training", "## Results", "## Use", "## Limitations"):
        assert section in card
    assert reference["sha256"]["model.safetensors"] in card
    loaded, tok = load_release(tmp_path / "release")
    assert loaded.config == model.config
    assert tok.mask_token_id == MASK and tok.encode("add 1 2 =") == tokenizer.encode("add 1 2 =")
    torch.testing.assert_close(outputs(loaded), outputs(model), rtol=0, atol=0)
    again = TwoTowerModel.from_release(tmp_path / "release")
    torch.testing.assert_close(outputs(again), outputs(model), rtol=0, atol=0)
    if settings.get("tie_head"):
        assert loaded.denoiser.head.weight is loaded.denoiser.embed.weight


def bf16_exact(model: TwoTowerModel) -> TwoTowerModel:
    """``model`` with every weight rounded to bf16 (what a default release stores)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


def test_bf16_is_the_default(tmp_path: Path) -> None:
    from safetensors import safe_open

    model = trained()
    save_release(model, load_tokenizer(), tmp_path / "release")
    for file in (tmp_path / "release").rglob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}, file  # noqa: SIM118
    assert json.loads((tmp_path / "release" / CONFIG_FILE).read_text())["dtype"] == "bfloat16"
    loaded, _ = load_release(tmp_path / "release")
    for name, p in loaded.denoiser.state_dict().items():  # loaded in fp32, bf16-exact values
        want = model.denoiser.state_dict()[name].to(torch.bfloat16).float()
        assert p.dtype == torch.float32 and torch.equal(p, want), name
    torch.testing.assert_close(outputs(loaded), outputs(bf16_exact(model)), rtol=0, atol=0)


def test_sharded_release(tmp_path: Path) -> None:
    """Past ``max_shard_size`` both towers are split with HF's index layout; exact."""
    model = trained(tie_head=True)
    path = save_release(
        model, load_tokenizer(), tmp_path / "release", dtype=torch.float32, max_shard_size="300KB"
    )
    shards = sorted(p.name for p in path.glob("denoiser-*.safetensors"))
    assert len(shards) > 1 and not (path / DENOISER_FILE).exists()
    index = json.loads((path / "denoiser.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert (path / "backbone" / "model.safetensors.index.json").is_file()
    stored = json.loads((path / CONFIG_FILE).read_text())["backbone"]["sha256"]
    assert len(stored) > 1 and all(name.startswith("model-") for name in stored)
    loaded, _ = load_release(path)
    torch.testing.assert_close(outputs(loaded), outputs(model), rtol=0, atol=0)
    lost = shards[-1]
    (path / lost).unlink()
    with pytest.raises(FileNotFoundError, match=f"{lost} is missing"):
        load_release(path)
    with pytest.raises(ValueError, match="max_shard_size 'lots' is not a size"):
        save_release(model, None, tmp_path / "other", max_shard_size="lots")


def saved_backbone(folder: Path):
    """A tiny backbone written to ``folder`` and loaded back (its name_or_path: the folder)."""
    from transformers import AutoModelForCausalLM

    tiny_backbone("llama", vocab_size=2048).save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def test_reference_only_release(tmp_path: Path) -> None:
    """``backbone="reference"``: no backbone/ folder; loading finds the backbone where the
    reference points (or at ``backbone_path``) and refuses one whose sha256 differs."""
    from transformers import AutoModelForCausalLM

    source = tmp_path / "llama"
    model = TwoTowerModel.from_backbone(saved_backbone(source), block_size=4, mask_token_id=MASK)
    with torch.no_grad():
        for p in model.denoiser.parameters():
            p.add_(0.01)
    path = tmp_path / "release"
    save_release(model.eval(), load_tokenizer(), path, dtype=torch.float32, backbone="reference")
    assert not (path / "backbone").exists()
    reference = json.loads((path / CONFIG_FILE).read_text())["backbone"]
    assert reference["bundled"] is False and reference["name_or_path"] == str(source)
    assert set(reference["sha256"]) == {"model.safetensors"}
    assert "reference-only release" in (path / "README.md").read_text()
    loaded, _ = load_release(path)
    torch.testing.assert_close(outputs(loaded), outputs(model), rtol=0, atol=0)

    moved = tmp_path / "elsewhere"
    source.rename(moved)
    with pytest.raises(FileNotFoundError, match="references backbone .* which was not found"):
        load_release(path)
    again, _ = load_release(path, backbone_path=moved)
    torch.testing.assert_close(outputs(again), outputs(model), rtol=0, atol=0)
    other = AutoModelForCausalLM.from_pretrained(moved)
    with torch.no_grad():
        other.lm_head.weight.add_(1e-3)
    other.save_pretrained(moved)
    with pytest.raises(ValueError, match="sha256 does not match .* refusing a different backbone"):
        load_release(path, backbone_path=moved)


def test_reference_needs_a_backbone_on_disk(tmp_path: Path) -> None:
    """A backbone built in memory cannot be referenced: one line, nothing written."""
    with pytest.raises(ValueError, match="needs a backbone loaded from a folder or the hub"):
        save_release(trained(), load_tokenizer(), tmp_path / "release", backbone="reference")
    assert list(tmp_path.iterdir()) == []


def test_push_to_hub_uploads_the_finished_folder(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from twotower_train.release import publish

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw["repo_id"], kw["folder_path"]))

    path = save_release(trained(), load_tokenizer(), tmp_path / "release")
    cfg = SimpleNamespace(push_to_hub="me/tiny-twotower", hub_private=True)
    assert publish(path, cfg, api=FakeApi()) == "https://huggingface.co/me/tiny-twotower"
    assert calls == [
        ("create_repo", "me/tiny-twotower", {"private": True, "exist_ok": True}),
        ("upload_folder", "me/tiny-twotower", str(path)),
    ]
    assert publish(path, SimpleNamespace(push_to_hub=None), api=FakeApi()) is None

    class Offline(FakeApi):
        def create_repo(self, repo_id, **kw):
            raise ConnectionError("no network\nretries exhausted")

    with pytest.raises(ValueError, match=r"^cannot publish .* no network \(the folder is complete"):
        publish(path, cfg, api=Offline())
    assert (path / CONFIG_FILE).is_file()


def test_release_errors(tmp_path: Path) -> None:
    path = tmp_path / "release"
    save_release(trained(), load_tokenizer(), path)
    config = json.loads((path / CONFIG_FILE).read_text())
    (path / CONFIG_FILE).write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99 is not supported"):
        load_release(path)
    (path / CONFIG_FILE).write_text(json.dumps({**config, "denoiser_layer": 2}))
    with pytest.raises(ValueError, match="unknown two-tower setting"):
        load_release(path)
    (path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="is corrupt"):
        load_release(path)
    (path / CONFIG_FILE).write_text(
        json.dumps({k: v for k, v in config.items() if k != "mask_token_id"})
    )
    with pytest.raises(ValueError, match="lacks the setting 'mask_token_id'"):
        load_release(path)
    (path / CONFIG_FILE).write_text(json.dumps(config))
    whole = (path / DENOISER_FILE).read_bytes()
    (path / DENOISER_FILE).write_bytes(whole[: len(whole) // 2])  # truncated
    with pytest.raises(ValueError, match="denoiser.safetensors is corrupt"):
        load_release(path)
    (path / DENOISER_FILE).write_bytes(b"junk")
    with pytest.raises(ValueError, match="is corrupt"):
        load_release(path)
    (path / DENOISER_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="denoiser.safetensors is missing"):
        load_release(path)


# Formats 1-2 stored the denoiser's parts under their own names, not the HF model's.
LEGACY_NAMES = {
    "qwen3": {"model.model.embed_tokens.": "embed.", "model.model.layers.": "layers.",
              "model.model.norm.": "norm.", "model.lm_head.": "head."},
    "nemotron_h": {"model.model.embeddings.": "embed.", "model.model.layers.": "layers.",
                   "model.model.norm_f.": "norm.", "model.lm_head.": "head."},
}  # fmt: skip


@pytest.mark.parametrize("version,family", [(1, "qwen3"), (2, "qwen3"), (2, "nemotron_h")])
def test_older_formats_still_load(tmp_path: Path, version, family) -> None:
    """Releases written before TwoTowerConfig (format 1) or before the denoiser was the HF
    model itself (format 2) keep loading, to the same outputs."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "release"
    settings = {"layers": 2, "tie_head": True}
    if family == "nemotron_h":
        settings = {"time_conditioning": True}
    model = trained(family, **settings)
    save_release(model, load_tokenizer(), path, dtype=torch.float32)  # those formats: fp32
    state = load_file(str(path / DENOISER_FILE))
    renames = LEGACY_NAMES[family]
    old = {}
    for key, value in state.items():
        prefix = next((p for p in renames if key.startswith(p)), "")
        old[renames.get(prefix, "") + key[len(prefix) :]] = value
    assert all(not k.startswith("model.") for k in old)
    save_file(old, str(path / DENOISER_FILE))
    config = {"format_version": 2, **model.config.to_dict()}
    if version == 1:
        config = {
            "format_version": 1,
            "block_size": 4,
            "mask_token_id": MASK,
            "denoiser_layers": 2,
            "tie_denoiser_head": True,
            "mamba_bidirectional": False,
            "time_conditioning": False,
            "context_dtype": None,
            "attn_impl": "sdpa",
            "shift_logits": True,
        }
    # written where those formats kept it
    (path / CONFIG_FILE).unlink()
    (path / "twotower_config.json").write_text(json.dumps(config))
    loaded, _ = load_release(path)
    assert loaded.config == model.config
    torch.testing.assert_close(outputs(loaded), outputs(model), rtol=0, atol=0)


def test_a_different_backbone_is_refused(tmp_path: Path) -> None:
    """The release pins its backbone by sha256; a swapped weight file is one clear line."""
    path = tmp_path / "release"
    save_release(trained(), load_tokenizer(), path)
    other = tiny_backbone("llama", seed=1, vocab_size=2048)
    other.save_pretrained(tmp_path / "other", safe_serialization=True)
    (path / "backbone" / "model.safetensors").write_bytes(
        (tmp_path / "other" / "model.safetensors").read_bytes()
    )
    with pytest.raises(ValueError, match="sha256 does not match the release's backbone reference"):
        load_release(path)
    (path / "backbone" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="backbone/model.safetensors is missing"):
        load_release(path)


def test_a_failed_save_leaves_the_old_release(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "release"
    model = trained()
    save_release(model, load_tokenizer(), path)
    before = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(model.backbone), "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_release(trained(), load_tokenizer(), path)
    assert {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()} == before


# -- entry points that load a release ------------------------------------------------------


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, TwoTowerModel]:
    path = tmp_path_factory.mktemp("rel") / "release"
    model = bf16_exact(trained())  # what the default (bf16) release holds
    save_release(model, load_tokenizer(), path)
    return path, model


def test_decode_benchmark_loads_the_trained_denoiser(release) -> None:
    path, model = release
    parser = argparse.ArgumentParser()
    bench_args(parser)
    loaded, _, _ = build_bench_model(parser.parse_args(["--release", str(path)]))
    for name, p in model.denoiser.state_dict().items():
        assert torch.equal(loaded.denoiser.state_dict()[name], p), name
    fresh, _, _ = build_bench_model(parser.parse_args(["--block-size", "8"]))
    assert fresh.block_size == 8


def test_decode_benchmark_times_every_decoder(release) -> None:
    from twotower_train.tools.bench_decode import run as bench_run

    path, _ = release
    parser = argparse.ArgumentParser()
    bench_args(parser)
    args = ["--release", str(path), "--prompts", "2", "--repeats", "1", "--max-new-tokens", "6"]
    out = bench_run(parser.parse_args([*args, "--thresholds", "0.9", "--verify", "--order", "any"]))
    assert out["order"] == "any"
    rows = {(r["decoder"], r["threshold"]): r for r in out["results"]}
    assert set(rows) == {("ar", None), ("diffusion", 0.9), ("verified", 0.9)}
    assert rows[("ar", None)]["speedup_vs_ar"] == 1.0
    assert all(r["tokens_per_s"] > 0 and r["new_tokens"] > 0 for r in rows.values())
    assert all("breakdown" not in r for r in rows.values())
    assert out["prompt_order"] == "tasks"


def test_decode_benchmark_against_transformers_own_loop(release) -> None:
    """--hf-baseline: AR through the framework and transformers' own cached greedy loop on
    the same backbone decode the same tokens; both are timed."""
    from twotower_train.tools.bench_decode import run as bench_run

    path, _ = release
    parser = argparse.ArgumentParser()
    bench_args(parser)
    args = ["--release", str(path), "--prompts", "2", "--repeats", "1", "--max-new-tokens", "5"]
    out = bench_run(parser.parse_args([*args, "--thresholds", "0.9", "--hf-baseline"]))
    hf = out["transformers_baseline"]
    assert hf["same_tokens"] is True
    assert hf["framework_ar_tokens_per_s"] > 0 and hf["transformers_tokens_per_s"] > 0


def test_decode_benchmark_takes_the_harness_prompts(release) -> None:
    """--prompt-order round-robin: the harness's speed subset (one prompt per task in turn)."""
    from twotower_train.eval import tasks
    from twotower_train.eval.harness import round_robin
    from twotower_train.tools.bench_decode import run as bench_run

    gen_tasks = tasks.of_kind(list(tasks.registry()), tasks.GenerationTask)
    examples = tasks.generation_examples(gen_tasks, 2)
    order = [ex["task"] for ex in round_robin(examples, examples)]
    assert order[: len(gen_tasks)] == [t.name for t in gen_tasks]  # each task once, in turn
    path, _ = release
    parser = argparse.ArgumentParser()
    bench_args(parser)
    argv = ["--release", str(path), "--prompts", "3", "--repeats", "1", "--max-new-tokens", "4"]
    out = bench_run(
        parser.parse_args([*argv, "--thresholds", "0.9", "--prompt-order", "round-robin"])
    )
    assert out["prompt_order"] == "round-robin" and out["prompts"] == 3


def test_decode_benchmark_breakdown_accounts_for_every_forward(release) -> None:
    """--breakdown: AR never calls the denoiser, plain diffusion extends the context only
    between blocks, verified decoding verifies every drafted block; the shares add up to
    the whole; the model gets its own methods back afterwards."""
    from twotower_train.tools.bench_decode import run as bench_run

    path, _ = release
    parser = argparse.ArgumentParser()
    bench_args(parser)
    args = ["--release", str(path), "--prompts", "3", "--repeats", "1", "--max-new-tokens", "6"]
    out = bench_run(parser.parse_args([*args, "--thresholds", "0.9", "--verify", "--breakdown"]))
    rows = {r["decoder"]: r["breakdown"] for r in out["results"]}
    for b in rows.values():
        shares = [b[f"{k}_share"] for k in ("prefill", "context", "denoiser", "loop")]
        assert sum(shares) == pytest.approx(1.0) and min(shares[:3]) >= 0
        assert b["prefill_calls_per_token"] > 0  # one prefill per prompt
    assert rows["ar"]["denoiser_calls_per_token"] == 0 and rows["ar"]["context_share"] > 0
    assert rows["diffusion"]["denoiser_calls_per_token"] > 0
    assert rows["verified"]["context_calls_per_token"] > 0  # the backbone verifies drafts
    from twotower_train.tools.bench_decode import ForwardTimer

    model, _, _ = build_bench_model(parser.parse_args(["--release", str(path)]))
    timer = ForwardTimer(model)
    assert "context_extend" in vars(model) and "denoise_block" in vars(model)
    timer.close()
    assert "context_extend" not in vars(model) and "denoise_block" not in vars(model)


def test_lm_eval_adapter_from_arg_string(release) -> None:
    pytest.importorskip("lm_eval")
    from twotower_train.eval import likelihood
    from twotower_train.eval.lm_eval_adapter import TwoTowerLM

    path, model = release
    lm = TwoTowerLM.create_from_arg_string(f"release={path},tower=twotower,batch_size=4")
    torch.testing.assert_close(outputs(lm.model), outputs(model), rtol=0, atol=0)
    pairs = [([5, 6, 7], [8, 9, 10])]
    assert lm._score(pairs) == likelihood.denoiser_loglikelihood(model, pairs, 4)


def test_the_lm_eval_hook_is_installed_with_the_package() -> None:
    """`pip install` (editable or not) puts twotower_train-lm_eval.pth in site-packages."""
    import site

    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    found = [d for d in dirs if (Path(d) / "twotower_train-lm_eval.pth").is_file()]
    assert found, f"no twotower_train-lm_eval.pth in {dirs}: reinstall (pip install -e .)"
    hook = (REPO / "twotower_train-lm_eval.pth").read_text()
    assert hook.startswith("import ") and "twotower_train.lm_eval_hook" in hook


def test_the_lm_eval_hook_is_quiet_when_the_package_is_gone() -> None:
    """A .pth left behind by a moved or half-removed install must not print a traceback in
    every interpreter: the line does nothing when the package cannot be imported."""
    import subprocess

    line = (REPO / "twotower_train-lm_eval.pth").read_text().strip()
    gone = line.replace("twotower_train.lm_eval_hook", "twotower_train_gone.lm_eval_hook")
    assert gone != line
    proc = subprocess.run(
        [sys.executable, "-c", gone + "; print('ok')"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok" and not proc.stderr, proc.stderr


def test_the_lm_eval_hook_imports_nothing_at_start_up() -> None:
    """The .pth runs in every interpreter: it must not import torch, lm-eval or us."""
    import subprocess

    code = "import sys; print(sorted(m for m in ('torch', 'lm_eval', 'transformers', 'twotower_train.eval') if m in sys.modules))"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env()
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


@pytest.mark.parametrize("tower", ["twotower", "backbone"])
def test_lm_eval_command_line_on_a_release(release, tmp_path: Path, tower) -> None:
    """lm-eval's own command line, `python -m lm_eval --model twotower` (= `lm_eval ...`),
    on a release folder, for both towers, offline on the local tasks."""
    pytest.importorskip("lm_eval")
    import subprocess

    path, _ = release
    tasks_dir = REPO / "twotower_train" / "eval" / "lm_eval_tasks"
    cmd = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "twotower",
        "--model_args",
        f"release={path},tower={tower},batch_size=4",
        "--tasks",
        "tiny_world_mc",
        "--include_path",
        str(tasks_dir),
        "--limit",
        "2",
        "--output_path",
        str(tmp_path / "out"),
    ]
    env = subprocess_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiny_world_mc" in proc.stdout


def test_generate_command_line_decodes_what_the_model_did_before_export(release) -> None:
    """`python -m twotower_train.generate RELEASE PROMPT...` (and prompts on stdin): the tokens
    the model generated before export, and the decode stats."""
    import subprocess

    from twotower_train.decoding import DecodeConfig, diffusion_generate

    path, model = release
    tokenizer = load_tokenizer()
    prompts = ["add 12 34 =", "copy a b c ="]
    cfg = DecodeConfig(max_new_tokens=8)
    with torch.no_grad():
        before, _ = diffusion_generate(
            model, [tokenizer.encode(p) for p in prompts], cfg, tokenizer.eos_token_id
        )
    cmd = [sys.executable, "-m", "twotower_train.generate", str(path), "--max-new-tokens", "8"]
    proc = subprocess.run(
        [*cmd, "--json", *prompts], env=subprocess_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [row["tokens"] for row in lines[:-1]] == before
    assert lines[-1]["stats"]["new_tokens"] > 0 and lines[-1]["stats"]["sequences"] == 2
    piped = subprocess.run(
        [*cmd, "--verify"],
        input="\n".join(prompts) + "\n",
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert len(piped.stdout.splitlines()) == 2 and "[verified]" in piped.stderr
    missing = subprocess.run(
        [*cmd[:3], str(path.parent / "nope"), "x"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"twotower_train.generate: error: {path.parent / 'nope'} is not a two-tower release: "
        "config.json is missing"
    ]


def test_model_card_results_carry_intervals() -> None:
    """The card's results table shows the harness's intervals (retained and per task)."""
    from twotower_train.eval.report import TaskScore, build_report
    from twotower_train.release.model_card import _results

    scores = [
        TaskScore("copy", "exact_match", 0.995, 0.955, n=200),
        TaskScore("perplexity", "perplexity", 3.6, 9.8, higher_is_better=False, n=200),
    ]
    report = build_report(
        scores, tokens_per_forward=3.4, speed=None, sweep=[], decode={}, config={}, wall_s=1.0
    )
    text = "\n".join(_results(report, {}))
    lo, hi = report["retained_interval"]
    assert f"(95% interval {lo:.3f}-{hi:.3f})" in text
    assert "| copy | exact_match | 0.995 | 0.955 [0.917, 0.976] | 0.960 |" in text
    assert "| perplexity * | perplexity | 3.600 | 9.800 | 0.367 |" in text  # no interval
    assert "binomial 95% (Wilson) intervals" in text
    # Reports written before intervals existed still render.
    for task in report["tasks"]:
        task.pop("twotower_interval", None)
    report.pop("retained_interval")
    assert "| copy | exact_match | 0.995 | 0.955 | 0.960 |" in "\n".join(_results(report, {}))
