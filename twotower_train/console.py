"""What the framework prints: one prefixed line per event, and progress bars for phases
that take more than a few seconds (on stderr, hidden when it is not a terminal unless
``TWOTOWER_PROGRESS=1``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")


def info(msg: str) -> None:
    print(f"[twotower_train] {msg}", flush=True)


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """``items`` with a tqdm bar named ``desc`` (shown on a terminal, or with
    ``TWOTOWER_PROGRESS=1``; never with ``TWOTOWER_PROGRESS=0``)."""
    if not _shown():
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=f"[twotower_train] {desc}", total=total, leave=False)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


@contextmanager
def progress_bar(desc: str, total: int) -> Iterator[Any]:
    """A bar of ``total`` steps advanced by hand (``bar.update()``), for a phase made of
    unlike steps; shown when ``progress``'s would be."""
    if not _shown():
        yield _NoBar()
        return
    from tqdm import tqdm

    with tqdm(desc=f"[twotower_train] {desc}", total=total, leave=False) as bar:
        yield bar


def _shown() -> bool:
    wanted = os.environ.get("TWOTOWER_PROGRESS")
    return sys.stderr.isatty() if wanted is None else wanted == "1"
