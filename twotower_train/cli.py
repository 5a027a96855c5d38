"""The command line Hydra users expect, over the compose API the runs use.

``python -m twotower_train [FLAGS] [recipe=NAME] [key=value ...]``

* ``--help`` / ``-h``: usage, the config groups and their options, the recipes;
* ``--info``: versions and where configs come from;
* ``--cfg job|all`` (``--resolve``): print the composed, validated config and exit
  (``all`` adds the ``hydra:`` section Hydra composes beside it);
* ``-m`` / ``--multirun``: a sweep -- ``key=a,b`` / ``range(...)`` / ``choice(...)``
  values expand (Hydra's own override grammar and basic sweeper, cartesian product); every
  job's config is composed and validated before the first starts; jobs run one after
  another (basic launcher) as ``python -m twotower_train``, each in its own
  ``run.dir`` = ``<sweep dir>/<job number>``. The sweep dir is ``run.dir`` if given, else
  ``sweeps/<recipe>_<time>``; it gets ``multirun.yaml`` (the jobs, their overrides and
  exit status). Exit status: 0 when every job succeeded.
  ``hydra/launcher=slurm`` (twotower_train/conf/hydra/launcher/slurm.yaml, or
  hydra-submitit-launcher's own ``submitit_slurm``) submits the jobs to Slurm through
  submitit instead, as one job array, and returns; each job runs the command line in its
  tasks, checkpoints and requeues itself on the time-limit warning (docs/slurm.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from twotower_train.errors import TwoTowerError, first_line
from twotower_train.files import atomic_write_text

SKIP_GROUPS = ("recipe", "hydra")  # recipes are listed apart; hydra/launcher below
USAGE = "usage: python -m twotower_train [--help] [--info] [--cfg job|all [--resolve]] [-m] [recipe=NAME|PATH.yaml] [key=value ...]"


class UsageError(TwoTowerError, ValueError):
    """A command line that cannot be parsed; the message is one line."""


@dataclass
class Args:
    overrides: list[str] = field(default_factory=list)
    help: bool = False
    info: bool = False
    cfg: str | None = None
    resolve: bool = False
    multirun: bool = False


def parse(argv: list[str]) -> Args:
    """Flags and ``key=value`` overrides; anything else is an error (``ValueError``)."""
    args = Args()
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            args.help = True
        elif a == "--info":
            args.info = True
        elif a == "--resolve":
            args.resolve = True
        elif a in ("-m", "--multirun"):
            args.multirun = True
        elif a == "--cfg" or a.startswith("--cfg="):
            if a == "--cfg":
                i += 1
                value = argv[i] if i < len(argv) else None
            else:
                value = a.split("=", 1)[1]
            if value not in ("job", "all"):
                raise UsageError(f"--cfg takes job or all, got {value!r}")
            args.cfg = value
        elif a.startswith("-") or "=" not in a:
            raise UsageError(f"arguments must be key=value overrides or flags, got: {a}")
        else:
            args.overrides.append(a)
        i += 1
    if args.resolve and args.cfg is None:
        raise UsageError("--resolve goes with --cfg job|all")
    if args.multirun and args.cfg is not None:
        raise UsageError("--cfg prints one config; drop -m (or print one job's config)")
    launcher = [o for o in args.overrides if o.lstrip("+~").startswith("hydra/launcher=")]
    if launcher and not args.multirun and args.cfg is None:
        raise UsageError(f"{launcher[0]} chooses where a sweep's jobs run: add -m")
    return args


def main(argv: list[str] | None = None) -> int:
    """The command line: parse, compose and check the config, run the mode. The project's
    own errors (``TwoTowerError``) end as one line and exit status 2; anything else is a bug
    and keeps its traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from twotower_train.config import fail
    from twotower_train.engine.slurm import EXIT_NOT_REQUEUED, RequeueError

    try:
        args = parse(sys.argv[1:] if argv is None else argv)
        if args.help:
            print(help_text())
            return 0
        if args.info:
            print(info_text())
            return 0
        if args.cfg is not None:
            print(config_text(args.overrides, args.cfg, args.resolve), end="")
            return 0
        if args.multirun:
            return multirun(args.overrides)
        run_mode(compose_run(args.overrides))
    except RequeueError as exc:  # one line from rank 0; every rank exits with the same status
        if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) != "0":
            raise SystemExit(EXIT_NOT_REQUEUED) from None
        fail(str(exc), code=EXIT_NOT_REQUEUED)
    except TwoTowerError as exc:
        fail(first_line(exc))
    return 0


def compose_run(overrides: list[str]):
    """The validated config of a run, checked against what the run knows (task names)."""
    from twotower_train.config import compose
    from twotower_train.run.preflight import preflight

    cfg = compose(overrides)
    preflight(cfg)
    return cfg


