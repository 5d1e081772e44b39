"""app/costmodel.py: the alpha-beta formulas, the simulator's bubble, memory per rank."""
import json
import math
from dataclasses import replace

import pytest

from app.costmodel import (MEGATRON, MODELS, OURS, SCHEDULES, Cluster, Link, TrainingLayout,
                           all_gather_time, all_reduce_time, gpu_cluster, num_params, p2p_time,
                           peak_alive, predict, reduce_scatter_time, simulate_step, stage_costs)
from app.memory import activation_elements
from app.metrics import flops_per_token
from app.parallel.schedules import Backward, Forward, simulate
from models.gpt import GPTConfig

LINK = Link(latency=10e-6, bandwidth=1e9)  # 10 us, 1 GB/s
MB = 1e6


def test_all_reduce_is_two_rings_of_p_minus_one_steps():
    # 2(p-1)(alpha + n/(p beta)) = 2*3*(10 us + 1 MB / 4 GB/s) = 6 * 260 us
    assert all_reduce_time(MB, 4, LINK) == pytest.approx(6 * 260e-6)
    assert all_reduce_time(MB, 1, LINK) == 0.0


def test_all_gather_and_reduce_scatter_are_one_ring_each():
    assert all_gather_time(MB, 4, LINK) == pytest.approx(3 * 260e-6)
    assert reduce_scatter_time(MB, 4, LINK) == pytest.approx(3 * 260e-6)
    assert all_gather_time(MB, 4, LINK) + reduce_scatter_time(MB, 4, LINK) == \
        pytest.approx(all_reduce_time(MB, 4, LINK))


def test_point_to_point_is_alpha_plus_n_over_beta():
    assert p2p_time(MB, LINK) == pytest.approx(10e-6 + 1e-3)


def test_a_ring_that_leaves_the_node_runs_at_the_inter_node_link():
    cluster = gpu_cluster("h100-ib", nodes=2)
    assert cluster.link(8) is cluster.intra
    assert cluster.link(16) is cluster.inter


def flat_cluster(**changes):
    """Uniform, easy numbers: 1 TFLOP/s at full efficiency, free communication."""
    free = Link(0.0, math.inf)
    return replace(Cluster("test", 1, 8, 1e12, 1e12, 1e12, 1.0, free, free, math.inf),
                   **changes)


MODEL = GPTConfig(8, 4, 64, 32, 64)


@pytest.mark.parametrize("schedule,chunks", [("1f1b", 1), ("gpipe", 1), ("interleaved", 2)])
def test_the_bubble_is_the_simulators(schedule, chunks):
    layout = TrainingLayout(1, 1, 4, schedule, chunks, 8, global_batch=8)
    cluster = flat_cluster()
    costs = stage_costs(MODEL, layout, cluster)
    program = SCHEDULES[schedule](4, 8, chunks)
    sim = simulate(program, {Forward: list(costs.forward), Backward: list(costs.backward)})
    prediction = predict(MODEL, layout, cluster)
    critical = max(range(4), key=lambda s: sim.timeline[s][-1][2])
    assert prediction.bubble_s == pytest.approx(sim.makespan - sim.busy[critical], rel=1e-6)


def test_uniform_one_f_one_b_bubble_is_p_minus_1_over_m_plus_p_minus_1():
    p, m, forward, backward = 4, 8, 1.0, 2.0
    sim = simulate_step("1f1b", p, m, 1, (forward,) * p, (backward,) * p, 0.0)
    ideal = m * (forward + backward)
    assert (sim.makespan - ideal) / sim.makespan == pytest.approx((p - 1) / (m + p - 1))


def test_one_stage_without_communication_is_flops_over_rate():
    cluster = flat_cluster(devices_per_node=1)
    layout = TrainingLayout(1, global_batch=4)
    prediction = predict(MODEL, layout, cluster)
    flops = flops_per_token(num_params(MODEL), 8, 32, 64) * 4 * 32
    assert prediction.compute_s == pytest.approx(flops / 1e12)
    assert prediction.bubble_s == prediction.tp_comm_s == prediction.dp_comm_s == 0.0


def test_tensor_parallelism_splits_the_gemms_and_adds_four_all_reduces_per_block():
    cluster = flat_cluster(intra=LINK)
    one = stage_costs(MODEL, TrainingLayout(1, global_batch=4), cluster)
    two = stage_costs(MODEL, TrainingLayout(1, tp=2, global_batch=4), cluster)
    assert two.compute[0] == pytest.approx(one.compute[0] / 2)
    activation = 4 * 32 * 64 * 4  # B*T*C float32 bytes
    assert two.tp_comm[0] == pytest.approx(8 * 4 * all_reduce_time(activation, 2, LINK))


