"""Slurm without Slurm: the templates of slurm/ run on this machine under stand-ins for
``sbatch``/``srun``/``scontrol`` (tests/fake_slurm.py) with two processes; the test sends
Slurm's time-limit warning (SIGUSR1) to the tasks and checks checkpoint -> requeue ->
resume with the losses of an uninterrupted run, the retry limit, and W&B continuing the same
run (through a stand-in ``wandb`` module: no network)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY, losses, subprocess_env
from fake_slurm import install

from twotower_train.config import ConfigError, compose
from twotower_train.engine.slurm import (
    EXIT_NOT_REQUEUED,
    RequeueError,
    SlurmJob,
    end_of_allocation,
    requeue,
)

TEMPLATES = sorted((REPO / "slurm").glob("*.sbatch"))
RUN = [
    *TINY,
    "precision=fp32",
    "train.steps=60",
    "train.log_every=1",
    "train.ckpt_every=1000",
]
JOB_TIMEOUT = 900  # generous: the CPU is shared, a job takes 15-200 s
TWO_TASKS = ["--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]

_WANDB_STANDIN = """
import json, os
def _record(**kw):
    with open(os.environ["WANDB_STANDIN_LOG"], "a") as f:
        f.write(json.dumps(kw) + "\\n")
class _Run:
    url = None
    def __init__(self):
        self.summary = {}
    def log(self, metrics, step=None):
        _record(log=step)
    def finish(self):
        _record(finish=True)
def init(**kw):
    _record(init={k: kw[k] for k in ("id", "resume", "dir", "mode")})
    return _Run()
