"""Stand-ins for ``sbatch``, ``srun`` and ``scontrol`` that run a Slurm batch script on this
machine, for the tests of slurm/*.sbatch (tests/test_slurm.py). ``install(bin_dir, state)``
writes them; put ``bin_dir`` first on PATH.

- ``sbatch [--opt=value ...] SCRIPT [ARGS]``: reads the script's ``#SBATCH`` lines (the
  command line's options win), exports the ``SLURM_*`` variables of a job on
  ``--nodes`` local "nodes" and runs ``bash SCRIPT ARGS`` in the foreground (as ``sbatch
  --wait`` would). Like the controller, it runs the script again with
  ``SLURM_RESTART_COUNT`` + 1 whenever the job asked for a requeue while it ran
  (``$FAKE_SLURM_RESTART_COUNT``: the first run's count, as after Slurm's own requeue).
  Each run is a line of ``STATE/runs.jsonl``; the exit status is the last run's.
- ``srun [--ntasks-per-node=N] CMD ...``: starts the step's tasks (``SLURM_PROCID``,
  ``SLURM_LOCALID``, ``SLURM_NODEID``, ``SLURM_NTASKS``), writes their pids to
  ``STATE/tasks.json`` (where a test sends Slurm's signals), waits, returns the highest exit
  status; ``--kill-on-bad-exit=1`` kills the others when one fails.
- ``scontrol show hostnames LIST``: one ``127.0.0.1`` per node; ``scontrol requeue ID``:
  checks the id, appends to ``STATE/requeues.jsonl``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Both commands read their options the same way: --key=value (or --flag) up to the first
# argument that is not an option.
_OPTIONS = r"""
state = Path(os.environ["FAKE_SLURM_STATE"])
args = sys.argv[1:]
opts, i = {}, 0
while i < len(args) and args[i].startswith("-"):
    key, _, value = args[i].lstrip("-").partition("=")
    opts[key] = value
    i += 1
"""

_SBATCH = (
    r"""
import json, os, re, subprocess, sys
from pathlib import Path
"""
    + _OPTIONS
    + r"""script, script_args = args[i], args[i + 1:]
directives = {}
for line in Path(script).read_text().splitlines():
    m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
    if m:
        directives[m.group(1)] = m.group(2) or ""
directives.update(opts)
nodes = int(directives.get("nodes", "1"))
per_node = int(directives.get("ntasks-per-node", "1"))
job_id = os.environ.get("FAKE_SLURM_JOB_ID", "1000")
env = dict(os.environ)
env.update(
    SLURM_JOB_ID=job_id,
    SLURM_JOB_NAME=directives.get("job-name", "fake"),
    SLURM_JOB_NODELIST=f"node[0-{nodes - 1}]" if nodes > 1 else "node0",
    SLURM_JOB_NUM_NODES=str(nodes),
    SLURM_NNODES=str(nodes),
    SLURM_NTASKS=str(nodes * per_node),
    SLURM_NTASKS_PER_NODE=str(per_node),
    SLURM_CPUS_PER_TASK=directives.get("cpus-per-task", "1"),
    SLURM_GPUS_ON_NODE=directives.get("gpus-per-node", "0"),
    SLURM_SUBMIT_DIR=os.getcwd(),
)
(state / "directives.json").write_text(json.dumps(directives))
restart = int(os.environ.get("FAKE_SLURM_RESTART_COUNT", "0"))  # > 0: a job Slurm requeued
while True:
    if restart:
        env["SLURM_RESTART_COUNT"] = str(restart)
    before = len((state / "requeues.jsonl").read_text().splitlines()) if (state / "requeues.jsonl").exists() else 0
    proc = subprocess.run(["bash", script, *script_args], env=env)
    after = len((state / "requeues.jsonl").read_text().splitlines()) if (state / "requeues.jsonl").exists() else 0
    with open(state / "runs.jsonl", "a") as f:
        f.write(json.dumps({"job_id": job_id, "restart": restart, "returncode": proc.returncode}) + "\n")
    if after == before:
        sys.exit(proc.returncode)
    restart += 1
"""
)

_SRUN = (
    r"""
import json, os, signal, subprocess, sys, time
from pathlib import Path
"""
    + _OPTIONS
    + r"""cmd = args[i:]
nodes = int(os.environ["SLURM_JOB_NUM_NODES"])
per_node = int(opts.get("ntasks-per-node", os.environ["SLURM_NTASKS_PER_NODE"]))
procs = []
for rank in range(nodes * per_node):
    env = dict(os.environ)
    env.update(
        SLURM_PROCID=str(rank),
        SLURM_LOCALID=str(rank % per_node),
        SLURM_NODEID=str(rank // per_node),
        SLURM_NTASKS=str(nodes * per_node),
        SLURM_STEP_ID="0",
    )
    procs.append(subprocess.Popen(cmd, env=env))
restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
tmp = state / "tasks.json.tmp"
tmp.write_text(json.dumps({"restart": restart, "pids": [p.pid for p in procs]}))
os.replace(tmp, state / "tasks.json")
kill_on_bad_exit = opts.get("kill-on-bad-exit") == "1"
while any(p.poll() is None for p in procs):
    if kill_on_bad_exit and any(p.poll() not in (None, 0) for p in procs):
        time.sleep(2)
        for p in procs:
            if p.poll() is None:
                p.kill()
    time.sleep(0.05)
sys.exit(max(p.returncode if p.returncode >= 0 else 128 - p.returncode for p in procs))
"""
)

_SCONTROL = r"""
import json, os, re, sys
from pathlib import Path

state = Path(os.environ["FAKE_SLURM_STATE"])
args = sys.argv[1:]
if args[:2] == ["show", "hostnames"]:
    m = re.fullmatch(r"\w+\[(\d+)-(\d+)\]", args[2])
    count = int(m.group(2)) - int(m.group(1)) + 1 if m else 1
    print("\n".join(["127.0.0.1"] * count))
elif args[:1] == ["requeue"]:
    if args[1:] != [os.environ.get("SLURM_JOB_ID")]:
        sys.exit(f"scontrol: error: Invalid job id specified: {args[1:]}")
    with open(state / "requeues.jsonl", "a") as f:
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        f.write(json.dumps({"job_id": args[1], "restart": restart}) + "\n")
else:
    sys.exit(f"fake scontrol: unsupported {args}")
"""


def install(bin_dir: Path, state: Path) -> None:
    """Write the fake ``sbatch``, ``srun`` and ``scontrol`` into ``bin_dir`` (their state:
    ``state``, passed to them as $FAKE_SLURM_STATE)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    state.mkdir(parents=True, exist_ok=True)
    for name, body in (("sbatch", _SBATCH), ("srun", _SRUN), ("scontrol", _SCONTROL)):
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(0o755)
