"""bench/report.py: the whole driver on `tiny` (it starts its own `mpiexec` training jobs on
1 and 2 ranks, one per mode and scaling kind), its arithmetic and its option errors."""
import json
import os
import statistics
import subprocess
import sys

import pytest

from app_util import ENV, MPIEXEC, ROOT
from bench.report import (MODES, colocation_factor, combine_rounds, global_batch, main,
                          median_calibration, median_links, median_round, micro_batches,
                          mode_overrides, scaling, split_step)

SCHEMA = {"model": str, "mode": str, "dp": int, "tp": int, "pp": int, "schedule": str,
          "chunks": int, "micro_batches": int, "zero": int, "servers": int, "staleness": int,
          "ranks": int, "batch_size": int, "block_size": int, "tokens_per_s": float,
          "step_ms": float, "exposed_comm_ms": (float, type(None)),
          "bytes_per_rank_step": (float, int, type(None)),
          "peak_mem_bytes": (float, type(None)), "oversubscribed": bool}


def test_speedup_and_efficiency():
    assert scaling(20000.0, 10000.0, 2) == (2.0, 1.0)
    assert scaling(15000.0, 10000.0, 4) == (1.5, 0.375)
    assert scaling(9000.0, 10000.0, 1) == pytest.approx((0.9, 0.9))


def test_step_split():
    # ring dp: ideal compute 4 ms, the logged 1.5 ms wait is exposed, the rest is other
    assert split_step(10.0, 4.0, 0.0, 1.5) == {
        "compute_ms": 4.0, "bubble_ms": 0.0, "exposed_comm_ms": 1.5, "other_ms": 4.5,
        "exposed_comm_source": "logged"}
    # not timed: a 20% bubble adds 1 ms to the 4 ms, the other 5 ms are the residual
    split = split_step(10.0, 4.0, 0.2, None)
    assert split["bubble_ms"] == pytest.approx(1.0)
    assert split["exposed_comm_ms"] == pytest.approx(5.0) and split["other_ms"] == 0.0
    assert split["exposed_comm_source"] == "residual"
    # faster than the ideal share (caches): nothing left over, never negative
    split = split_step(3.0, 4.0, 0.2, 0.5)
    assert [split[k] for k in ("compute_ms", "bubble_ms", "exposed_comm_ms", "other_ms")] \
        == [3.0, 0.0, 0.0, 0.0]


def test_layouts_and_batches():
    assert micro_batches(12, 2) == 4 and micro_batches(12, 4) == 6 and micro_batches(6, 2) == 3
    assert mode_overrides("pp", 2, 12) == {"pp": 2, "micro_batches": 4}
    assert mode_overrides("dp-pp", 2, 12) is None  # dp=2 x pp=2 needs 4 ranks
    assert mode_overrides("dp-pp", 4, 12) == {"pp": 2, "micro_batches": 3}
    assert mode_overrides("ps-async", 4, 12) == {"mode": "ps", "servers": 1, "staleness": 2}
    assert global_batch("strong", "ps", 4, 12, 3) == 12
    assert global_batch("weak", "dp", 4, 12, 3) == 12
    assert global_batch("weak", "ps", 4, 12, 3) == 9  # 3 workers


def test_the_links_of_the_rounds_probes_are_combined_by_medians():
    probes = [{"colocated_slowdown": f, "busy_link": link, "message_link": message}
              for f, link, message in [(1.3, [1e-4, 2e9], None), (1.0, None, [5e-5, 4e9]),
                                       (1.1, [3e-4, 1e9], None), (1.2, [2e-4, 3e9], None)]]
    assert median_links(probes) == {"busy_link": [2e-4, 2e9], "message_link": [5e-5, 4e9]}


def test_the_colocation_factor_is_the_visited_passes_else_the_probes_phases():
    probes = [{"colocation_phases": [[10, 13], [10, 12]]}, {"colocation_phases": None}]
    visited = [[20, 20], [20, 22], [10, 10.5]]
    factor = colocation_factor(probes, visited)
    assert factor["colocated_slowdown"] == pytest.approx(1.05)  # 1.0 1.1 1.05
    assert factor["colocation_phases"] == [[10, 13], [10, 12]]
    assert factor["colocation_visits"] == visited
    alone = colocation_factor(probes, [])  # no visits (1 core, 1 round): the probes' phases
    assert alone["colocated_slowdown"] == pytest.approx(1.25)
    assert colocation_factor([{}], []) == {}