def test_the_data_parallel_reduction_hides_behind_backward_but_its_last_bucket():
    link = Link(0.0, 1e9)
    layout = TrainingLayout(2, global_batch=4)
    instant = flat_cluster(intra=link, fp32_flops=1e30)  # no backward to hide behind
    exposed = predict(MODEL, layout, instant)
    reduce = all_reduce_time(exposed.memory["grads"], 2, link)
    assert exposed.dp_comm_s == pytest.approx(reduce)
    slow = replace(instant, fp32_flops=1.0, bucket_mb=0.1)  # a long backward hides all
    bucket = 0.1 * 2 ** 20 / exposed.memory["grads"]        # but the last bucket
    assert predict(MODEL, layout, slow).dp_comm_s == pytest.approx(reduce * bucket)


def test_zero_shards_the_optimizer_state_over_dp():
    plain = predict(MODEL, TrainingLayout(4, global_batch=8), flat_cluster())
    sharded = predict(MODEL, TrainingLayout(4, zero=1, global_batch=8), flat_cluster())
    assert sharded.memory["optimizer"] == pytest.approx(plain.memory["optimizer"] / 4)
    assert sharded.memory["params"] == plain.memory["params"]


def test_one_f_one_b_keeps_p_minus_stage_micro_batches_gpipe_all():
    assert peak_alive("1f1b", 4, 8, 1) == [4, 3, 2, 1]
    assert peak_alive("gpipe", 4, 8, 1) == [8] * 4
    for args in [("1f1b", 3, 2, 1), ("interleaved", 4, 8, 2)]:
        assert peak_alive(*args) == simulate(SCHEDULES[args[0]](*args[1:])).peak_alive


def test_activations_come_from_app_memory():
    layout = TrainingLayout(1, 1, 2, "gpipe", 1, 4, global_batch=8)
    prediction = predict(MODEL, layout, flat_cluster())
    rows = 2
    head = activation_elements(MODEL, rows, 0)
    per_block = activation_elements(MODEL, rows, 1) - head
    blocks = stage_costs(MODEL, layout, flat_cluster()).blocks
    # GPipe keeps all 4 micro-batches on both stages; the last also the head's probabilities
    stages = [4 * blocks[0] * per_block * 4, (4 * blocks[1] * per_block + head) * 4]
    assert any(prediction.memory["activations"] == pytest.approx(s) for s in stages)


def test_megatron_keeps_bf16_weights_and_fp32_master_state():
    model, layout = MODELS["1.3B"], TrainingLayout(1, global_batch=1)
    cluster = gpu_cluster("h100-node")
    ours, theirs = predict(model, layout, cluster), predict(model, layout, cluster, MEGATRON)
    assert theirs.memory["params"] == pytest.approx(ours.memory["params"] / 2)
    assert theirs.memory["optimizer"] == pytest.approx(ours.memory["optimizer"] * 1.5)
    assert theirs.compute_s < ours.compute_s / 10  # the bf16 tensor cores against fp32


def test_a_batch_that_does_not_split_is_an_error():
    with pytest.raises(ValueError, match="not divisible by dp"):
        predict(MODEL, TrainingLayout(3, global_batch=8), flat_cluster())
    assert OURS.name == "ours"


