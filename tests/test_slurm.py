"""slurm/*.sbatch and slurm/launch.sh: the batch scripts run under plain bash and under a
fake Slurm (SLURM_* variables, `srun` and `scontrol` shims on PATH), pick a launcher that
can start this environment's MPI, train, and turn a stop signal into a checkpoint and a
requeue.

What the shims stand for: `srun` starts its command once per task with the variables srun
sets (SLURM_STEP_NUM_TASKS, SLURM_PROCID, SLURM_NODEID); when that command is a rank
rather than a launcher's per-node daemon, it runs the tasks under this machine's mpiexec,
as a real srun would through a PMI the MPI library speaks (FAKE_PMI=none: as single-rank
jobs, as with a mismatched MPI). `scontrol show job` names the submitted script; `scontrol
requeue` is written down.
"""
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from app import preempt
from app_util import ENV, MPIEXEC, OPEN_MPI, ROOT

SCRIPTS = [ROOT / "slurm/train.sbatch", ROOT / "slurm/multinode.sbatch"]
LAUNCH = ROOT / "slurm/launch.sh"
FAST = ["--config", "tiny", "--steps", "3", "--sample-tokens", "0", "--peak-gflops", "100",
        "--eval-windows", "2"]
MPIEXEC_ARGS = "--oversubscribe" if OPEN_MPI else "-launcher fork"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")

FAKE_SRUN = r"""#!/bin/bash
n="${SLURM_NTASKS:-1}"
while [[ $# -gt 0 && "$1" == -* ]]; do
    case "$1" in
        -n | --ntasks) n="$2"; shift 2 ;;
        --ntasks=*) n="${1#*=}"; shift ;;
        -N | --nodes | --nodelist | -w | --input | --mpi | -c | --cpus-per-task) shift 2 ;;
        *) shift ;;
    esac
done
echo "srun -n $n $*" >> "$FAKE_SLURM_LOG"
export SLURM_STEP_ID=0 SLURM_STEP_NUM_TASKS="$n" SLURM_NTASKS="$n"
case "$(basename "$1")" in
    hydra_pmi_proxy | prted) ;;       # a launcher's daemons: one per node, as below
    *) if [[ "${FAKE_PMI:-}" != none ]]; then
           # shellcheck disable=SC2086
           exec "$FAKE_MPIEXEC" $FAKE_MPIEXEC_ARGS -n "$n" "$@"
       fi ;;
esac
pids=()
for ((i = 0; i < n; i++)); do
    SLURM_NODEID="$i" SLURM_PROCID="$i" SLURM_LOCALID=0 "$@" &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit "$rc"
"""

FAKE_SCONTROL = r"""#!/bin/bash
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
case "$1" in
    show) echo "JobId=$3 JobName=gpt-mpi"; echo "   Command=$FAKE_COMMAND --config x" ;;
    requeue) exit "${FAKE_REQUEUE_STATUS:-0}" ;;
esac
"""


@pytest.fixture
def slurm(tmp_path):
    """A fake Slurm: returns (env, log path); env has no SLURM_JOB_ID until a test sets one."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "slurm.log"
    log.touch()
    env = clean_env()
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_SLURM_LOG=str(log),
               FAKE_MPIEXEC=str(MPIEXEC), FAKE_MPIEXEC_ARGS=MPIEXEC_ARGS,
               FAKE_COMMAND=str(ROOT / "slurm/train.sbatch"))
    return env, log


def clean_env(**extra):
    """This machine's environment without Slurm's or the scripts' settings, plus `extra`."""
    env = {k: v for k, v in ENV.items() if not k.startswith(("SLURM_", "SRUN_")) and k not in
           {"CONDA_ENV", "VENV", "PYTHON", "LAUNCHER", "MPIEXEC", "NTASKS", "DATA", "RESUME",
            "MAX_RESTARTS", "DRY_RUN", "GPT_MPI_ROOT"}}
    env.pop("PYTHONPATH", None)  # the scripts find the repository themselves
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def fake_job(env, ntasks=2, nodes=1, job_id="4242", **extra):
    host = socket.gethostname()
    nodelist = ",".join([host, "localhost"][:nodes])
    return {**env, "SLURM_JOB_ID": job_id, "SLURM_JOB_NAME": "gpt-mpi", "SLURM_NTASKS": str(ntasks),
            "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NNODES": str(nodes),
            "SLURM_JOB_NODELIST": nodelist, "SLURM_NODELIST": nodelist,
            "SLURM_TASKS_PER_NODE": f"{ntasks // nodes}(x{nodes})",
            "SLURM_CPUS_PER_TASK": "1", **extra}