def test_the_laptop_calibrations_of_the_rounds_are_combined_by_medians():
    from app.costmodel import laptop_cluster
    rounds = [laptop_cluster(p, e, o) for p, e, o in
              [(30e9, 0.7, 4e-4), (20e9, 0.9, 1e-3), (25e9, 0.8, 2e-4)]]
    assert median_calibration(rounds) == {"peak_flops": 25e9, "efficiency": 0.8,
                                          "layer_overhead": 4e-4}


def test_a_row_is_its_median_round_and_fails_with_any_round():
    rounds = [{"failure": None, "tok_s": t, "job": i} for i, t in enumerate((30, 10, 20))]
    assert median_round(rounds)["job"] == 2
    assert median_round(rounds[:2])["job"] == 0  # of two, the faster
    failed = {"failure": "exit 1", "tok_s": None}
    assert median_round([rounds[0], failed, rounds[1]]) is failed


def test_a_rows_rate_is_the_median_of_every_rounds_logged_steps():
    rounds = [{"failure": None, "tok_s": 100, "steps_ms": [10.0, 40.0], "job": 0},
              {"failure": None, "tok_s": 300, "steps_ms": [20.0, 30.0, 50.0], "job": 1},
              {"failure": None, "tok_s": 200, "steps_ms": [60.0, 70.0], "job": 2}]
    row = combine_rounds(rounds, tokens=1000)
    assert row["job"] == 2  # the other numbers: the median round's
    assert row["tok_s"] == pytest.approx(1000 / 0.040)  # the median of all 7 steps: 40 ms
    assert row["rounds_steps_ms"] == [r["steps_ms"] for r in rounds]
    failed = {"failure": "exit 1", "tok_s": None, "steps_ms": None}
    assert combine_rounds([rounds[0], failed], 1000)["failure"] == "exit 1"