def test_costcheck_reads_measured_rows_and_judges_the_one_and_two_rank_ones(tmp_path):
    from bench.costcheck import calibrated_on_rows, check, cluster_for, read_rows
    row = {"model": "tiny", "mode": "ring", "dp": 1, "tp": 1, "pp": 1, "schedule": "1f1b",
           "chunks": 1, "micro_batches": 1, "zero": 0, "servers": 0, "staleness": 0,
           "ranks": 1, "batch_size": 8, "block_size": 32, "tokens_per_s": 1.0, "step_ms": 10.0,
           "exposed_comm_ms": None, "bytes_per_rank_step": None, "peak_mem_bytes": None,
           "oversubscribed": False}
    rows = [row, {**row, "dp": 2, "ranks": 2, "batch_size": 16, "step_ms": 30.0},
            {**row, "dp": 4, "ranks": 4, "batch_size": 32, "step_ms": 99.0}]
    path = tmp_path / "measurements.json"
    path.write_text(json.dumps(rows))
    laptop = flat_cluster(devices_per_node=2, intra=LINK)
    fits = calibrated_on_rows(read_rows(path), laptop)
    assert list(fits) == ["tiny"] and len(fits["tiny"].efficiencies) == 1
    assert fits["tiny"].step_overhead == 0.0  # one batch size: no line to fit
    lines = []
    assert not check(read_rows(path), lambda r: cluster_for(r, laptop, fits, {}), 2,
                     out=lines.append)
    assert lines[1].split("|")[1].split()[-1] == "1.00"  # the calibrating row
    assert lines[3].endswith("oversubscribed")
    assert any(line.startswith("FAIL step time") and "1 of 2" in line for line in lines)
    path.write_text(json.dumps([{k: v for k, v in row.items() if k != "step_ms"}]))
    with pytest.raises(SystemExit, match="row 0 lacks step_ms: expected bench/report.py's"):
        read_rows(path)


def test_costcheck_judges_several_files_as_one(tmp_path, capsys):
    """One report per config (say, longer runs of each): their rows are judged together."""
    from bench.costcheck import main
    row = {"model": "tiny", "mode": "ring", "dp": 1, "tp": 1, "pp": 1, "schedule": "1f1b",
           "chunks": 1, "micro_batches": 1, "zero": 0, "servers": 0, "staleness": 0,
           "ranks": 1, "batch_size": 8, "block_size": 32, "step_ms": 10.0,
           "laptop_calibration": {"peak_flops": 1e10, "efficiency": 0.5,
                                  "layer_overhead": 1e-4}}
    paths = [tmp_path / "tiny.json", tmp_path / "baby.json"]
    paths[0].write_text(json.dumps([row]))
    paths[1].write_text(json.dumps([{**row, "model": "baby", "block_size": 64, "step_ms": 900.0}]))
    assert main(["--measurements", *map(str, paths), "--from-rows", "--no-colocation"]) == 0
    table = [line.split()[0] for line in capsys.readouterr().out.splitlines() if "|" in line]
    assert table == ["model", "tiny", "baby"]


def test_ranks_sharing_a_node_compute_slower_by_its_measured_factor():
    base, shared = flat_cluster(), flat_cluster(colocated_slowdown=1.25)
    alone = TrainingLayout(1, global_batch=4)
    assert predict(MODEL, alone, shared).compute_s == predict(MODEL, alone, base).compute_s
    pair = TrainingLayout(1, tp=2, global_batch=4)
    assert predict(MODEL, pair, shared).compute_s == \
        pytest.approx(1.25 * predict(MODEL, pair, base).compute_s)
    one_per_node = replace(shared, nodes=2, devices_per_node=1)
    assert predict(MODEL, pair, one_per_node).compute_s == \
        pytest.approx(predict(MODEL, pair, replace(base, nodes=2, devices_per_node=1)).compute_s)


def test_costcheck_takes_the_efficiency_at_the_rows_micro_batch_size():
    from bench.costcheck import efficiency_at
    pairs = [(3, 0.4), (12, 0.6)]
    assert efficiency_at(pairs, 3) == 0.4 and efficiency_at(pairs, 1) == 0.4
    assert efficiency_at(pairs, 12) == 0.6 and efficiency_at(pairs, 24) == 0.6
    assert efficiency_at(pairs, 6) == pytest.approx(0.5)  # halfway in log rows
    three = [(1, 0.3), (3, 0.6), (12, 0.6)]  # each size between its own two neighbours
    assert efficiency_at(three, 3) == 0.6 and efficiency_at(three, 6) == 0.6
    assert efficiency_at(three, 3 ** 0.5) == pytest.approx(0.45)


