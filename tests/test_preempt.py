"""app/preempt.py and app/slurm.py: a stop signal on any rank stops every rank at the same
step; the world size is checked against the tasks Slurm started.

Single-process tests send signals to this process; the `mpi` tests run under `make test-mpi`
(every rank); the subprocess tests signal a real `mpiexec` as Slurm or a user would, and so
pin down how the MPI runtime in use delivers the signal (see slurm/README.md).
"""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from app import preempt
from app.errors import UserError
from app.slurm import check_world_matches_slurm
from app_util import ENV, MPIEXEC, OPEN_MPI, ROOT
from mpi_util import Verdict


@pytest.fixture
def handlers():
    """Installs preempt's handlers for one test and always takes them away again."""
    preempt.install()
    try:
        yield
    finally:
        preempt.uninstall()


def deliver(sig):
    """Sends `sig` to this process and lets Python run the handler (it runs in the main
    thread between bytecodes, at the latest at the next sleep)."""
    os.kill(os.getpid(), sig)
    time.sleep(0.01)


def test_no_signal_no_stop(handlers):
    assert preempt.received() is None
    assert preempt.stop_requested() is False
    assert preempt.stop_signal() is None


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_stop_signal_only_sets_the_flag(handlers, sig):
    deliver(sig)  # without our handler, either would end the test process
    assert preempt.received() == sig.name
    assert preempt.stop_requested() is True
    assert preempt.stop_signal() == sig.name
    assert preempt.stop_requested() is True  # the flag stays set: the stop is not undone


def test_sigterm_wins_over_sigusr1_whatever_the_order(handlers):
    deliver(signal.SIGTERM)
    deliver(signal.SIGUSR1)
    assert preempt.stop_requested() and preempt.stop_signal() == "SIGTERM"


def test_install_clears_the_flag_and_uninstall_restores_the_previous_handlers():
    seen = []
    before = {sig: signal.getsignal(sig) for sig in preempt.SIGNALS}
    signal.signal(signal.SIGUSR1, lambda *a: seen.append("theirs"))
    try:
        with preempt.installed():
            deliver(signal.SIGUSR1)
            assert preempt.received() == "SIGUSR1" and seen == []
        with preempt.installed():
            assert preempt.received() is None  # a new run starts unflagged
            preempt.install()  # twice: uninstall still restores the handler from before
        assert signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM]
        deliver(signal.SIGUSR1)
        assert seen == ["theirs"]
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_sigint_stays_ctrl_c():
    # Python's own handler first: a shell that starts the tests in the background hands
    # them SIGINT ignored, and preempt must leave whatever it finds
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with preempt.installed():
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            with pytest.raises(KeyboardInterrupt):
                deliver(signal.SIGINT)
            assert preempt.received() is None
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_the_handler_does_nothing_but_set_the_flag():
    """No I/O, no MPI, no exception: whatever the main thread was doing goes on."""
    import dis
    calls = [i.argval for i in dis.get_instructions(preempt._handler)
             if i.opname in ("LOAD_GLOBAL", "LOAD_NAME", "LOAD_ATTR")]
    assert set(calls) <= {"max", "_received"}, calls


# --- under mpiexec: every rank runs these (make test-mpi) ---

@pytest.mark.mpi(min_size=2)
def test_a_signal_on_one_rank_stops_every_rank():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    verdict = Verdict()
    preempt.install()
    try:
        with verdict.guard("no signal yet"):
            assert preempt.stop_requested(comm) is False
        comm.Barrier()
        if rank == size - 1:
            deliver(signal.SIGUSR1)
        with verdict.guard("after SIGUSR1 on the last rank"):
            assert preempt.stop_requested(comm) is True
            assert preempt.stop_signal() == "SIGUSR1"
            assert preempt.received() == ("SIGUSR1" if rank == size - 1 else None)
        if rank == 1:
            deliver(signal.SIGTERM)
        with verdict.guard("after SIGTERM on rank 1 as well"):
            assert preempt.stop_requested(comm) is True
            assert preempt.stop_signal() == "SIGTERM"
    finally:
        preempt.uninstall()
    verdict.check(comm)