@pytest.mark.parametrize("argv, message", [
    (["--modes", "dp,xp"], "error: --modes: 'xp' is not one of dp, "),
    (["--ranks", "1,two"], "error: --ranks: 'two' is not an integer >= 1"),
    (["--steps", "1"], "error: --steps: '1' is not an integer >= 2"),
    (["--rounds", "-1"], "error: --rounds: '-1' is not an integer >= 1"),
    (["--visits", "two"], "error: --visits: 'two' is not an integer >= 1"),
    (["--batch", "12,24"], "error: --batch: expected one integer"),
    (["--configs", "huge"], "error: --configs: config 'huge' not found"),
    (["--budget", "0"], "error: --budget: '0' is not a number of minutes > 0"),
    (["--budget", "soon"], "error: --budget: 'soon' is not a number of minutes > 0"),
])
def test_bad_values_are_one_line_errors(argv, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(")):
        main(argv)


def test_each_round_of_visits_starts_further_along_the_list():
    from bench.visits import rotation
    assert rotation(4, 0, 4) == [0, 1, 2, 3]
    assert rotation(4, 1, 4) == [1, 2, 3, 0]
    assert rotation(14, 12, 13) == [12, 13] + list(range(12))


def test_rows_on_more_ranks_than_cores_run_half_the_steps(monkeypatch):
    from types import SimpleNamespace

    from bench.report import steps_of
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    default, given = SimpleNamespace(steps=0), SimpleNamespace(steps=8)
    assert [steps_of("baby", default, r) for r in (1, 2, 4)] == [20, 20, 10]
    assert [steps_of("small", default, r) for r in (2, 4)] == [5, 3]  # at least 3
    assert [steps_of("small", given, r) for r in (2, 4)] == [8, 4]


def test_a_round_visits_each_1_rank_row_twice_half_a_round_apart():
    from bench.report import Case, visit_order
    cases = [Case("tiny", kind, mode, ranks, 4, {}) for kind in ("strong", "weak")
             for mode, ranks in (("single", 1), ("dp", 2), ("pp", 2), ("tp", 2))]
    order = [(c.kind, c.mode) for c in visit_order(cases)]
    assert order == [("strong", "single"), ("weak", "single"), ("strong", "dp"),
                     ("strong", "pp"), ("strong", "tp"), ("weak", "single"),
                     ("strong", "single"), ("weak", "dp"), ("weak", "pp"), ("weak", "tp")]


def test_failed_visits_are_one_line_errors_not_a_hang(tiny_h5, tmp_path):
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec beside {sys.executable}")
    from types import SimpleNamespace

    from bench.report import Case, visit_rows
    from bench.tp import mpiexec_command
    case = Case("tiny", "strong", "dp", 2, 4, {})
    args = SimpleNamespace(data=str(tmp_path / "missing.h5"), steps=2, visits=1, timeout=60,
                           weak_batch=3, quiet_s=0, mpiexec=mpiexec_command())
    with pytest.raises(SystemExit, match=r"the visits of tiny's rows \(rounds from 2\) "
                                         r"failed \(exit 2\): error: data file .*missing.h5"):
        visit_rows([case], args, str(tmp_path), 1, 2)


def run_tiny_report(tiny_h5, out, *flags):
    """`python -m bench.report` on tiny, 2 steps a job, into `out`; its completed process."""
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec beside {sys.executable}")
    result = subprocess.run(
        [sys.executable, "-m", "bench.report", "--configs", "tiny", "--steps", "2", *flags,
         "--data", str(tiny_h5), "--out", str(out), "--timeout", "40", "--quiet-s", "0"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_later_rounds_that_would_end_past_the_budget_are_skipped(tiny_h5, tmp_path):
    out = tmp_path / "report"
    result = run_tiny_report(tiny_h5, out, "--ranks", "1", "--rounds", "3", "--budget", "0.001")
    assert "tiny: rounds 2-3 skipped: another" in result.stderr, result.stderr
    measured = json.loads((out / "measurements.json").read_text())
    assert [len(entry["rounds_steps_ms"]) for entry in measured] == [1, 1]  # the jobs only
    assert "`tiny` 2 (step ms" in (out / "report.md").read_text()  # not "in 3 rounds"


def test_driver_writes_report_measurements_and_plots(tiny_h5, tmp_path):
    out = tmp_path / "report"
    run_tiny_report(tiny_h5, out, "--ranks", "1,2", "--rounds", "2", "--visits", "1")
    report = (out / "report.md").read_text()
    for kind in ("strong", "weak"):
        section = report.split(f"## `tiny`: {kind} scaling")[1].split("##")[0]
        modes = [line.split("|")[1].strip() for line in section.splitlines()
                 if line.startswith("| ") and not line.startswith("| mode")]
        assert modes == ["single"] + [m for m in MODES if m != "dp-pp"], section
        assert "FAILED" not in section and "skipped" not in section
    measured = json.loads((out / "measurements.json").read_text())
    assert len(measured) == 14  # 7 rows in each table, none shared at 2 ranks
    for entry in measured:
        for key, types in SCHEMA.items():
            assert isinstance(entry[key], types), (key, entry)
        assert entry["oversubscribed"] == (entry["ranks"] > os.cpu_count())
        assert entry["tokens_per_s"] > 0 and entry["peak_mem_bytes"] > 0
        # round 1 a job; with 2 cores round 2 a visit in one job (bench/visits.py), two of
        # a 1-rank row, else a job
        twice = os.cpu_count() >= 2 and entry["ranks"] == 1
        assert len(entry["rounds_steps_ms"]) == 2 + twice, entry
        steps = [ms for each in entry["rounds_steps_ms"] for ms in each]
        assert steps and min(steps) > 0, entry
        assert entry["step_ms"] == pytest.approx(statistics.median(steps)), entry
        if os.cpu_count() >= 2:  # the 2-rank co-location probe ran beside the rows
            assert 0.5 < entry["colocated_slowdown"] < 3, entry
            # the factor is round 2's two passes of the probe, visited with the rows; the
            # 5 phases of each round's probe are stored beside it
            assert len(entry["colocation_visits"]) == 2, entry
            assert len(entry["colocation_phases"]) == 2 * 5, entry
            assert entry["colocated_slowdown"] == pytest.approx(statistics.median(
                t / a for a, t in entry["colocation_visits"])), entry
            for link in ("busy_link", "message_link"):
                assert entry[link] is None or (entry[link][0] >= 0 and entry[link][1] > 0), \
                    entry
            assert entry["laptop_calibration"]["peak_flops"] > 0, entry
            assert entry["one_sequence_slowdown"][0] == 3 and \
                entry["one_sequence_slowdown"][1] > 0, entry
    by_layout = {(e["mode"], e["ranks"], e["pp"], e["tp"], e["zero"], e["staleness"],
                  e["batch_size"]) for e in measured}
    assert ("ps", 2, 1, 1, 0, 2, 3) in by_layout  # weak ps-async: 1 worker x 3 sequences
    assert ("ring", 2, 2, 1, 0, 0, 12) in by_layout  # strong pp
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plots: matplotlib is not installed" in report
        pytest.skip("report.md and measurements.json checked; matplotlib is not installed, "
                    "so there are no PNGs to check")
    for name in ("speedup_tiny.png", "step_time_tiny.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in report