def test_one_sequence_micro_batches_get_the_efficiency_their_measured_slowdown_implies():
    """A 1-rank row of 3 sequences and the same step in 3 one-sequence micro-batches (make
    report's `one_sequence_slowdown`), both made by the model with Python's per-layer cost
    and a lower efficiency at one sequence: the fit recovers that efficiency, and does not
    count the extra micro-batches' Python cost in it as well."""
    from bench.costcheck import Fit, model_and_layout, with_one_sequence
    F, e, e1 = 2e-3, 0.6, 0.35
    truth = replace(flat_cluster(fp32_flops=1e9), efficiency=e, step_overhead=F,
                    layer_overhead=1e-3, memory_bandwidth=1e10)
    row = {"model": "tiny", "mode": "ring", "dp": 1, "tp": 1, "pp": 1, "schedule": "1f1b",
           "chunks": 1, "micro_batches": 1, "zero": 0, "servers": 0, "staleness": 0,
           "ranks": 1, "block_size": 32, "batch_size": 3}
    t = predict(*model_and_layout(row), truth).step_s
    split = predict(*model_and_layout({**row, "micro_batches": 3}),
                    replace(truth, efficiency=e1)).step_s
    rows = [{**row, "step_ms": t * 1e3, "one_sequence_slowdown": [3, split / t]}]
    plain = replace(truth, efficiency=1.0, step_overhead=0.0)
    fit = with_one_sequence({"tiny": Fit(F, [(3, e), (12, 0.7)])}, rows, plain)["tiny"]
    assert dict(fit.efficiencies)[1] == pytest.approx(e1)
    assert fit.step_overhead == F and dict(fit.efficiencies)[3] == e
    assert with_one_sequence({"tiny": Fit(F, [(3, e)])}, [{**rows[0], "model": "x"}],
                             plain) == {"tiny": Fit(F, [(3, e)])}  # nothing measured for it


def test_the_fixed_cost_per_step_is_paid_once_by_every_rank_whatever_its_share():
    fixed = replace(flat_cluster(), step_overhead=5e-3)
    for layout in (TrainingLayout(1, global_batch=4), TrainingLayout(1, tp=2, global_batch=4),
                   TrainingLayout(1, pp=2, micro_batches=4, global_batch=4)):
        assert predict(MODEL, layout, fixed).step_s == \
            pytest.approx(predict(MODEL, layout, flat_cluster()).step_s + 5e-3)


def test_costcheck_recovers_the_fixed_cost_and_efficiency_of_two_one_rank_rows():
    from bench.costcheck import calibrated_on_rows, model_and_layout
    truth = replace(flat_cluster(fp32_flops=1e9), efficiency=0.4, step_overhead=5e-3,
                    layer_overhead=1e-4, memory_bandwidth=1e10)
    row = {"model": "tiny", "mode": "ring", "dp": 1, "tp": 1, "pp": 1, "schedule": "1f1b",
           "chunks": 1, "micro_batches": 1, "zero": 0, "servers": 0, "staleness": 0,
           "ranks": 1, "block_size": 32}
    rows = []
    for batch in (3, 12):
        row = {**row, "batch_size": batch}
        rows.append({**row, "step_ms": 1e3 * predict(*model_and_layout(row), truth).step_s})
    fit = calibrated_on_rows(rows, replace(truth, efficiency=1.0, step_overhead=0.0))["tiny"]
    assert fit.step_overhead == pytest.approx(5e-3)
    assert [e for _, e in fit.efficiencies] == pytest.approx([0.4, 0.4])
    # noise that puts the fixed cost below 0: none, and each row its own efficiency
    rows[0]["step_ms"] /= 2
    fit = calibrated_on_rows(rows, replace(truth, efficiency=1.0, step_overhead=0.0))["tiny"]
    assert fit.step_overhead == 0.0 and fit.efficiencies[0][1] > 0.4 > fit.efficiencies[1][1]
    # rows faster than the probed GEMM rate: an efficiency above 1, and still an exact fit
    fast = replace(truth, efficiency=1.25)
    rows = [{**r, "step_ms": 1e3 * predict(*model_and_layout(r), fast).step_s} for r in rows]
    fit = calibrated_on_rows(rows, replace(truth, efficiency=1.0, step_overhead=0.0))["tiny"]
    assert [e for _, e in fit.efficiencies] == pytest.approx([1.25, 1.25])


