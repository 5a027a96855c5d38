"""The project's own errors, and how one becomes a line.

Every error a user can cause (a bad config key, a missing file, malformed data, a corrupt
checkpoint or release) is a ``TwoTowerError``: the command line prints it as one line and
exits non-zero. Anything else is a bug and keeps its full traceback.
"""

from __future__ import annotations


class TwoTowerError(Exception):
    """Base of every error the user can fix; its message is one line."""


class MissingFile(TwoTowerError, FileNotFoundError):
    """A file or folder the user named (or a command should have made) is not there."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of ``str(exc)``, or the exception's type name."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
