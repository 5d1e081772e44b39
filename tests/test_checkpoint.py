"""app/checkpoint.py: round trip, atomic writes, refusing files that are not ours or damaged."""
import h5py
import numpy as np
import pytest
from mpi4py import MPI

from app import atomic, checkpoint
from app.checkpoint import (boxes, CheckpointError, list_checkpoints, load_checkpoint,
                            load_params, read_manifest, save_checkpoint, save_params,
                            verify_checkpoint, VIEW)
from app.errors import UserError
from damage import damage_header
from models import gpt
from models.optim import AdamW, decay_mask


def sample_params():
    rng = np.random.default_rng(0)
    return {
        "wte": rng.normal(size=(7, 4)).astype(np.float32),
        "h.0.attn.c_attn.weight": rng.normal(size=(4, 12)),  # float64
        "h.0.ln_1.bias": np.zeros(4, np.float32),
        "ln_f.weight": np.ones(4, np.float64),
    }


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if ".tmp" in p.name)


def test_round_trip_names_shapes_dtypes_values_attrs(tmp_path):
    params = sample_params()
    attrs = {"step": 123, "tokenizer": "bytes", "config": "n_layer = 1\nlr = 0.001\n",
             "lr": 2.5e-4}
    path = tmp_path / "params.h5"
    save_params(path, params, attrs)
    loaded, loaded_attrs = load_params(path)
    assert set(loaded) == set(params)
    for name, value in params.items():
        assert loaded[name].shape == value.shape, name
        assert loaded[name].dtype == value.dtype, name
        np.testing.assert_array_equal(loaded[name], value)
    assert loaded_attrs["format"] == checkpoint.FORMAT == "gpt-params"
    assert loaded_attrs["format_version"] == 1
    for key, value in attrs.items():
        assert loaded_attrs[key] == value, key
    assert leftovers(tmp_path) == []


def test_round_trip_of_model_params(tmp_path):
    cfg = gpt.GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=4, vocab_size=11)
    params = gpt.init_params(cfg, seed=5, dtype=np.float32)
    save_params(tmp_path / "p.h5", dict(params.items()))
    loaded, attrs = load_params(tmp_path / "p.h5")
    assert set(loaded) == set(gpt.param_shapes(cfg))
    for name, shape in gpt.param_shapes(cfg).items():
        assert loaded[name].shape == shape
        np.testing.assert_array_equal(loaded[name], params[name])
    assert set(attrs) == {"format", "format_version"}


class FakeDeviceArray:
    """Stands in for a CuPy array: `.get()` copies it to the host."""

    def __init__(self, host):
        self.host = host

    def get(self):
        return self.host.copy()


def test_device_arrays_are_copied_to_host(tmp_path):
    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    save_params(tmp_path / "p.h5", {"wte": FakeDeviceArray(value)})
    loaded, _ = load_params(tmp_path / "p.h5")
    np.testing.assert_array_equal(loaded["wte"], value)


def test_overwrite_replaces_the_file(tmp_path):
    path = tmp_path / "params.h5"
    save_params(path, {"a": np.zeros(3)}, {"step": 1})
    save_params(path, {"b": np.ones(2)}, {"step": 2})
    loaded, attrs = load_params(path)
    assert list(loaded) == ["b"] and attrs["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.h5"]


@pytest.fixture
def fail_midway(monkeypatch):
    """Call it to make h5py's create_dataset raise on its second call from then on (a write
    that fails midway); it returns the list of dataset names asked for."""
    original = h5py.Group.create_dataset
    calls = []

    def create_dataset(self, *args, **kwargs):
        calls.append(args[0] if args else kwargs.get("name"))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(self, *args, **kwargs)

    def arm():
        monkeypatch.setattr(h5py.Group, "create_dataset", create_dataset)
        return calls

    return arm


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch, fail_midway):
    path = tmp_path / "params.h5"
    old = {"a": np.arange(4.0), "b": np.ones(2)}
    save_params(path, old, {"step": 1})
    before = path.read_bytes()

    calls = fail_midway()
    with pytest.raises(OSError, match="No space left"):
        save_params(path, {"a": np.zeros(4), "b": np.zeros(2), "c": np.zeros(1)}, {"step": 2})
    assert calls == ["a", "b"]  # it did fail midway
    monkeypatch.undo()

    assert path.read_bytes() == before
    loaded, attrs = load_params(path)
    assert set(loaded) == {"a", "b"} and attrs["step"] == 1
    np.testing.assert_array_equal(loaded["a"], old["a"])
    assert leftovers(tmp_path) == []