def run_mode(cfg) -> None:
    from twotower_train.config import Mode

    if cfg.mode == Mode.train:
        from twotower_train.run.train import train

        train(cfg)
    elif cfg.mode == Mode.plan:
        from twotower_train.run.plan import run_plan

        run_plan(cfg)
    elif cfg.mode == Mode.release:
        from twotower_train.run.train import release_from_checkpoint

        release_from_checkpoint(cfg)
    else:
        from twotower_train.run.evaluate import evaluate_run

        evaluate_run(cfg)


def help_text() -> str:
    from twotower_train.config import DEFAULT_RECIPE, RECIPES_DIR, config_dirs, known_recipes

    lines = [
        USAGE,
        "",
        (__doc__ or "").split("\n\n", 1)[1].strip(),
        "",
        "Config groups (group=option; TWOTOWER_CONFIG_PATH adds folders of GROUP/OPTION.yaml):",
    ]
    folders = config_dirs()
    options: dict[str, set[str]] = {}
    for folder in folders:
        for group in folder.iterdir():
            if group.is_dir() and group.name not in SKIP_GROUPS:
                options.setdefault(group.name, set()).update(f.stem for f in group.glob("*.yaml"))
    for group in sorted(options):
        lines.append(f"  {group}: {', '.join(sorted(options[group]))}")
    launchers = sorted({f.stem for d in folders for f in (d / "hydra" / "launcher").glob("*.yaml")})
    lines.append(f"  hydra/launcher (with -m): basic, {', '.join(launchers)}")
    lines += [
        "",
        f"Recipes (recipe=NAME, or recipe=PATH.yaml; default {DEFAULT_RECIPE}; "
        "TWOTOWER_RECIPE_PATH adds folders of NAME.yaml):",
    ]
    for name, path in known_recipes().items():
        where = "" if path.parent == RECIPES_DIR else f" ({path})"
        lines.append(f"  {name:<28s} {_first_comment(path)}{where}")
    lines += [
        "",
        "Any key can be overridden (key=value); every key is declared in twotower_train/config.py.",
        "Print a composed config: --cfg job [--resolve].  Where configs come from: --info.",
        "Docs: docs/training.md.",
    ]
    return "\n".join(lines)


def _first_comment(path: Path) -> str:
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("#") and "@package" not in line:
            return line.lstrip("# ").strip()
    return ""


def info_text() -> str:
    import hydra
    import omegaconf
    import torch
    import transformers

    from twotower_train import __file__ as package_file
    from twotower_train import __version__
    from twotower_train.config import (
        CONF_DIR,
        CONFIG_PATH_ENV,
        DEFAULT_RECIPE,
        RECIPE_PATH_ENV,
        RECIPES_DIR,
        env_folders,
    )

    def search_path(var: str, shipped: Path) -> list[str]:
        # every folder listed, a missing one marked (composing refuses it)
        rows = [
            f"  {d}{'' if d.is_dir() else ' (not a folder)'}  [{var}]" for d in env_folders(var)
        ]
        return [*rows, f"  {shipped}  [shipped]"]

    return "\n".join(
        [
            f"twotower_train {__version__} at {Path(package_file).parent}",
            "config search path (Hydra config groups; first match wins):",
            *search_path(CONFIG_PATH_ENV, CONF_DIR),
            f"recipe search path (recipe=NAME looks for NAME.yaml; first match wins; "
            f"default recipe: {DEFAULT_RECIPE}):",
            *search_path(RECIPE_PATH_ENV, RECIPES_DIR),
            f"hydra {hydra.__version__}, omegaconf {omegaconf.__version__}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}",
            f"python {sys.version.split()[0]} at {sys.executable}",
        ]
    )


def config_text(overrides: list[str], which: str, resolve: bool) -> str:
    """The composed, validated config as YAML (``which='all'``: plus Hydra's section)."""
    from omegaconf import OmegaConf

    from twotower_train.config import compose, hydra_section

    cfg = compose(overrides)
    node = OmegaConf.structured(cfg)
    text = OmegaConf.to_yaml(node, resolve=resolve)
    if which == "all":
        text += OmegaConf.to_yaml({"hydra": hydra_section(overrides)}, resolve=False)
    return text


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The sweep's jobs (override lists, cartesian product) by Hydra's own grammar."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise UsageError(f"bad sweep override: {text[0] if text else exc}") from None
    batches = BasicSweeper.split_arguments(parsed, None)
    return [job for batch in batches for job in batch]