"""


def _job_id() -> str:
    """A job id whose derived port (20000 + id % 20000, engine/distributed.py) is free."""
    for _ in range(200):
        port = random.randint(20000, 39999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return str(port - 20000 + 20000 * random.randint(1, 9))
    raise RuntimeError("no free port")


def _slurm(root: Path) -> tuple[dict[str, str], Path]:
    """The environment of a shell on a "login node" with the fake Slurm commands, and the
    folder of their records."""
    state = root / "slurm_state"
    install(root / "bin", state)
    standin = root / "standin"
    (standin / "wandb").mkdir(parents=True)
    (standin / "wandb" / "__init__.py").write_text(_WANDB_STANDIN)
    env = subprocess_env(
        FAKE_SLURM_STATE=str(state),
        FAKE_SLURM_JOB_ID=_job_id(),
        WANDB_STANDIN_LOG=str(root / "wandb.jsonl"),
    )
    env["PATH"] = f"{root / 'bin'}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = f"{standin}{os.pathsep}{REPO}"
    return env, state


def _sbatch(env, template: str, args: list[str], options=TWO_TASKS) -> subprocess.Popen:
    return subprocess.Popen(
        ["sbatch", *options, str(REPO / "slurm" / template), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the job's processes: one group, killed if the test fails
    )


def _wait(proc: subprocess.Popen) -> tuple[str, str]:
    """The job's output once it ended; on a timeout every process of the job is killed."""
    try:
        return proc.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def _lines(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.is_file() else []


def _last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    steps = [0]
    for ln in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(ValueError):  # a line being written
            steps.append(json.loads(ln)["step"])
    return max(steps)


def _signal_tasks(state: Path, restart: int, run_dir: Path, step: int, proc, sig=signal.SIGUSR1):
    """Send ``sig`` to every task of the job's ``restart``-th run once it logged ``step``,
    as Slurm's --signal does."""
    deadline = time.time() + JOB_TIMEOUT
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        tasks = (
            json.loads((state / "tasks.json").read_text())
            if (state / "tasks.json").exists()
            else {}
        )
        if tasks.get("restart") == restart and _last_step(run_dir) >= step:
            for pid in tasks["pids"]:
                os.kill(pid, sig)
            return
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise TimeoutError(f"run {restart} did not reach step {step}")


def _checkpoint_step(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().removeprefix("step_"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """An uninterrupted 2-task job through slurm/train.sbatch: it finishes, never requeued."""
    root = tmp_path_factory.mktemp("reference")
    env, state = _slurm(root)
    proc = _sbatch(env, "train.sbatch", [*RUN, f"run.dir={root / 'run'}"])
    out, err = _wait(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "slurm x2" in out  # two ranks through srun's variables
    assert [r["returncode"] for r in _lines(state / "runs.jsonl")] == [0]
    assert not (state / "requeues.jsonl").exists()  # a finished job does not requeue
    got = losses(root / "run")
    assert sorted(got) == list(range(1, 61))
    return got


def test_templates_parse_and_come_back() -> None:
    assert {t.name for t in TEMPLATES} >= {
        "train.sbatch",
        "train_multinode.sbatch",
        "train_torchrun.sbatch",
    }
    for template in TEMPLATES:
        proc = subprocess.run(["bash", "-n", str(template)], capture_output=True, text=True)
        assert proc.returncode == 0, (template.name, proc.stderr)
        text = template.read_text()
        assert "#SBATCH --signal=USR1@" in text and "#SBATCH --requeue" in text, template.name
        assert "#SBATCH --open-mode=append" in text, template.name  # one log across requeues


def test_template_refuses_a_job_without_run_dir(tmp_path: Path) -> None:
    env, state = _slurm(tmp_path)
    for template in TEMPLATES:
        proc = _sbatch(env, template.name, ["recipe=tiny"])
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, (template.name, err)
        assert err.strip().splitlines() == [
            f"{template.name}: error: pass run.dir=/shared/path (the fixed folder a requeued "
            "job resumes from)"
        ]
        assert not (state / "tasks.json").exists()  # nothing was started


@pytest.mark.slow
def test_time_limit_checkpoints_requeues_resumes_exactly_until_the_limit(
    tmp_path: Path, reference
) -> None:
    """SIGUSR1 -> every rank checkpoints -> rank 0 requeues -> the job runs again (restart 1)
    and resumes with the uninterrupted run's losses; at slurm.max_requeues=1 the next SIGUSR1
    checkpoints without requeueing: one line, exit 3. W&B: one run id, resumed."""
    env, state = _slurm(tmp_path)
    run_dir = tmp_path / "run"
    args = [*RUN, "logger=wandb", "slurm.max_requeues=1", f"run.dir={run_dir}"]
    proc = _sbatch(env, "train.sbatch", args)
    _signal_tasks(state, 0, run_dir, 3, proc)
    deadline = time.time() + JOB_TIMEOUT
    while not (state / "requeues.jsonl").exists():
        assert proc.poll() is None, proc.communicate()
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise TimeoutError("no requeue")
        time.sleep(0.05)
    first = _checkpoint_step(run_dir)  # complete before the requeue
    _signal_tasks(state, 1, run_dir, first + 3, proc)
    out, err = _wait(proc)

    assert proc.returncode == EXIT_NOT_REQUEUED, err[-3000:]
    runs = _lines(state / "runs.jsonl")
    assert [(r["restart"], r["returncode"]) for r in runs] == [(0, 0), (1, EXIT_NOT_REQUEUED)]
    assert [r["restart"] for r in _lines(state / "requeues.jsonl")] == [0]  # one requeue
    assert f"SIGUSR1: checkpoint saved at step {first}" in out
    assert f"requeued Slurm job {env['FAKE_SLURM_JOB_ID']} (requeue 1 of at most 1)" in out
    assert f"resumed at step {first}" in out
    errors = [ln for ln in err.splitlines() if ln.startswith("twotower_train: error:")]
    assert errors == [
        f"twotower_train: error: slurm.max_requeues=1 reached (SLURM_RESTART_COUNT=1): "
        f"checkpoint saved, job {env['FAKE_SLURM_JOB_ID']} not requeued (resubmit to continue "
        f"from run.dir)"
    ]
    last = _checkpoint_step(run_dir)
    assert first < last < 60
    got = losses(run_dir)
    assert sorted(got) == list(range(1, last + 1))
    for step in range(1, last + 1):  # steps after the requeue draw from restored RNG states
        assert got[step] == reference[step], step

    records = _lines(tmp_path / "wandb.jsonl")
    inits = [r["init"] for r in records if "init" in r]
    run_id = (run_dir / "wandb_id.txt").read_text()
    assert [(i["id"], i["resume"]) for i in inits] == [(run_id, "allow")] * 2
    assert [r["log"] for r in records if "log" in r] == list(range(1, last + 1))


@pytest.mark.slow
def test_preemption_checkpoints_and_leaves_the_requeue_to_slurm(tmp_path: Path, reference) -> None:
    """SIGTERM (preemption): every rank checkpoints and exits 0, the job does not requeue
    itself; the job Slurm requeues (restart 1) resumes with the uninterrupted run's losses."""
    env, state = _slurm(tmp_path)
    run_dir = tmp_path / "run"
    args = [*RUN, f"run.dir={run_dir}"]
    proc = _sbatch(env, "train.sbatch", args)
    _signal_tasks(state, 0, run_dir, 3, proc, sig=signal.SIGTERM)
    out, err = _wait(proc)
    assert proc.returncode == 0, err[-3000:]
    stopped = _checkpoint_step(run_dir)
    assert f"SIGTERM: checkpoint saved at step {stopped}" in out and stopped < 60
    assert not (state / "requeues.jsonl").exists()  # Slurm's requeue, not the job's
    proc = _sbatch({**env, "FAKE_SLURM_RESTART_COUNT": "1"}, "train.sbatch", args)
    out, err = _wait(proc)
    assert proc.returncode == 0, err[-3000:]
    assert f"resumed at step {stopped}" in out
    assert [r["restart"] for r in _lines(state / "runs.jsonl")] == [0, 1]
    assert not (state / "requeues.jsonl").exists()  # finished: no requeue
    got = losses(run_dir)
    assert sorted(got) == list(range(1, 61))
    for step in got:
        assert got[step] == reference[step], step


@pytest.mark.slow
def test_torchrun_template_passes_the_signal_to_its_workers(tmp_path: Path, reference) -> None:
    """Two "nodes" of one torchrun each (c10d rendezvous): SIGUSR1 reaches only the torchrun
    agents, which hand it to their workers; the job requeues once and finishes."""
    env, state = _slurm(tmp_path)
    run_dir = tmp_path / "run"
    options = ["--nodes=2", "--gpus-per-node=1", "--cpus-per-task=1"]
    proc = _sbatch(env, "train_torchrun.sbatch", [*RUN, f"run.dir={run_dir}"], options)
    _signal_tasks(state, 0, run_dir, 3, proc)
    out, err = _wait(proc)
    assert proc.returncode == 0, err[-3000:]
    assert [r["restart"] for r in _lines(state / "runs.jsonl")] == [0, 1]
    assert [r["restart"] for r in _lines(state / "requeues.jsonl")] == [0]
    assert "torchrun x2" in out
    got = losses(run_dir)
    assert sorted(got) == list(range(1, 61))
    for step in got:
        assert got[step] == reference[step], step


# -- the decisions, in process -----------------------------------------------------------------


def test_end_of_allocation_decisions() -> None:
    job = SlurmJob("77", restart_count=2)
    usr1, term = {"SIGUSR1"}, {"SIGTERM"}
    assert end_of_allocation(usr1, job, 5, finished=False) == "requeue"
    assert end_of_allocation(usr1, job, 5, finished=True) is None  # finished: no requeue
    assert end_of_allocation(term, job, 5, finished=False) is None  # preempted: Slurm's requeue
    assert end_of_allocation(usr1 | term, job, 5, finished=False) is None
    assert end_of_allocation(usr1, None, 5, finished=False) is None  # outside Slurm
    with pytest.raises(RequeueError, match=r"slurm.max_requeues=2 reached"):
        end_of_allocation(usr1, job, 2, finished=False)
    assert SlurmJob.from_env({}) is None
    assert SlurmJob.from_env({"SLURM_JOB_ID": "9"}) == SlurmJob("9", 0)
    assert SlurmJob.from_env({"SLURM_JOB_ID": "9", "SLURM_RESTART_COUNT": "4"}).restart_count == 4


def test_a_job_requeued_past_the_limit_does_not_start(tmp_path: Path, monkeypatch, capsys) -> None:
    from twotower_train.__main__ import main

    monkeypatch.setenv("SLURM_JOB_ID", "55")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main([*TINY, "slurm.max_requeues=2", f"run.dir={run_dir}"])
    assert exit_.value.code == EXIT_NOT_REQUEUED
    assert capsys.readouterr().err.strip().splitlines() == [
        "twotower_train: error: Slurm job 55 was requeued 3 times, more than "
        "slurm.max_requeues=2: not starting (resubmit to continue from run.dir)"
    ]
    assert not run_dir.exists()  # refused before any work


def test_max_requeues_is_checked() -> None:
    assert compose(["slurm.max_requeues=0"]).slurm.max_requeues == 0
    with pytest.raises(ConfigError, match=r"^slurm.max_requeues must be >= 0, got -1$"):
        compose(["slurm.max_requeues=-1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'slurm.retries'"):
        compose(["slurm.retries=3"])


def test_a_failed_scontrol_requeue_is_one_line(tmp_path: Path, monkeypatch) -> None:
    env, _ = _slurm(tmp_path)
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("FAKE_SLURM_STATE", env["FAKE_SLURM_STATE"])
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    with pytest.raises(RequeueError, match=r"^scontrol requeue 2 failed: scontrol: error: Inv"):
        requeue(SlurmJob("2", 0))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(RequeueError, match="no scontrol on PATH"):
        requeue(SlurmJob("2", 0))


def test_wandb_reuses_the_run_id_kept_in_run_dir(tmp_path: Path, monkeypatch) -> None:
    """The W&B run id is written to run.dir once and every later start resumes it."""
    import types

    from twotower_train.config import LoggerBackend, LoggerConfig, WandbMode
    from twotower_train.run.metrics import _start_wandb

    calls = []
    standin = types.SimpleNamespace(init=lambda **kw: calls.append(kw) or object())
    monkeypatch.setitem(sys.modules, "wandb", standin)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = LoggerConfig(backend=LoggerBackend.wandb, mode=WandbMode.offline)
    _start_wandb(cfg, tmp_path, {})
    _start_wandb(cfg, tmp_path, {})
    run_id = (tmp_path / "wandb_id.txt").read_text()
    assert [(c["id"], c["resume"], c["mode"]) for c in calls] == [(run_id, "allow", "offline")] * 2


# -- Slurm sweeps: hydra/launcher=slurm ----------------------------------------------------------


SWEEP = [*TINY, "train.steps=1,2"]


def test_slurm_launcher_config_composes_without_the_plugin() -> None:
    from twotower_train.cli import _is_slurm
    from twotower_train.config import hydra_section

    launcher = hydra_section(["hydra/launcher=slurm", "hydra.launcher.partition=debug"])["launcher"]
    assert _is_slurm(launcher) and launcher["partition"] == "debug"
    assert launcher["tasks_per_node"] == 8 and launcher["signal_delay_s"] == 300
    assert not _is_slurm(hydra_section([])["launcher"])  # the basic launcher by default
    compose(["hydra/launcher=slurm", "train.steps=3"])  # a job's config is unaffected
    with pytest.raises(ConfigError, match="unknown config key 'hydra.launcher.partitio'"):
        compose(["hydra/launcher=slurm", "hydra.launcher.partitio=debug"])


def test_a_launcher_without_m_is_refused() -> None:
    from twotower_train import cli

    with pytest.raises(ValueError, match=r"^hydra/launcher=slurm chooses where a sweep's jobs"):
        cli.parse(["hydra/launcher=slurm", "train.steps=3"])  # would train right here
    assert cli.parse(["-m", "hydra/launcher=slurm"]).multirun
    assert cli.parse(["--cfg", "all", "hydra/launcher=slurm"]).cfg == "all"


def test_slurm_sweep_without_submitit_is_one_line(tmp_path: Path, monkeypatch) -> None:
    from twotower_train import cli

    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit -> ImportError
    with pytest.raises(ValueError, match=r"^hydra/launcher=slurm submits through submitit: pip"):
        cli.multirun(["hydra/launcher=slurm", *SWEEP, f"run.dir={tmp_path / 'sweep'}"])


def test_slurm_sweep_submits_an_array_of_requeueing_jobs(tmp_path: Path, monkeypatch) -> None:
    """Through submitit (skipped without it: pip install 'twotower-train[slurm]'): one job
    array, USR1 time-limit warning and --requeue, the launcher's settings, and each job the
    command line of its sweep point in its own run.dir."""
    pytest.importorskip("submitit")
    import pickle

    import yaml

    from twotower_train import cli

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        f'#!/bin/bash\ncp "$1" {tmp_path}/submitted.sh\necho "Submitted batch job 4242"\n'
    )
    (bin_dir / "srun").write_text("#!/bin/bash\n")  # submitit looks for it
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    root = tmp_path / "sweep"
    launcher = ["hydra/launcher=slurm", "hydra.launcher.partition=debug"]
    status = cli.multirun(
        [*launcher, "hydra.launcher.signal_delay_s=240", *SWEEP, f"run.dir={root}"]
    )
    assert status == 0
    script = (tmp_path / "submitted.sh").read_text()
    for line in (
        "#SBATCH --signal=USR1@240",
        "#SBATCH --requeue",
        "#SBATCH --partition=debug",
        "#SBATCH --array=0-1%2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --time=1440",
    ):
        assert line in script.splitlines(), line
    record = yaml.safe_load((root / "multirun.yaml").read_text())
    assert record["launcher"] == "slurm"
    assert [j["slurm_job_id"] for j in record["jobs"]] == ["4242_0", "4242_1"]
    submitted = sorted((root / ".submitit").glob("4242_*/*_submitted.pkl"))
    assert len(submitted) == 2
    for n, path in enumerate(submitted):
        job = pickle.loads(path.read_bytes()).function
        assert isinstance(job, cli.SlurmSweepJob)
        assert not [o for o in job.overrides if "hydra" in o]  # launcher settings stay out
        cfg = compose(job.overrides)
        assert cfg.train.steps == n + 1 and cfg.run.dir == str(root / str(n))
