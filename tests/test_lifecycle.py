"""A run's lifecycle: what a rerun in an existing run folder may do, checkpoint before
evaluation, atomic files, one-line errors, and the house's import arrows."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml
from conftest import TINY, losses, run_cli

from twotower_train.cli import compose_run, main
from twotower_train.config import ConfigError, compose, to_yaml
from twotower_train.errors import TwoTowerError
from twotower_train.files import atomic_write_text
from twotower_train.run import evaluate as run_evaluate
from twotower_train.run.run_dir import prepare_run_dir, training_changes
from twotower_train.run.train import _truncate_metrics, train

pytestmark = pytest.mark.usefixtures("one_thread")

TT = [
    *TINY,
    "train.objective=twotower",
    "denoiser.block_size=8",
    "precision=fp32",
    "train.log_every=1",
    "train.steps=2",
]
PACKAGE = Path(__file__).resolve().parents[1] / "twotower_train"


# -- the run folder ------------------------------------------------------------------------


def _finished_folder(path: Path, cfg) -> None:
    """A run folder as a run leaves it: config.yaml, metrics, a checkpoint."""
    (path / "checkpoints").mkdir(parents=True)
    (path / "checkpoints" / "latest").write_text("step_00000002")
    (path / "config.yaml").write_text(to_yaml(cfg))
    (path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')


def test_an_empty_folder_starts_fresh(tmp_path: Path) -> None:
    folder = prepare_run_dir(compose(TT), tmp_path / "run")
    assert not folder.resume and not folder.move_aside


def test_the_same_config_resumes_and_non_training_keys_may_change(tmp_path: Path) -> None:
    _finished_folder(tmp_path, compose(TT))
    cfg = compose([*TT, "eval.threshold=0.8", "train.log_every=5", "export.dtype=fp32"])
    folder = prepare_run_dir(cfg, tmp_path)
    assert folder.resume and not folder.move_aside and not folder.keep_old_config


def test_a_changed_training_key_is_refused_in_one_line_listing_it(tmp_path: Path) -> None:
    _finished_folder(tmp_path, compose(TT))
    before = {p.name: p.read_text() for p in tmp_path.iterdir() if p.is_file()}
    cfg = compose([*TT, "optim.lr=0.5", "diffusion.suffix_prob=0.5"])
    with pytest.raises(ConfigError) as err:
        prepare_run_dir(cfg, tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert "optim.lr" in msg and "diffusion.suffix_prob" in msg and "run.resume=changed" in msg
    assert "0.5" in msg
    # nothing was touched
    assert {p.name: p.read_text() for p in tmp_path.iterdir() if p.is_file()} == before


def test_training_changes_ignores_logging_eval_and_export() -> None:
    saved = yaml.safe_load(to_yaml(compose(TT)))
    cfg = compose(
        [*TT, "logger=wandb", "eval.tasks=[add]", "train.ckpt_every=7", "slurm.max_requeues=1"]
    )
    assert training_changes(saved, cfg) == []
    assert training_changes(saved, compose([*TT, "train.steps=3"])) == ["train.steps (2 -> 3)"]


def test_resume_changed_keeps_the_old_config(tmp_path: Path) -> None:
    _finished_folder(tmp_path, compose(TT))
    old = (tmp_path / "config.yaml").read_text()
    cfg = compose([*TT, "optim.lr=0.5", "run.resume=changed"])
    folder = prepare_run_dir(cfg, tmp_path)
    assert folder.resume
    folder.commit(to_yaml(cfg))
    kept = list(tmp_path.glob("config.before_*.yaml"))
    assert len(kept) == 1 and kept[0].read_text() == old
    assert "lr: 0.5" in (tmp_path / "config.yaml").read_text()


def test_restart_moves_the_old_run_aside(tmp_path: Path) -> None:
    _finished_folder(tmp_path, compose(TT))
    cfg = compose([*TT, "run.resume=restart"])
    folder = prepare_run_dir(cfg, tmp_path)
    assert not folder.resume and folder.move_aside
    folder.commit(to_yaml(cfg))
    (previous,) = (tmp_path / "previous").iterdir()
    assert (previous / "checkpoints" / "latest").is_file()
    assert (previous / "metrics.jsonl").read_text().startswith('{"step": 1')
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_a_folder_without_checkpoint_starts_over_keeping_its_files(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 3, "loss": 1.0}\n')
    folder = prepare_run_dir(compose(TT), tmp_path)
    assert not folder.resume and folder.move_aside


def test_a_rerun_with_another_learning_rate_is_refused_by_the_cli(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*TT, "eval.tasks=[]", "export.release=false", f"run.dir={run_dir}"]
    train(compose(args))
    config, metrics = (run_dir / "config.yaml").read_text(), (run_dir / "metrics.jsonl").read_text()
    proc = run_cli([*args, "optim.lr=0.5"])
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("twotower_train: error:") and "optim.lr" in line
    assert "Traceback" not in proc.stderr
    assert (run_dir / "config.yaml").read_text() == config
    assert (run_dir / "metrics.jsonl").read_text() == metrics


# -- checkpoint before evaluation ----------------------------------------------------------


def test_a_failed_final_evaluation_costs_no_training(tmp_path: Path, monkeypatch) -> None:
    """The last step checkpoints before it evaluates: an evaluation that crashes leaves the
    final checkpoint, and the rerun trains nothing, evaluates, then exports."""
    run_dir = tmp_path / "run"
    args = [*TT, "eval.tasks=[add]", "eval.max_examples_per_task=2", "eval.speed_examples=0"]
    args += ["eval.threshold_sweep=[]", "train.eval_at_end=true", f"run.dir={run_dir}"]

    def broken(*a, **k):
        raise MemoryError("out of memory during evaluation")

    monkeypatch.setattr("twotower_train.run.train.evaluate_trained", broken)
    with pytest.raises(MemoryError):
        train(compose(args))
    assert (run_dir / "checkpoints" / "latest").read_text().strip().endswith("2")
    assert not (run_dir / "release").exists()
    before = losses(run_dir)

    calls = []

    def counted(*a, **k):
        calls.append(1)
        return run_evaluate.evaluate_trained(*a, **k)

    monkeypatch.setattr("twotower_train.run.train.evaluate_trained", counted)
    train(compose(args))
    assert calls == [1] and losses(run_dir) == before
    assert (run_dir / "eval" / "report.json").is_file()
    assert (run_dir / "release" / "denoiser.safetensors").is_file()


# -- files ---------------------------------------------------------------------------------


def test_metrics_truncation_drops_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    _truncate_metrics(path, 2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]


def test_metrics_truncation_refuses_a_corrupt_middle_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    text = '{"step": 1}\nnot json\n{"step": 3}\n'
    path.write_text(text)
    with pytest.raises(TwoTowerError, match="metrics.jsonl: line 2 is not JSON"):
        _truncate_metrics(path, 2)
    assert path.read_text() == text


def test_an_interrupted_atomic_write_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "report.json"
    path.write_text("old")

    def dies(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr("os.replace", dies)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


# -- config checks before work --------------------------------------------------------------


@pytest.mark.parametrize(
    "override,words",
    [
        ("eval.tasks=[add,nope]", "unknown eval task(s) ['nope']"),
        ("eval.elbo_schedule=cubic", "elbo_schedule"),
        ("eval.threshold=1.5", "eval.threshold must be in [0, 1]"),
        ("eval.threshold_sweep=[0.5,2]", "eval.threshold_sweep[1]"),
        ("eval.max_new_tokens=0", "eval.max_new_tokens must be >= 1"),
        ("run.dist_timeout_s=0", "run.dist_timeout_s must be > 0"),
        ("run.resume=maybe", "resume"),
    ],
)
def test_eval_and_run_settings_are_checked_at_compose_time(override: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        compose_run([*TT, override])
    assert words in str(err.value) and "\n" not in str(err.value)


def test_the_process_group_timeout_reaches_torch(monkeypatch) -> None:
    import deepspeed
    import torch.distributed as dist

    from twotower_train.engine import distributed

    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: seen.update(kw))
    distributed.init_distributed(timeout_s=90)
    assert seen["timeout"].total_seconds() == 90


# -- errors ----------------------------------------------------------------------------------


def test_project_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys) -> None:
    def refuse(cfg):
        raise ConfigError("data.sources.0.path: no such file\nsecond line")

    monkeypatch.setattr("twotower_train.cli.run_mode", refuse)
    with pytest.raises(SystemExit) as exit_:
        main([*TT])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "twotower_train: error: data.sources.0.path: no such file"
    )

    def bug(cfg):
        raise ValueError("an internal shape mismatch")

    monkeypatch.setattr("twotower_train.cli.run_mode", bug)
    with pytest.raises(ValueError, match="internal shape mismatch"):
        main([*TT])


def test_every_error_class_of_the_project_is_a_twotower_error() -> None:
    """A class named ``*Error`` (or ``UnsupportedBackbone``) in the package derives from
    ``TwoTowerError``, so the command line prints it as one line."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and (
                node.name.endswith("Error") or node.name == "UnsupportedBackbone"
            ):
                found.append((path, node.name))
    assert len(found) >= 8
    import importlib

    for path, name in found:
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, TwoTowerError), f"{module}.{name}"