def run(script, *args, env, cwd=None, timeout=60):
    return subprocess.run(["bash", str(script), *map(str, args)], env=env, cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout)


def dry(script, *args, env):
    result = run(script, *args, env={**env, "DRY_RUN": "1"}, cwd="/")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


# --- the text of the scripts ---

@pytest.mark.parametrize("script", SCRIPTS + [LAUNCH], ids=lambda p: p.name)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("no shellcheck (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS + [LAUNCH])], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_sbatch_options(script):
    text = script.read_text()
    options = re.findall(r"^#SBATCH (\S+)(.*)$", text, re.M)
    assert all(not rest.strip() for _, rest in options), "a comment after an #SBATCH option"
    options = dict((o + "=").split("=")[:2] for o, _ in options)
    assert options["--signal"] == "B:USR1@120" and "--requeue" in text
    assert "/" not in options["--output"], "Slurm creates no directory for its log"
    assert options["--open-mode"] == "append"
    # #SBATCH lines count only before the first command
    first_command = min(i for i, line in enumerate(text.splitlines())
                        if line.strip() and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(text.splitlines())
               if line.startswith("#SBATCH"))


def test_both_scripts_find_the_repository_alike():
    def function(path):
        text = path.read_text()
        return text[text.index("repo_root() {"):text.index("ROOT=")]
    assert function(SCRIPTS[0]) == function(SCRIPTS[1])


def test_requeue_code_is_the_trainers():
    assert f"REQUEUE_EXIT_CODE={preempt.REQUEUE_EXIT_CODE} " in LAUNCH.read_text()


# --- which launcher, which arguments (DRY_RUN: the command, not run) ---

def test_no_slurm_runs_the_environments_mpiexec_here(slurm):
    env, _ = slurm
    line = dry(SCRIPTS[0], "--config", "tiny", env={**env, "NTASKS": "3"})
    assert line.startswith(f"{MPIEXEC} -n 3 ")
    assert f"{sys.executable} -m app train --data data/embedded.h5 --resume auto --config tiny" \
        in line
    assert "--out" not in line  # the trainer names the run directory


def test_default_environment_is_the_repositorys_venv(slurm):
    if not (ROOT / ".venv/bin/mpiexec").exists():
        pytest.skip("no .venv with mpiexec (make setup)")
    env, _ = slurm
    env.pop("PYTHON")
    assert dry(SCRIPTS[0], env=env).startswith(f"{ROOT}/.venv/bin/mpiexec -n 4 {ROOT}/.venv/")


def test_one_node_job_forks_ranks_in_the_batch_step(slurm):
    env, _ = slurm
    line = dry(SCRIPTS[0], "--config", "tiny", env=fake_job(env, ntasks=2, job_id="77"))
    assert line.startswith(f"{MPIEXEC} -n 2 ")
    if not OPEN_MPI:
        assert " -launcher fork " in line
    assert "--out runs/gpt-mpi-77 --resume auto --config tiny" in line


def test_multinode_job_places_ranks_per_node(slurm):
    env, _ = slurm
    line = dry(SCRIPTS[1], env=fake_job(env, ntasks=8, nodes=2))
    assert line.startswith(f"{MPIEXEC} -n 8 ")
    assert ("--bind-to none" if OPEN_MPI else " -ppn 4 ") in line


def test_site_mpi_is_started_with_srun(slurm, tmp_path):
    """An environment without mpiexec of its own (mpi4py on the site MPI): srun."""
    env, _ = slurm
    bare = tmp_path / "site_env/bin"
    bare.mkdir(parents=True)
    (bare / "python").symlink_to(sys.executable)
    line = dry(SCRIPTS[0], env=fake_job({**env, "PYTHON": str(bare / "python")}))
    assert line.startswith(f"srun --kill-on-bad-exit=0 {bare}/python -m app train ")


def test_the_users_out_resume_and_launcher_win(slurm):
    env, _ = slurm
    job = fake_job(env)
    line = dry(SCRIPTS[0], "--out", "runs/mine", "--resume=auto", env=job)
    assert "runs/gpt-mpi" not in line and line.count("--resume") == 1
    assert "--resume" not in dry(SCRIPTS[0], env={**job, "RESUME": ""})
    assert dry(SCRIPTS[0], env={**job, "LAUNCHER": "srun"}).startswith("srun ")


def test_refusals_are_one_line(slurm):
    env, _ = slurm
    for bad, fragment in (({"LAUNCHER": "ssh"}, "LAUNCHER=ssh: expected auto, srun or "),
                          ({"SLURM_NTASKS": ""}, "the job states no task count"),
                          ({"PYTHON": "", "VENV": "/nonexistent"}, "no Python environment"),
                          ({"PYTHON": "", "CONDA_ENV": "x", "CONDA_EXE": "",
                            "PATH": "/usr/bin:/bin"}, "no conda found")):
        result = run(SCRIPTS[0], env={**fake_job(env), **bad, "DRY_RUN": "1"})
        assert result.returncode == 2, (bad, result.stderr)
        assert result.stderr.startswith("launch: error: ") and fragment in result.stderr
        assert result.stderr.count("\n") == 1, result.stderr


# --- real runs ---

def test_trains_without_slurm_from_any_directory(slurm, tiny_h5, tmp_path):
    env, _ = slurm
    out = tmp_path / "run"
    result = run(SCRIPTS[0], *FAST, "--out", out, cwd=tmp_path,
                 env={**env, "NTASKS": "2", "DATA": str(tiny_h5)})
    assert result.returncode == 0, result.stderr
    assert (out / "params.h5").exists() and (out / "metrics.jsonl").exists()
    assert "2 ranks on 1 node(s) with mpiexec" in result.stderr


def test_trains_as_a_one_node_job_from_the_spool_copy(slurm, tiny_h5, tmp_path):
    """Slurm runs a copy of the script; the submit directory is elsewhere: scontrol's
    Command= leads back to the repository. No srun is needed on one node."""
    env, log = slurm
    spool = tmp_path / "spool/job4242"
    spool.mkdir(parents=True)
    shutil.copy(SCRIPTS[0], spool / "slurm_script")
    (tmp_path / "submit").mkdir()
    out = tmp_path / "run"
    result = run(spool / "slurm_script", *FAST, "--out", out, cwd=tmp_path / "submit",
                 env=fake_job(env, SLURM_SUBMIT_DIR=str(tmp_path / "submit"),
                              DATA=str(tiny_h5)))
    assert result.returncode == 0, result.stderr
    assert (out / "params.h5").exists()
    assert "scontrol show job 4242" in log.read_text() and "srun" not in log.read_text()


@pytest.mark.skipif(OPEN_MPI, reason="emulates Hydra's per-node proxies (MPICH)")
def test_trains_as_a_two_node_job(slurm, tiny_h5, tmp_path):
    """Hydra starts one proxy per node with srun (the shim runs both here)."""
    env, log = slurm
    out = tmp_path / "run"
    result = run(SCRIPTS[1], *FAST, "--out", out,
                 env=fake_job(env, ntasks=2, nodes=2, DATA=str(tiny_h5)))
    assert result.returncode == 0, result.stderr
    assert (out / "params.h5").exists()
    assert re.search(r"srun -n 2 .*hydra_pmi_proxy", log.read_text()), log.read_text()


def test_trains_with_srun_and_a_matching_mpi(slurm, tiny_h5, tmp_path):
    env, log = slurm
    out = tmp_path / "run"
    result = run(SCRIPTS[0], *FAST, "--out", out,
                 env=fake_job(env, LAUNCHER="srun", DATA=str(tiny_h5)))
    assert result.returncode == 0, result.stderr
    assert (out / "params.h5").exists()
    assert "srun -n 2 " in log.read_text()


def test_srun_with_a_mismatched_mpi_is_refused(slurm, tiny_h5, tmp_path):
    env, _ = slurm
    result = run(SCRIPTS[0], *FAST, "--out", tmp_path / "run",
                 env=fake_job(env, LAUNCHER="srun", FAKE_PMI="none", DATA=str(tiny_h5)))
    assert result.returncode == 2, result.stderr
    assert "srun started 2 tasks (SLURM_STEP_NUM_TASKS) but MPI sees a world of 1 rank" \
        in result.stderr


# --- stopping: a signal to the batch shell reaches every rank; exit 75 requeues ---

RANKS = r"""
import sys, time
from mpi4py import MPI
from app import preempt
comm = MPI.COMM_WORLD
preempt.install()
comm.Barrier()
if comm.Get_rank() == 0:
    print("ready", flush=True)
for step in range(100000):
    time.sleep(0.02)
    if preempt.stop_requested(comm):
        print(f"rank {comm.Get_rank()} stopped at step {step} on {preempt.stop_signal()}",
              flush=True)
        sys.exit(preempt.REQUEUE_EXIT_CODE)
"""


@pytest.fixture
def ranks_stand_in(tmp_path):
    """A `python` that runs RANKS in place of `-m app train` (and is python otherwise)."""
    bin_dir = tmp_path / "standin/bin"
    bin_dir.mkdir(parents=True)
    (tmp_path / "ranks.py").write_text(RANKS)
    (bin_dir / "python").write_text(
        f'#!/bin/bash\nif [[ "$1 $2 $3" == "-m app train" ]]; then\n'
        f'    PYTHONPATH={ROOT} exec {sys.executable} {tmp_path / "ranks.py"}\nfi\n'
        f'exec {sys.executable} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    return {"PYTHON": str(bin_dir / "python"), "MPIEXEC": str(MPIEXEC)}


def signal_job(env, sig, timeout=60):
    job = subprocess.Popen(["bash", str(SCRIPTS[0])], env=env, cwd=ROOT, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert job.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        job.send_signal(sig)  # as Slurm signals the batch shell (--signal=B:USR1@120)
        out, err = job.communicate(timeout=timeout)
    finally:
        job.kill()
        job.wait()
    return job.returncode, out, err


def test_sigusr1_to_the_batch_shell_stops_the_ranks_and_requeues(slurm, ranks_stand_in,
                                                                tiny_h5):
    env, log = slurm
    status, out, err = signal_job(fake_job({**env, **ranks_stand_in}, DATA=str(tiny_h5)),
                                  signal.SIGUSR1)
    assert status == preempt.REQUEUE_EXIT_CODE, (status, out, err)
    assert len(set(re.findall(r"stopped at step (\d+) on SIGUSR1", out))) == 1, out
    assert out.count("stopped at step") == 2, out
    assert "scontrol requeue 4242" in log.read_text()
    assert "job 4242 requeued" in err


def test_sigterm_stops_the_ranks_without_requeue(slurm, ranks_stand_in, tiny_h5):
    env, log = slurm
    status, out, err = signal_job(fake_job({**env, **ranks_stand_in}, DATA=str(tiny_h5)),
                                  signal.SIGTERM)
    assert status == preempt.REQUEUE_EXIT_CODE, (status, out, err)
    assert out.count("stopped at step") == 2, out
    assert "requeue" not in log.read_text() and "not requeueing" in err


def test_no_requeue_after_max_restarts_or_outside_slurm(slurm, ranks_stand_in, tiny_h5):
    env, log = slurm
    status, _, err = signal_job(fake_job({**env, **ranks_stand_in}, DATA=str(tiny_h5),
                                         SLURM_RESTART_COUNT="3", MAX_RESTARTS="3"),
                                signal.SIGUSR1)
    assert status == preempt.REQUEUE_EXIT_CODE and "after 3 restarts" in err, err
    status, _, err = signal_job({**env, **ranks_stand_in, "NTASKS": "2", "DATA": str(tiny_h5)},
                                signal.SIGUSR1)
    assert status == preempt.REQUEUE_EXIT_CODE and "run the same command again" in err, err
    assert "requeue" not in log.read_text()


def test_the_trainer_stops_with_a_checkpoint_and_the_requeued_job_resumes(slurm, tiny_h5,
                                                                         tmp_path):
    from app.checkpoint import list_checkpoints
    env, log = slurm
    out = tmp_path / "run"
    args = [*FAST, "--steps", "200", "--log-interval", "1", "--save-interval", "0",
            "--out", str(out)]
    job_env = fake_job(env, DATA=str(tiny_h5))
    job = subprocess.Popen(["bash", str(SCRIPTS[0]), *args], env=job_env, cwd=ROOT,
                           text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for line in job.stdout:
            if line.startswith("step     1/200 | loss "):
                break
        job.send_signal(signal.SIGUSR1)  # as Slurm does 120 s before the time limit
        stdout, stderr = job.communicate(timeout=60)
    finally:
        job.kill()
        job.wait()
    assert job.returncode == preempt.REQUEUE_EXIT_CODE, stderr
    assert "scontrol requeue 4242" in log.read_text()
    assert "SIGUSR1" in stdout, stdout
    saved = list_checkpoints(out)
    assert saved, list(out.iterdir())
    # The requeued job: same id, same script and arguments; it resumes and finishes.
    result = run(SCRIPTS[0], *args, env={**job_env, "SLURM_RESTART_COUNT": "1"})
    assert result.returncode == 0, result.stderr
    assert f"resumed from {saved[0]}" in result.stdout, result.stdout
    assert (out / "params.h5").exists()
