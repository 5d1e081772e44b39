"""Parameter-server mode (comm/ps.py, app/parallel/ps.py): synchronous training, and the
asynchronous mode at staleness 0, equal the single process on the same global batch
(float64, 5 steps, rtol 1e-5), through the whole trainer on the 4 ranks of `mpiexec -n 4`;
a stale run stays within its bound; bad settings are one line on every rank."""
import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from app.config import make_config
from app.errors import UserError
from app.parallel.layout import plan
from app.prepare import prepare
from app.trainer import train
from app_util import ENV, FAST, ROOT, app, assert_user_error, command
from tests.mpi_util import Verdict, groups_of, shared_tmpdir, skip_unless_ranks

MPI = pytest.importorskip("mpi4py.MPI")

MODEL = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=12, steps=5,
             lr=3e-3, min_lr=3e-4, warmup_steps=2, dtype="float64", log_interval=1,
             eval_interval=5, eval_windows=4, sample_tokens=0, seed=5)
RTOL = 1e-5


def run(values, run_dir, comm):
    return train(make_config(values), run_dir, peak_gflops=1.0, log=lambda *a: None,
                 comm=comm)


CASES = {  # name: overrides (4 ranks)
    "sync 1 server + 3 workers": dict(mode="ps", servers=1),
    "sync 2 servers + 2 workers": dict(mode="ps", servers=2, micro_batches=2),
    "async k=0, 1 server + 3 workers": dict(mode="ps", servers=1, staleness=0,
                                            staleness_lr=True),
    "dynamic balancing, k=0": dict(mode="ps", servers=1, balance="dynamic", micro_batches=2),
}


@pytest.fixture(scope="module")
def corpus():
    world = MPI.COMM_WORLD
    with shared_tmpdir(world) as tmpdir:
        if world.Get_rank() == 0:
            (tmpdir / "c.txt").write_text(" ".join(f"w{i % 37} x{i % 11}" for i in range(4000)))
            prepare([tmpdir / "c.txt"], tmpdir / "c.h5")
        world.Barrier()
        yield tmpdir


_reference = {}


def reference(tmpdir):
    if not _reference:
        rank = MPI.COMM_WORLD.Get_rank()
        _reference["run"] = run(dict(MODEL, data=str(tmpdir / "c.h5")), tmpdir / f"r{rank}",
                                MPI.COMM_SELF)
    return _reference["run"]


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("name", list(CASES) + ["sync 1 server + 3 workers, staged"])
def test_parameter_server_matches_one_process(name, corpus):
    """staged: pulls and pushes through host buffers (comm/backend.py), as a GPU worker's on
    an MPI that cannot read device memory, forced on NumPy buffers."""
    from comm import backend
    skip_unless_ranks(4, name)
    world, verdict = MPI.COMM_WORLD, Verdict()
    with verdict.guard("reference"):
        ref = reference(corpus)
    group = groups_of(world, 4)
    staged = name.endswith(", staged")
    values = dict(MODEL, data=str(corpus / "c.h5"), **CASES[name.removesuffix(", staged")])
    got = None
    with verdict.guard(name), \
            backend.forced_host_staging() if staged else contextlib.nullcontext():
        before = backend.staged_bytes[0]
        got = run(values, corpus / name.replace(" ", "_").replace(",", ""), group)
    if group.Get_rank() >= values["servers"] and staged:  # a worker's pulls and pushes
        with verdict.guard(f"{name}: staging"):
            assert backend.staged_bytes[0] > before, "nothing went through a host buffer"
    if group.Get_rank() >= values["servers"]:  # workers hold the losses and parameters
        verdict.close(f"{name} losses", got["loss"], ref["loss"], RTOL)
        verdict.close(f"{name} val", list(got["val"].values()), list(ref["val"].values()), RTOL)
        verdict.close(f"{name} parameters", got["params"].flat, ref["params"].flat, RTOL,
                      atol=1e-12)
    group.Free()
    verdict.check(world)


@pytest.mark.mpi(min_size=4)
def test_stale_gradients_stay_within_the_bound_and_are_counted(corpus):
    skip_unless_ranks(4, "async k=2")
    world, verdict = MPI.COMM_WORLD, Verdict()
    group = groups_of(world, 4)
    values = dict(MODEL, data=str(corpus / "c.h5"), mode="ps", servers=1, staleness=2,
                  straggler="3:20", steps=8)
    run_dir = corpus / "stale"
    with verdict.guard("run"):
        got = run(values, run_dir, group)
    if group.Get_rank() == 1:  # the first worker writes metrics.jsonl
        with verdict.guard("histogram"):
            records = [json.loads(line) for line in
                       (run_dir / "metrics.jsonl").read_text().splitlines()]
            counts = np.zeros(3, int)
            for record in records:
                if "staleness" in record:
                    counts += record["staleness"]
            assert counts.sum() == 3 * 8, counts  # every push of every clock, once
            assert counts[1:].sum() > 0, counts  # the straggler let the others run ahead
            assert np.isfinite(got["val"][8])
    group.Free()
    verdict.check(world)