def test_failed_write_creates_no_target(tmp_path, fail_midway):
    path = tmp_path / "params.h5"
    calls = fail_midway()
    with pytest.raises(OSError):
        save_params(path, {"a": np.zeros(4), "b": np.zeros(2)})
    assert calls == ["a", "b"]
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_rename_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "params.h5"

    def no_replace(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(atomic.os, "replace", no_replace)
    with pytest.raises(PermissionError):
        save_params(path, {"a": np.zeros(4)})
    assert list(tmp_path.iterdir()) == []


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope.h5"
    with pytest.raises(UserError) as err:
        load_params(path)
    assert str(path) in str(err.value) and "cannot open as HDF5" in str(err.value)


def test_load_non_hdf5_file(tmp_path):
    path = tmp_path / "params.h5"
    path.write_text("these are not parameters\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        load_params(path)
    assert str(path) in str(err.value) and "cannot open as HDF5" in str(err.value)


def test_load_directory(tmp_path):
    with pytest.raises(UserError, match="cannot open as HDF5"):
        load_params(tmp_path)


def test_load_foreign_hdf5(tmp_path):
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.random.default_rng(0).random((3, 3))
    with pytest.raises(UserError) as err:
        load_params(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "format=None" in msg and "'gpt-params'" in msg


def test_load_token_file_is_refused(tiny_h5):
    with pytest.raises(UserError) as err:
        load_params(tiny_h5)
    assert "format='gpt-tokens'" in str(err.value) and "'gpt-params'" in str(err.value)


def test_load_damaged_object_header(tmp_path):
    """h5py lists a dataset whose header is damaged but cannot open it: an error, not a
    parameter silently left out."""
    path = tmp_path / "params.h5"
    save_params(path, sample_params())
    damage_header(path, "ln_f.weight")
    with pytest.raises(UserError) as err:
        load_params(path)
    assert str(err.value) == (f"parameter file {path}: cannot read 'ln_f.weight': HDF5 error "
                              "(Unable to synchronously open object (bad object header version "
                              "number)): the file may be damaged; train the run again")


# --------------------------------------------------------------------------- sharded checkpoints

@pytest.mark.parametrize("shape", [(7,), (4, 5), (3, 4, 5), (2, 1, 3, 2)])
def test_boxes_tile_any_flat_range_in_order(shape):
    n = int(np.prod(shape))
    index = np.arange(n).reshape(shape)
    rng = np.random.default_rng(0)
    for lo, hi in [(0, n), (0, 1), (n - 1, n)] + [tuple(sorted(rng.integers(0, n + 1, 2)))
                                                   for _ in range(50)]:
        got = boxes(lo, hi, shape)
        flat = [index[tuple(slice(s, s + k) for s, k in zip(start, size))].ravel()
                for _, start, size in got]
        assert np.array_equal(np.concatenate(flat) if flat else np.arange(0), np.arange(lo, hi))
        assert [f for f, _, _ in got] == [lo + sum(int(np.prod(b)) for _, _, b in got[:i])
                                          for i in range(len(got))]
        assert len(got) <= 2 * len(shape) - 1


CFG = gpt.GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=4, vocab_size=16)


def training_state(seed, ranges=None):
    params = gpt.init_params(CFG, seed, np, np.float64)
    optimizer = AdamW(params.flat, decay_mask(params, gpt.is_decayed), ranges=ranges)
    rng = np.random.default_rng(seed)
    for _ in range(3):
        optimizer.step(rng.normal(size=params.size), 1e-2)
    return params, optimizer


META = {"config": "n_layer = 2\n", "layout": {"dp": 1, "pp": 1}, "dtype": "float64",
        "shapes": gpt.param_shapes(CFG)}


def test_checkpoint_round_trip_and_view(tmp_path):
    params, optimizer = training_state(1)
    path = save_checkpoint(MPI.COMM_SELF, tmp_path, 7, params, optimizer, list(params.shapes),
                           list(params.shapes), META)
    assert path.name == "step_00000007" and list_checkpoints(tmp_path) == [path]
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", VIEW, "rank_00000.h5"]
    assert verify_checkpoint(path)["step"] == 7
    fresh, fresh_opt = training_state(2)
    assert load_checkpoint(path, fresh, fresh_opt) == 7
    np.testing.assert_array_equal(fresh.flat, params.flat)
    np.testing.assert_array_equal(fresh_opt.m, optimizer.m)
    np.testing.assert_array_equal(fresh_opt.v, optimizer.v)
    assert fresh_opt.t == optimizer.t == 3
    with h5py.File(path / VIEW) as f:  # whole logical tensors for h5py users
        np.testing.assert_array_equal(f["param/h.1.attn.c_attn.weight"][()],
                                      params["h.1.attn.c_attn.weight"])


def test_a_float16_loss_scale_rides_in_the_manifest(tmp_path):
    """A float16 run's dynamic loss scale is saved and restored with the weights, so that a
    resumed run skips and scales exactly as the uninterrupted one."""
    from app.parallel.precision import MixedPrecision
    params, optimizer = training_state(1)
    mixed = MixedPrecision(params, np.float16, initial_scale=2.0 ** 16)
    mixed.update_scale(False)
    mixed.update_scale(True)
    path = save_checkpoint(MPI.COMM_SELF, tmp_path, 4, params, optimizer, list(params.shapes),
                           list(params.shapes), {**META, "loss_scale": mixed.state()})
    resumed = MixedPrecision(params, np.float16)
    resumed.restore(read_manifest(path).get("loss_scale"))
    assert (resumed.scale, resumed.finite_steps) == (2.0 ** 15, 1)
    plain = save_checkpoint(MPI.COMM_SELF, tmp_path, 5, params, optimizer, list(params.shapes),
                            list(params.shapes), META)
    assert "loss_scale" not in read_manifest(plain)
    resumed.restore(None)  # a checkpoint without one keeps what the run has
    assert resumed.scale == 2.0 ** 15


def test_moments_in_one_sharding_load_into_another(tmp_path):
    """Moments packed over flat ranges (as ZeRO-1 holds them) are written as boxes and read
    back into other ranges: each element lands where the new packing wants it."""
    params, optimizer = training_state(1)
    n = params.size
    saved = AdamW(params.flat, decay_mask(params, gpt.is_decayed),
                  ranges=[(0, 301), (301, n)])
    saved.m[...], saved.v[...], saved.t = optimizer.m, optimizer.v, optimizer.t
    names = list(params.shapes)
    path = save_checkpoint(MPI.COMM_SELF, tmp_path, 1, params, saved, names, names, META)
    verify_checkpoint(path)
    wanted = [(17, 250), (500, n - 3)]
    other, other_opt = training_state(5, ranges=wanted)
    load_checkpoint(path, other, other_opt)
    expected = np.concatenate([optimizer.m[a:b] for a, b in wanted])
    np.testing.assert_array_equal(other_opt.m, expected)
    np.testing.assert_array_equal(other.flat, params.flat)


def test_damaged_or_partial_checkpoints_are_refused(tmp_path):
    params, optimizer = training_state(1)
    names = list(params.shapes)
    path = save_checkpoint(MPI.COMM_SELF, tmp_path, 3, params, optimizer, names, names, META)
    (path / "manifest.json").rename(path / "manifest.tmp")
    with pytest.raises(CheckpointError, match="no manifest.json"):
        verify_checkpoint(path)
    (path / "manifest.tmp").rename(path / "manifest.json")
    with h5py.File(path / "rank_00000.h5", "r+") as f:
        f["m/wpe/" + next(iter(f["m/wpe"]))][0, 0] += 1.0  # a flipped value
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        verify_checkpoint(path)
    with open(path / "rank_00000.h5", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CheckpointError, match="rank_00000.h5 cannot be read"):
        verify_checkpoint(path)


def test_keep_removes_older_checkpoints_once_a_newer_one_is_complete(tmp_path):
    params, optimizer = training_state(1)
    names = list(params.shapes)
    for step in (1, 2, 3):
        save_checkpoint(MPI.COMM_SELF, tmp_path, step, params, optimizer, names, names, META,
                        keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000002"]
