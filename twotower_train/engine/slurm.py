"""The end of a Slurm allocation: checkpoint, then come back (docs/slurm.md).

    time-limit warning   SIGUSR1 (``--signal=USR1@<secs>``): every rank checkpoints, rank 0
                         requeues the job itself (``scontrol requeue $SLURM_JOB_ID``) once the
                         checkpoint is complete on every rank, every rank exits 0
    preemption           SIGTERM (within the grace time): every rank checkpoints and exits 0;
                         Slurm's own requeue (``--requeue``) brings the job back

The requeued job has the same ``SLURM_JOB_ID`` and command line, hence the same ``run.dir``,
and resumes from its latest checkpoint. A run that finished its steps is not requeued;
``slurm.max_requeues`` bounds ``SLURM_RESTART_COUNT`` (Slurm's count of the job's requeues,
by ``scontrol requeue`` or by Slurm itself) so a job that keeps coming back does not loop
forever. Outside Slurm (no ``SLURM_JOB_ID``) a signal only checkpoints and exits.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from twotower_train.errors import TwoTowerError


class RequeueError(TwoTowerError, RuntimeError):
    """The run stopped unfinished and will not come back by itself; the message is one line.
    The command line exits with ``EXIT_NOT_REQUEUED``."""


EXIT_NOT_REQUEUED = 3


@dataclass(frozen=True)
class SlurmJob:
    job_id: str
    restart_count: int  # SLURM_RESTART_COUNT: 0 the first time, +1 per requeue

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> SlurmJob | None:
        """The batch job this process belongs to, or None outside Slurm."""
        env = os.environ if environ is None else environ
        job_id = env.get("SLURM_JOB_ID")
        if not job_id:
            return None
        return cls(job_id=job_id, restart_count=int(env.get("SLURM_RESTART_COUNT") or 0))


def check_restart_count(job: SlurmJob | None, max_requeues: int) -> None:
    """Refuse to start a job Slurm brought back more than ``max_requeues`` times."""
    if job is not None and job.restart_count > max_requeues:
        raise RequeueError(
            f"Slurm job {job.job_id} was requeued {job.restart_count} times, more than "
            f"slurm.max_requeues={max_requeues}: not starting (resubmit to continue from run.dir)"
        )


def end_of_allocation(
    signals: set[str], job: SlurmJob | None, max_requeues: int, *, finished: bool
) -> str | None:
    """What a run stopped by ``signals`` (the signal names any rank received) does after its
    checkpoint: ``"requeue"`` (rank 0 calls ``requeue``), or None (exit; Slurm requeues a
    preempted job itself). Raises ``RequeueError`` when ``max_requeues`` is reached.
    The same answer on every rank: it depends on the job's environment only."""
    if finished or job is None or "SIGUSR1" not in signals or "SIGTERM" in signals:
        return None
    if job.restart_count >= max_requeues:
        raise RequeueError(
            f"slurm.max_requeues={max_requeues} reached (SLURM_RESTART_COUNT="
            f"{job.restart_count}): checkpoint saved, job {job.job_id} not requeued "
            f"(resubmit to continue from run.dir)"
        )
    return "requeue"


def requeue(job: SlurmJob) -> None:
    """``scontrol requeue``: Slurm ends this job and queues it again under the same id."""
    if shutil.which("scontrol") is None:
        raise RequeueError(f"cannot requeue Slurm job {job.job_id}: no scontrol on PATH")
    proc = subprocess.run(
        ["scontrol", "requeue", job.job_id], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout).strip().splitlines()
        raise RequeueError(
            f"scontrol requeue {job.job_id} failed: {why[0] if why else proc.returncode}"
        )
