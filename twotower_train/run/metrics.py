"""Metrics sinks: `metrics.jsonl`, one console line per log step, and W&B.

Only rank 0 constructs a `MetricsLogger`; other ranks get a no-op.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from twotower_train.config import LoggerBackend, LoggerConfig
from twotower_train.files import atomic_write_text

_BOLD, _DIM, _GREEN, _CYAN, _RESET = "\033[1m", "\033[2m", "\033[32m", "\033[36m", "\033[0m"


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class MetricsLogger:
    """Writes each logged step to metrics.jsonl, the console and (optionally) W&B."""

    def __init__(
        self,
        run_dir: Path,
        cfg: LoggerConfig,
        *,
        total_steps: int,
        run_config: dict | None = None,
        enabled: bool = True,
    ):
        """``run_config``: the run's whole configuration, stored with a W&B run."""
        self.enabled = enabled
        self.total_steps = total_steps
        self.color = sys.stdout.isatty()
        self.wandb = None
        if not enabled:
            return
        self.path = run_dir / "metrics.jsonl"
        self._file = open(self.path, "a")  # noqa: SIM115 -- appends across resumes
        if cfg.backend == LoggerBackend.wandb:
            self.wandb = _start_wandb(cfg, run_dir, run_config or {})

    def wandb_url(self) -> str | None:
        """The W&B run's page (None without W&B or offline)."""
        return getattr(self.wandb, "url", None) if self.wandb is not None else None

    def log(self, step: int, metrics: dict[str, Any], console: bool = True) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if console:
            print(self._line(step, metrics), flush=True)

    def _line(self, step: int, m: dict[str, Any]) -> str:
        c = (lambda code, s: f"{code}{s}{_RESET}") if self.color else (lambda code, s: s)
        parts = [c(_BOLD, f"step {step:>6d}/{self.total_steps}")]
        for key, fmt, code in (
            ("loss", "{:.4f}", _GREEN),
            ("ce", "{:.4f}", ""),
            ("kd", "{:.4f}", ""),
            ("masked_acc", "{:.3f}", ""),
            ("val_loss", "{:.4f}", _CYAN),
            ("val_masked_ce", "{:.4f}", _CYAN),
            ("val_masked_acc", "{:.3f}", _CYAN),
            ("val_answer_ce", "{:.4f}", _CYAN),
            ("val_answer_acc", "{:.3f}", _CYAN),
            ("val_answer_exact", "{:.3f}", _CYAN),
            ("grad_norm", "{:.3f}", ""),
            ("lr", "{:.2e}", ""),
            ("tokens_per_s", "{:,.0f}", _CYAN),
            ("mfu", "{:.2%}", _CYAN),
            ("mem_gib", "{:.2f}", _DIM),
        ):
            if key in m and m[key] is not None:
                parts.append(f"{key} " + c(code, fmt.format(m[key])))
        for key, value in m.items():
            if key.startswith(("task/", "eval/")) and isinstance(value, float):
                parts.append(f"{key.split('/', 1)[1]} {value:.3f}")
        if "eta_s" in m:
            parts.append("eta " + _fmt_eta(m["eta_s"]))
        return "  ".join(parts)

    def summary(self, values: dict[str, Any]) -> None:
        if self.enabled and self.wandb is not None:
            for k, v in values.items():
                self.wandb.summary[k] = v

    def reopen(self) -> None:
        """Append to ``metrics.jsonl`` as it is on disk now (after the file was replaced, e.g.
        truncated to a resumed checkpoint by an atomic rename)."""
        if self.enabled:
            self._file.close()
            self._file = open(self.path, "a")  # noqa: SIM115 -- appends across resumes

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(lg: LoggerConfig, run_dir: Path, run_config: dict):
    """Start (or continue, after a resume) the W&B run whose id is kept in run.dir."""
    import wandb

    id_file = run_dir / "wandb_id.txt"
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = secrets.token_hex(4)
        atomic_write_text(id_file, run_id)
    mode = os.environ.get("WANDB_MODE", lg.mode.value)
    run = wandb.init(
        project=lg.project,
        entity=lg.entity,
        name=lg.name or run_dir.name,
        group=lg.group,
        tags=list(lg.tags),
        mode=mode,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        config=_plain(run_config),
    )
    return run


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return getattr(obj, "value", obj)
