"""Checks of a composed config that need more than its schema, made before any work starts
(``cli.compose_run``): the evaluation tasks must exist, so a typo in ``eval.tasks`` is
refused in one line instead of failing after training."""

from __future__ import annotations

from twotower_train.config import Config, ConfigError, Mode, Objective
from twotower_train.eval import tasks


def preflight(cfg: Config) -> None:
    """Refuse (``ConfigError``) what would fail later in the run."""
    if cfg.mode == Mode.plan:
        return
    known = tasks.registry()
    unknown = [name for name in cfg.eval.tasks if name not in known]
    if unknown:
        raise ConfigError(
            f"unknown eval task(s) {unknown} in eval.tasks; known: {', '.join(sorted(known))}"
        )
    if cfg.mode == Mode.eval and cfg.train.objective == Objective.ar:
        raise ConfigError("mode=eval scores a two-tower release; train.objective=ar has none")