def test_the_busy_link_is_the_line_through_two_measured_all_reduce_costs():
    from bench.costcheck import busy_link, cluster_for
    # p = 2: an all-reduce costs 2 alpha + n / beta; alpha 50 us, beta 2 GB/s
    costs = {str(n): [2 * 50e-6 + n / 2e9 + noise for noise in (1e-3, 0.0, -1e-3)]
             for n in (65536, 4194304)}
    link = busy_link(costs)
    assert link.latency == pytest.approx(50e-6) and link.bandwidth == pytest.approx(2e9)
    assert busy_link({"65536": [2e-3], "4194304": [1e-3]}) is None  # noise: no line
    assert busy_link({}) is None and busy_link({"65536": [1e-3]}) is None  # no line either
    # three sizes: the line through the extremes
    assert busy_link({**costs, "1048576": [1.0]}).bandwidth == pytest.approx(2e9)
    row = {"model": "tiny", "mode": "ring", "batch_size": 8, "block_size": 32, "dp": 1,
           "tp": 2, "pp": 1, "schedule": "1f1b", "chunks": 1, "micro_batches": 1, "zero": 0}
    probes = {"tiny": {"colocated_slowdown": 1.2, "busy_link": [50e-6, 2e9],
                       "message_link": [20e-6, 5e9]}}
    probed = cluster_for(row, flat_cluster(), {}, probes)
    assert probed.intra == probed.inter == Link(50e-6, 2e9)
    assert probed.colocated_slowdown == 1.2
    # a parameter server's exchanges go over the message link
    served = cluster_for({**row, "mode": "ps", "tp": 1}, flat_cluster(), {}, probes)
    assert served.intra == served.inter == Link(20e-6, 5e9)


def test_a_parameter_server_step_adds_the_exchange_the_servers_passes_and_polling():
    from bench.costcheck import NOTICE_S, model_and_layout, predict_row
    cluster = replace(flat_cluster(), intra=LINK, memory_bandwidth=1e10)
    row = {"model": "tiny", "mode": "ring", "dp": 1, "tp": 1, "pp": 1, "schedule": "1f1b",
           "chunks": 1, "micro_batches": 1, "zero": 0, "servers": 0, "staleness": 0,
           "batch_size": 4, "block_size": 32}
    alone, _ = predict_row(row, cluster)
    for staleness in (0, 2):  # one worker waits for the update either way
        ps = {**row, "mode": "ps", "servers": 1, "staleness": staleness}
        step, _ = predict_row(ps, cluster)
        grads = 4 * num_params(model_and_layout(row)[0])
        # the server notices the push, the worker the answer
        assert step == pytest.approx(alone + 2 * p2p_time(grads, LINK) + 5 * grads / 1e10
                                     + 2 * NOTICE_S)


def test_costcheck_judges_with_the_calibration_stored_beside_the_rows():
    """A file that carries make report's calibration is judged with it, not with a
    calibration of whatever machine runs the check, so its verdict never changes."""
    from bench.costcheck import stored_calibration
    rows = [{"laptop_calibration": {"peak_flops": p, "efficiency": 0.8, "layer_overhead": o}}
            for p, o in [(20e9, 1e-3), (30e9, 2e-4), (25e9, 5e-4)]] + [{"model": "older"}]
    assert stored_calibration(rows) == {"peak_flops": 25e9, "efficiency": 0.8,
                                        "layer_overhead": 5e-4}
    assert stored_calibration([{"laptop_calibration": None}]) is None


@pytest.mark.mpi(min_size=2)
def test_the_busy_link_is_timed_in_a_tensor_parallel_forward_and_backward():
    """tiny split over the ranks: every all-reduce is an activation's (B, T, C) or the loss's
    two numbers per token, and each is timed on every rank; heads that do not split over
    the ranks give no costs rather than a wrong split."""
    from mpi4py import MPI

    from bench.costcheck import tensor_parallel_costs
    from mpi_util import Verdict
    world, verdict = MPI.COMM_WORLD, Verdict()
    size = world.Get_size()
    B, T, C = 3, 32, 32  # tiny: 2 heads
    sub = world.Split(world.Get_rank() // 2, world.Get_rank()) if size > 2 else world
    costs = tensor_parallel_costs("tiny", B, sub, seconds=0.05)
    with verdict.guard("sizes"):
        assert sorted(costs) == [2 * B * T * 4, B * T * C * 4]
        assert all(len(t) == 1 and t[0] > 0 for t in costs.values())
    if size > 2:
        sub.Free()
    if size >= 4:  # 4 ranks cannot split tiny's 2 heads
        with verdict.guard("unsplittable"):
            assert tensor_parallel_costs("tiny", B, world, seconds=0.05) == {}
    verdict.check(world)


def test_the_laptop_calibration_gives_a_peak_an_efficiency_and_a_per_layer_overhead():
    from app.costmodel import calibrate_laptop
    laptop = calibrate_laptop("tiny", repeats=3)
    assert laptop.peak_flops > 0 and 0 < laptop.efficiency <= 1
    # Python's cost per layer and micro-batch on tiny arrays: some microseconds, not seconds
    assert 0 <= laptop.layer_overhead < 0.05
