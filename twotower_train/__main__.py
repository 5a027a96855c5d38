"""``python -m twotower_train``: the command line (``cli.py``)."""

import sys

from twotower_train.cli import main

if __name__ == "__main__":
    sys.exit(main())
