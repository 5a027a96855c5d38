"""`python -m twotower_train [recipe=NAME] [key=value ...]`.

With no arguments it runs the embedded default recipe (`recipe=tiny`).
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.strip())
        print("Recipes: recipes/*.yaml; config groups: conf/; every key: twotower_train/config.py")
        return 0
    bad = [a for a in args if "=" not in a]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from twotower_train.config import ConfigError, Mode, compose, fail

    if bad:
        fail(f"arguments must be key=value overrides, got: {' '.join(bad)}")
    try:
        cfg = compose(args)
    except ConfigError as exc:
        fail(str(exc))
    from twotower_train.backbones import BackboneError
    from twotower_train.engine.checkpoint import CheckpointError
    from twotower_train.model.registry import UnsupportedBackbone

    try:
        if cfg.mode == Mode.train:
            from twotower_train.train import train

            train(cfg)
        else:
            from twotower_train.eval.harness import evaluate_run

            evaluate_run(cfg)
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
