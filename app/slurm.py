"""Checks that only make sense under Slurm.

`check_world_matches_slurm` catches the classic mis-launch: `srun -n 4 python -m app train`
with an MPI library that cannot talk to srun's process manager (PyPI's or conda-forge's
MPICH and Open MPI expect their own mpiexec). Every task then starts an MPI job of its own,
four single-rank jobs that each believe they are the whole run, write the same run
directory and train four times over. The check turns that into one line at start.

Which numbers are compared, and why not always SLURM_NTASKS:

- srun started this process, or an ancestor (SLURM_STEP_NUM_TASKS is set; srun sets it for
  the tasks of a step): the world must hold at least as many ranks as the step has tasks.
  More is fine: an mpiexec/mpirun inside the allocation starts one daemon per node with
  srun (Hydra's hydra_pmi_proxy, Open MPI's prted), and the ranks under those daemons
  inherit the daemons' step, whose task count is the number of nodes (seen here with
  MPICH 5.0.2: SLURM_NTASKS=1, SLURM_STEP_NUM_TASKS=1 in each of 2 ranks).
- otherwise (ranks started by an mpiexec running in the batch script, on one node): the
  world must equal SLURM_NTASKS, the tasks the job asked for.
"""
import os

from app.errors import UserError


def check_world_matches_slurm(world_size: int, environ=None) -> None:
    """Raises UserError when the MPI world does not match the tasks Slurm started; does
    nothing outside Slurm (no SLURM_JOB_ID) or when the job states no task count."""
    env = os.environ if environ is None else environ
    if not env.get("SLURM_JOB_ID"):
        return
    step_tasks = _count(env, "SLURM_STEP_NUM_TASKS")
    if step_tasks is not None:
        if world_size < step_tasks:
            raise UserError(
                f"srun started {step_tasks} tasks (SLURM_STEP_NUM_TASKS) but MPI sees a world "
                f"of {world_size} rank{'s' * (world_size != 1)}: each task runs a job of its "
                "own, because the MPI library mpi4py loaded does not speak srun's PMI; "
                "expected srun --mpi=pmix or pmi2 to match the site MPI, or the environment's "
                "own mpiexec for a PyPI or conda-forge MPI (slurm/train.sbatch picks one)")
        return
    tasks = _count(env, "SLURM_NTASKS")
    if tasks is not None and world_size != tasks:
        raise UserError(
            f"the Slurm job has {tasks} tasks (SLURM_NTASKS) but MPI started {world_size} "
            f"rank{'s' * (world_size != 1)}: expected mpiexec -n {tasks}, or sbatch "
            f"--ntasks={world_size}")


def _count(env, name):
    value = env.get(name, "").strip()
    try:
        return int(value) if value else None
    except ValueError:  # never ours to refuse: Slurm wrote it
        return None
