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
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

USAGE = "usage: python -m twotower_train [--help] [--info] [--cfg job|all [--resolve]] [-m] [recipe=NAME] [key=value ...]"


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
                raise ValueError(f"--cfg takes job or all, got {value!r}")
            args.cfg = value
        elif a.startswith("-") or "=" not in a:
            raise ValueError(f"arguments must be key=value overrides or flags, got: {a}")
        else:
            args.overrides.append(a)
        i += 1
    if args.resolve and args.cfg is None:
        raise ValueError("--resolve goes with --cfg job|all")
    if args.multirun and args.cfg is not None:
        raise ValueError("--cfg prints one config; drop -m (or print one job's config)")
    return args


def help_text() -> str:
    from twotower_train.config import CONF_DIR, DEFAULT_RECIPE, RECIPES_DIR

    lines = [
        USAGE,
        "",
        (__doc__ or "").split("\n\n", 1)[1].strip(),
        "",
        "Config groups (group=option):",
    ]
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "recipe"):
        options = sorted(f.stem for f in group.glob("*.yaml"))
        lines.append(f"  {group.name}: {', '.join(options)}")
    lines += ["", f"Recipes (recipe=NAME; default {DEFAULT_RECIPE}):"]
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        lines.append(f"  {path.stem:<28s} {_first_comment(path)}")
    lines += [
        "",
        "Any key can be overridden (key=value); every key is declared in twotower_train/config.py.",
        "Print a composed config: --cfg job [--resolve].  Docs: docs/training.md.",
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

    from twotower_train import __version__
    from twotower_train.config import CONF_DIR, DEFAULT_RECIPE, RECIPES_DIR

    return "\n".join(
        [
            f"twotower_train {__version__}",
            f"config dir:  {CONF_DIR} (conf/config.yaml + groups)",
            f"recipes dir: {RECIPES_DIR} (default recipe: {DEFAULT_RECIPE})",
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
        raise ValueError(f"bad sweep override: {text[0] if text else exc}") from None
    batches = BasicSweeper.split_arguments(parsed, None)
    return [job for batch in batches for job in batch]


def multirun(overrides: list[str]) -> int:
    """Run every job of the sweep (see the module docstring); returns the exit status."""
    import yaml

    from twotower_train.config import compose

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("-m runs jobs one after another; launch it once, not under torchrun")
    jobs = sweep_jobs(overrides)
    given = [o for o in overrides if o.startswith("run.dir=")]
    if given:
        root = Path(given[-1].split("=", 1)[1])
    else:
        recipe = next((o.split("=", 1)[1] for o in overrides if o.startswith("recipe=")), None)
        root = Path("sweeps") / f"{recipe or 'default'}_{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    runs = []
    for n, job in enumerate(jobs):
        job = [o for o in job if not o.startswith("run.dir=")] + [f"run.dir={root / str(n)}"]
        compose(job)  # every job validated before the first one starts
        runs.append(job)
    root.mkdir(parents=True, exist_ok=True)
    record = {"sweep": [str(o) for o in overrides], "jobs": []}
    status = 0
    for n, job in enumerate(runs):
        print(f"[twotower_train] sweep job {n + 1}/{len(runs)}: {' '.join(job)}", flush=True)
        proc = subprocess.run([sys.executable, "-m", "twotower_train", *job])
        record["jobs"].append({"number": n, "overrides": job, "returncode": proc.returncode})
        (root / "multirun.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
        status = status or proc.returncode
    print(
        f"[twotower_train] sweep: {len(runs)} jobs in {root}, {'all ok' if not status else 'some failed'}"
    )
    return status
