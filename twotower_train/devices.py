"""Where a loaded model runs and in which precision: ``--device`` / ``--dtype`` of
``python -m twotower_train.generate``, ``eval.device`` / ``eval.dtype`` of ``mode=eval`` and
the ``device=`` / ``dtype=`` model args of lm-eval's ``--model twotower``.

A device is a torch device string (``cpu``, ``cuda``, ``cuda:1``, ``mps``); none (or
``auto``) means cuda when this machine has one, else cpu. A dtype is ``fp32`` or ``bf16``.
"""

from __future__ import annotations

import torch

from twotower_train.errors import TwoTowerError
from twotower_train.model.config import DType

DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
DTYPES = ("fp32", "bf16")  # the default first


class DeviceError(TwoTowerError, ValueError):
    """A device or dtype this machine cannot run; the message is one line."""


def parse_device(name: str | None) -> torch.device | None:
    """``name`` as a torch device, or None for the default (none, '' or ``auto``); a string
    that names no device type this project runs on is refused. Checks the spelling only:
    whether this machine has the device is ``resolve_device``'s question."""
    if name is None or name.strip() in ("", "auto"):
        return None
    try:
        device = torch.device(name.strip())
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise DeviceError(
            f"device {name!r} is not one of {', '.join(DEVICE_TYPES)} (with an optional "
            ":INDEX) or auto"
        )
    return device


def resolve_device(name: str | None = None) -> torch.device:
    """The device ``name`` asks for (default: cuda when available, else cpu); refuses one this
    machine does not have, before any weights load."""
    device = parse_device(name)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"device {name}: this machine has no CUDA device")
        if device.index is not None and device.index >= count:
            raise DeviceError(f"device {name}: this machine has {count} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {name}: MPS is not available on this machine")
    elif device.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise DeviceError(f"device {name}: this machine has no XPU device")
    return device


def resolve_dtype(name: str | DType) -> torch.dtype:
    """``fp32`` or ``bf16`` as a torch dtype; anything else is refused."""
    try:
        return DType(name).torch
    except ValueError:
        raise DeviceError(f"dtype {name!r} is not one of {', '.join(DTYPES)}") from None
