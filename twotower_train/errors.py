"""User-facing errors are one line: this is where an exception becomes that line."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first non-empty line of ``str(exc)``, or the exception's type name."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