@pytest.mark.mpi(min_size=2)
def test_the_check_costs_a_small_allreduce():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    preempt.install()
    try:
        comm.Barrier()
        start = time.perf_counter()
        for _ in range(200):
            preempt.stop_requested(comm)
        per_call = (time.perf_counter() - start) / 200
    finally:
        preempt.uninstall()
    # Generous: tens of us on 4 ranks here, oversubscribed 2 cores included; a step is ms.
    times = comm.allgather(per_call)
    assert max(times) < 0.005, times


# --- a real job, signalled through mpiexec ---

STEPS = """
import sys, time
from mpi4py import MPI
from app import preempt
from app.failures import run_guarded
comm = MPI.COMM_WORLD

def job():
    preempt.install()
    comm.Barrier()
    if comm.Get_rank() == 0:
        print("ready", flush=True)
    for step in range(100000):
        time.sleep(0.01 * (comm.Get_rank() + 1))   # ranks reach the boundary at their own pace
        if preempt.stop_requested(comm):
            print(f"rank {comm.Get_rank()} stopped at step {step}: {preempt.stop_signal()} "
                  f"(here: {preempt.received()})", flush=True)
            return preempt.REQUEUE_EXIT_CODE
    return 0

sys.exit(run_guarded(job))
"""


def signal_mpiexec(sig):
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec beside {sys.executable}")
    job = subprocess.Popen([str(MPIEXEC), "-n", "2", sys.executable, "-c", STEPS], cwd=ROOT,
                           env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert job.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        job.send_signal(sig)
        out, err = job.communicate(timeout=30)
    finally:
        job.kill()
        job.wait()
    return job.returncode, out, err


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_mpiexec_forwards_the_signal_and_all_ranks_stop_at_one_step(sig):
    if sig == signal.SIGTERM and OPEN_MPI:
        pytest.skip("Open MPI's mpirun sends SIGTERM, then SIGKILL 0.25 s later: "
                    "the batch scripts forward SIGUSR1 to it instead")
    status, out, err = signal_mpiexec(sig)
    assert status == preempt.REQUEUE_EXIT_CODE, (status, out, err)
    # mpiexec forwards each rank's lines whole, but may join two ranks' without a newline
    stops = re.findall(r"rank (\d) stopped at step (\d+): (\w+) \(here: (\w+)\)", out)
    assert sorted(rank for rank, *_ in stops) == ["0", "1"], (out, err)
    assert len({step for _, step, *_ in stops}) == 1, stops  # the same step on both ranks
    assert all(agreed == here == sig.name for *_, agreed, here in stops), stops


# --- the world size against Slurm's task count ---

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4"}


def test_outside_slurm_anything_goes():
    check_world_matches_slurm(1, {})
    check_world_matches_slurm(3, {"SLURM_NTASKS": "4"})  # no job id: a stale variable


def test_srun_starting_single_rank_jobs_is_refused():
    env = {**SLURM, "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "2"}
    with pytest.raises(UserError, match=r"srun started 4 tasks .* world of 1 rank: ") as err:
        check_world_matches_slurm(1, env)
    assert "\n" not in str(err.value) and "mpiexec" in str(err.value)
    check_world_matches_slurm(4, env)


def test_mpiexec_daemons_started_by_srun_are_fine():
    """Hydra and Open MPI start one daemon per node with srun: ranks inherit that step."""
    check_world_matches_slurm(8, {**SLURM, "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2"})


def test_mpiexec_in_the_batch_script_must_use_every_task():
    check_world_matches_slurm(4, SLURM)
    for world in (2, 8):
        with pytest.raises(UserError, match=rf"job has 4 tasks .* MPI started {world} ranks"):
            check_world_matches_slurm(world, SLURM)


def test_a_job_without_a_task_count_is_not_checked():
    check_world_matches_slurm(3, {"SLURM_JOB_ID": "1"})
    check_world_matches_slurm(3, {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "garbage"})