# -- the house ---------------------------------------------------------------------------------


def _import_graph() -> dict[str, set[str]]:
    """Every import of a ``twotower_train`` module by another (module level or inside a
    function: both are arrows), resolved to the module imported."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {resolve(a.name) for a in node.names if a.name.startswith("twotower_train")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                if base.startswith("twotower_train"):
                    for a in node.names:
                        full = f"{base}.{a.name}"
                        deps.add(full if full in modules else resolve(base))
        graph[name] = deps - {name, None}
    return graph


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles_between_modules_or_rooms() -> None:
    graph = _import_graph()
    assert _cycles(graph) == []
    rooms: dict[str, set[str]] = {}
    for module, deps in graph.items():
        rooms.setdefault(_room(module), set()).update(
            _room(d) for d in deps if _room(d) != _room(module)
        )
    assert _cycles(rooms) == []


def test_model_and_diffusion_import_nothing_of_the_run() -> None:
    base = ("model", "diffusion", "errors", "files", "console")
    for module, deps in _import_graph().items():
        if _room(module) in ("model", "diffusion"):
            up = sorted(d for d in deps if _room(d) not in base)
            assert up == [], f"{module} imports {up}"


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_step_meter_never_syncs_per_micro_step(monkeypatch) -> None:
    """Metrics are summed on their device; the host reads them once per log step."""
    import torch

    from twotower_train.run.train import StepMeter

    meter = StepMeter(0)
    outs = [{"loss": torch.tensor(float(i)), "ce": torch.tensor(2.0 * i)} for i in range(4)]

    def no_sync(self):
        raise AssertionError("a host sync in StepMeter.add")

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "item", no_sync)
        m.setattr(torch.Tensor, "tolist", no_sync)
        for out in outs:  # 2 optimizer steps of 2 micro-batches
            meter.add(out, grad_accum=2)
    assert meter.means() == {"ce": 3.0, "loss": 1.5}  # (0+1+2+3)/2 per step, over 2 steps
