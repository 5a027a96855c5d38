"""What the framework prints: one prefixed line per event, and progress bars for phases
that take more than a few seconds (on stderr, hidden when it is not a terminal unless
``TWOTOWER_PROGRESS=1``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def info(msg: str) -> None:
    print(f"[twotower_train] {msg}", flush=True)


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """``items`` with a tqdm bar named ``desc`` (shown on a terminal, or with
    ``TWOTOWER_PROGRESS=1``; never with ``TWOTOWER_PROGRESS=0``)."""
    wanted = os.environ.get("TWOTOWER_PROGRESS")
    show = sys.stderr.isatty() if wanted is None else wanted == "1"
    if not show:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=f"[twotower_train] {desc}", total=total, leave=False)