def multirun(overrides: list[str]) -> int:
    """Run every job of the sweep (see the module docstring); returns the exit status."""
    import yaml

    from twotower_train.config import hydra_section

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("-m runs jobs one after another; launch it once, not under torchrun")
    # hydra/... and hydra.... overrides choose and set the launcher; they are not job settings
    launcher = hydra_section([o for o in overrides if _is_hydra(o)])["launcher"]
    jobs = [[o for o in job if not _is_hydra(o)] for job in sweep_jobs(overrides)]
    given = [o for o in overrides if o.startswith("run.dir=")]
    if given:
        root = Path(given[-1].split("=", 1)[1])
    else:
        recipe = next((o.split("=", 1)[1] for o in overrides if o.startswith("recipe=")), None)
        name = Path(recipe).stem if recipe else "default"  # recipe=NAME or recipe=PATH.yaml
        root = Path("sweeps") / f"{name}_{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    runs = []
    for n, job in enumerate(jobs):
        job = [o for o in job if not o.startswith("run.dir=")] + [f"run.dir={root / str(n)}"]
        compose_run(job)  # every job validated before the first one starts
        runs.append(job)
    root.mkdir(parents=True, exist_ok=True)
    record = {"sweep": [str(o) for o in overrides], "jobs": []}
    if _is_slurm(launcher):
        ids = submit_to_slurm(runs, root, launcher)
        record["launcher"] = "slurm"
        for n, (job, job_id) in enumerate(zip(runs, ids)):
            record["jobs"].append({"number": n, "overrides": job, "slurm_job_id": job_id})
        atomic_write_text(root / "multirun.yaml", yaml.safe_dump(record, sort_keys=False))
        print(
            f"[twotower_train] sweep: {len(runs)} jobs submitted to Slurm ({', '.join(ids)}), "
            f"run dirs {root}/<job number>, logs in {root / '.submitit'}"
        )
        return 0
    status = 0
    for n, job in enumerate(runs):
        print(f"[twotower_train] sweep job {n + 1}/{len(runs)}: {' '.join(job)}", flush=True)
        proc = subprocess.run([sys.executable, "-m", "twotower_train", *job])
        record["jobs"].append({"number": n, "overrides": job, "returncode": proc.returncode})
        atomic_write_text(root / "multirun.yaml", yaml.safe_dump(record, sort_keys=False))
        status = status or proc.returncode
    print(
        f"[twotower_train] sweep: {len(runs)} jobs in {root}, {'all ok' if not status else 'some failed'}"
    )
    return status


def _is_hydra(override: str) -> bool:
    return override.lstrip("+~").startswith(("hydra/", "hydra."))


def _is_slurm(launcher: dict) -> bool:
    return str(launcher.get("_target_", "")).endswith("submitit_launcher.SlurmLauncher")


# hydra-submitit-launcher's settings that submitit takes without its `slurm_` prefix
_SUBMITIT_BASE = (
    "timeout_min",
    "cpus_per_task",
    "gpus_per_node",
    "tasks_per_node",
    "mem_gb",
    "nodes",
    "name",
    "stderr_to_stdout",
)


def submit_to_slurm(jobs: list[list[str]], root: Path, launcher: dict) -> list[str]:
    """Submit every job as one element of a Slurm job array through submitit, with
    hydra-submitit-launcher's settings ``launcher``; returns the Slurm job ids. Each job gets
    ``--signal=USR1@signal_delay_s`` and ``--requeue`` (it requeues itself: engine/slurm.py)
    and logs to ``root/.submitit/``."""
    try:
        import submitit
    except ImportError:
        raise UsageError(
            "hydra/launcher=slurm submits through submitit: pip install 'twotower-train[slurm]'"
        ) from None
    params = {k: v for k, v in launcher.items() if k not in ("_target_", "submitit_folder")}
    if "${" in str(params.get("name")):  # the plugin's ${hydra.job.name}
        params["name"] = "twotower"
    delay = params.pop("signal_delay_s")
    # USR1, not submitit's USR2: the training loop's time-limit warning (engine/slurm.py)
    extra = {"signal": f"USR1@{delay}", "requeue": True, **params.pop("additional_parameters")}
    try:
        executor = submitit.AutoExecutor(
            folder=root / ".submitit" / "%j",
            cluster="slurm",
            slurm_max_num_timeout=params.pop("max_num_timeout"),
        )
    except RuntimeError as exc:  # no srun here
        raise UsageError(f"hydra/launcher=slurm: {exc}") from None
    executor.update_parameters(
        **{k if k in _SUBMITIT_BASE else f"slurm_{k}": v for k, v in params.items()},
        slurm_signal_delay_s=delay,
        slurm_additional_parameters=extra,
    )
    with executor.batch():
        submitted = [executor.submit(SlurmSweepJob(job)) for job in jobs]
    return [str(job.job_id) for job in submitted]


@dataclass
class SlurmSweepJob:
    """One job of a Slurm sweep, as submitit runs it on every task of its allocation: the
    command line in this very process, so Slurm's signals reach the training loop."""

    overrides: list[str]

    def __call__(self) -> int:
        return main(self.overrides)