@pytest.mark.mpi(min_size=3)
@pytest.mark.parametrize("predict", [True, False], ids=["predicted", "as stored"])
def test_a_stale_pull_is_moved_on_by_the_last_update(predict):
    """1 server + 2 workers, k=2, an update of minus the summed gradient. Clock 0 moves the
    parameters from 0 to -2; worker 1 then pulls clock 2 while clock 1 waits for worker 2:
    version 1, one clock behind, so with prediction it gets -2 + (-2) = -4, the value clock 1
    will indeed give; then worker 2's fresh pull of clock 2 gets the stored -4 either way."""
    from comm import ps
    skip_unless_ranks(3, "1 server + 2 workers")
    world, verdict = MPI.COMM_WORLD, Verdict()
    group = groups_of(world, 3)
    if group is not None:
        flat = np.zeros(8)
        rank = group.Get_rank()
        with verdict.guard(f"rank {rank}"):
            if rank == 0:
                def apply(clock, grad, loss, scale):
                    flat[:] -= grad
                    return loss, 0.0, 0.0, 1.0
                ps.Server(group, 1, flat, apply, staleness=2, predict=predict,
                          timeout=60).run()
            else:
                client = ps.Client(group, 1, flat, staleness=2, timeout=60)
                client.pull(0)
                client.push(0, np.ones(8), 0.0, 1)
                client.pull(1, fresh=True)
                np.testing.assert_array_equal(flat, -2.0)  # fresh: never predicted
                if rank == 1:
                    client.push(1, np.ones(8), 0.0, 1)
                    client.pull(2)
                    assert client.version == 1, client.version
                    np.testing.assert_array_equal(flat, -4.0 if predict else -2.0)
                    group.send(None, 2, tag=999)  # now worker 2 may finish clock 1
                else:
                    group.recv(source=1, tag=999)
                    client.push(1, np.ones(8), 0.0, 1)
                    client.pull(2, fresh=True)
                    assert client.version == 2, client.version
                    np.testing.assert_array_equal(flat, -4.0)
                client.stop()
        group.Free()
    verdict.check(world)


@pytest.mark.parametrize("values, message", [
    (dict(mode="ps", servers=4), "config servers = 4 leaves no worker on 4 ranks"),
    (dict(mode="ps", servers=1, tp=2), 'config tp = 2 with mode = "ps": expected tp = 1'),
    (dict(staleness=2), 'config staleness = 2 needs mode = "ps"'),
    (dict(straggler="9:50"), "config straggler = '9:50': rank 9 does not exist"),
    (dict(straggler="1:fast"), "config straggler '1:fast': expected RANK:DELAY_MS"),
    (dict(mode="ps", servers=1, zero=1), 'config zero = 1 with mode = "ps"'),
])
def test_bad_parameter_server_settings_name_the_value(values, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan(make_config(dict(MODEL, **values)), world=4)


@pytest.mark.parametrize("flags, fragment", [
    (["--mode", "ps", "--servers", "0"], "config servers = 0: expected an integer > 0"),
    (["--mode", "ps", "--servers", "4"], "config servers = 4 leaves no worker on 4 ranks"),
    (["--compress", "zip"], "config compress = 'zip': expected one of none, fp16, int8, topk, "
                            "powersgd"),
    (["--compress", "topk", "--compress-ratio", "1.5"],
     "config compress_ratio = 1.5: expected a fraction in (0, 1]"),
    (["--compress", "powersgd", "--compress-rank", "0"],
     "config compress_rank = 0: expected an integer > 0"),
    (["--straggler", "7:50"], "config straggler = '7:50': rank 7 does not exist"),
])
def test_bad_settings_end_every_rank_with_one_line(flags, fragment, tiny_h5, tmp_path):
    result = app("train", *FAST, "--data", tiny_h5, "--out", tmp_path / "run", *flags, n=4,
                 timeout=60)
    assert_user_error(result, fragment)


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", [["--mode", "ps", "--servers", "1"], ["--mode", "ring"]])
def test_top_k_sends_a_fraction_of_the_bytes(mode, tiny_h5, tmp_path):
    """The same job with --compress topk (ρ = 0.01) and without: a worker's bytes per step,
    from metrics.jsonl (a parameter server's push is one payload per shard; the ring gathers
    every rank's, so it saves less)."""
    sent = {}
    for compress in ("none", "topk"):
        run = tmp_path / compress
        result = app("train", "--config", "baby", "--steps", "3", "--log-interval", "1",
                     "--sample-tokens", "0", "--eval-windows", "2", "--peak-gflops", "100",
                     "--data", tiny_h5, "--out", run, "--compress", compress, *mode, n=4,
                     timeout=120)
        assert result.returncode == 0, result.stderr
        steps = [r for r in read_metrics(run) if "bytes_sent" in r]
        sent[compress] = sum(steps[-1]["bytes_sent"].values())
    ratio = sent["none"] / sent["topk"]
    assert ratio > (50 if mode[1] == "ps" else 20), sent  # ring: (p-1) gathered payloads


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the ranks")
@pytest.mark.parametrize("victim", [0, 2], ids=["server", "worker"])
def test_a_lost_server_or_worker_ends_the_job(victim, tiny_h5, tmp_path):
    from tests.test_checkpoint_faults import rank_pids
    run = tmp_path / "run"
    job = subprocess.Popen(
        command(4, "train", "--config", "tiny", "--steps", "100000", "--log-interval", "1",
                "--sample-tokens", "0", "--peak-gflops", "100", "--data", tiny_h5, "--out",
                run, "--mode", "ps", "--servers", "2", "--timeout", "20"),
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in job.stdout:
            if "| loss" in line:
                break
        pids = rank_pids(str(run))  # in rank order: started in order by mpiexec
        os.kill(pids[victim], signal.SIGKILL)
        job.wait(timeout=60)  # the watchdog's 20 s at the most, or mpiexec's own cleanup
    finally:
        job.kill()
        job.communicate()
    assert job.returncode != 0
