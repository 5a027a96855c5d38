"""`python -m twotower_train [--help] [--info] [--cfg job|all [--resolve]] [-m] [recipe=NAME] [key=value ...]`.

With no arguments it runs the embedded default recipe (`recipe=tiny`); flags: `cli.py`.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from twotower_train import cli
    from twotower_train.config import ConfigError, Mode, compose, fail

    try:
        args = cli.parse(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        fail(str(exc))
    if args.help:
        print(cli.help_text())
        return 0
    if args.info:
        print(cli.info_text())
        return 0
    try:
        if args.cfg is not None:
            print(cli.config_text(args.overrides, args.cfg, args.resolve), end="")
            return 0
        if args.multirun:
            return cli.multirun(args.overrides)
        cfg = compose(args.overrides)
    except (ConfigError, ValueError) as exc:
        fail(str(exc))
    from twotower_train.backbones import BackboneError
    from twotower_train.engine.checkpoint import CheckpointError
    from twotower_train.engine.slurm import EXIT_NOT_REQUEUED, RequeueError
    from twotower_train.model.registry import UnsupportedBackbone

    try:
        if cfg.mode == Mode.train:
            from twotower_train.train import train

            train(cfg)
        elif cfg.mode == Mode.plan:
            from twotower_train.plan import run_plan

            run_plan(cfg)
        elif cfg.mode == Mode.release:
            from twotower_train.train import release_from_checkpoint

            release_from_checkpoint(cfg)
        else:
            from twotower_train.eval.harness import evaluate_run

            evaluate_run(cfg)
    except RequeueError as exc:  # one line from rank 0; every rank exits with the same status
        if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) != "0":
            raise SystemExit(EXIT_NOT_REQUEUED) from None
        fail(str(exc), code=EXIT_NOT_REQUEUED)
    except (
        ConfigError,
        BackboneError,
        CheckpointError,
        UnsupportedBackbone,
        FileNotFoundError,
        ValueError,
    ) as exc:
        fail(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
