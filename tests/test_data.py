import h5py
import numpy as np
import pytest

from app import prepare as prepare_cmd
from app.data import BatchLoader, TokenData, validation_batches, validation_starts
from app.errors import UserError
from conftest import corpus_text
from damage import damage_chunk, damage_header

BLOCK = 16


@pytest.fixture
def data(tiny_h5):
    with TokenData(tiny_h5) as d:
        yield d


def contents(data, split="train"):
    with h5py.File(data.path, "r") as f:
        return f[split][:].astype(np.int64)


def test_token_data_exposes_lazy_datasets(data):
    assert data.vocab_size == 256 and data.tokenizer == "bytes"
    assert isinstance(data.train, h5py.Dataset) and isinstance(data.val, h5py.Dataset)
    assert len(data.val) > 0 and len(data.train) > 8 * len(data.val)


def test_close_via_context_manager(tiny_h5):
    with TokenData(tiny_h5) as d:
        train = d.train
    with pytest.raises(Exception):
        train[:1]


def test_same_seed_and_step_give_the_same_batch(data):
    a = BatchLoader(data, "train", BLOCK, 8, seed=1)
    b = BatchLoader(data, "train", BLOCK, 8, seed=1)
    for step in (0, 1, 1000):
        np.testing.assert_array_equal(a.batch(step)[0], b.batch(step)[0])
    assert not np.array_equal(a.batch(0)[0], a.batch(1)[0])
    other_seed = BatchLoader(data, "train", BLOCK, 8, seed=2)
    assert not np.array_equal(a.batch(0)[0], other_seed.batch(0)[0])


def test_windows_match_file_contents_and_y_is_x_shifted(data):
    tokens = contents(data)
    loader = BatchLoader(data, "train", BLOCK, 8, seed=3)
    x, y = loader.batch(5)
    assert x.shape == y.shape == (8, BLOCK) and x.dtype == y.dtype == np.int64
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    for row, start in enumerate(loader.starts(5)):
        np.testing.assert_array_equal(x[row], tokens[start:start + BLOCK])
        np.testing.assert_array_equal(y[row], tokens[start + 1:start + BLOCK + 1])


def test_starts_stay_inside_the_split(data):
    loader = BatchLoader(data, "val", BLOCK, 64, seed=0)
    starts = np.concatenate([loader.starts(s) for s in range(50)])
    assert starts.min() == 0 and starts.max() == len(data.val) - BLOCK - 1


def test_split_of_exactly_one_window(data):
    n = len(data.val)
    x, y = BatchLoader(data, "val", n - 1, 2, seed=0).batch(0)
    np.testing.assert_array_equal(x[0], contents(data, "val")[:-1])
    np.testing.assert_array_equal(x[0], x[1])


@pytest.mark.parametrize("dp_size", [1, 2, 3, 4])
def test_dp_slices_concatenate_to_the_global_batch(data, dp_size):
    loader = BatchLoader(data, "train", BLOCK, 12, seed=7)
    for step in (0, 9):
        gx, gy = loader.batch(step)
        parts = [loader.batch(step, r, dp_size) for r in range(dp_size)]
        assert all(px.shape == (12 // dp_size, BLOCK) for px, _ in parts)
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), gx)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), gy)


class RecordingDataset:
    """Stands in for an h5py dataset and records every read."""

    def __init__(self, array):
        self.array, self.reads = array, []

    def __len__(self):
        return len(self.array)

    def __getitem__(self, key):
        assert isinstance(key, slice), "only slices: no whole-array reads"
        self.reads.append((key.start, key.stop))
        return self.array[key]


def test_a_rank_reads_only_its_own_windows(data):
    data.train = RecordingDataset(data.train[:])
    loader = BatchLoader(data, "train", BLOCK, 8, seed=0)
    loader.batch(4, dp_rank=1, dp_size=4)
    mine = loader.starts(4)[2:4]
    assert data.train.reads == [(s, s + BLOCK + 1) for s in mine]


def test_validation_windows_are_fixed(data):
    tokens = contents(data, "val")
    first = list(validation_batches(data, BLOCK, 5, n_windows=12))
    again = list(validation_batches(data, BLOCK, 5, n_windows=12))
    assert [len(x) for x, _ in first] == [5, 5, 2]
    for (x1, y1), (x2, y2) in zip(first, again):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    x = np.concatenate([x for x, _ in first])
    for row, start in enumerate(validation_starts(len(tokens), BLOCK, 12)):
        np.testing.assert_array_equal(x[row], tokens[start:start + BLOCK])


@pytest.mark.parametrize("n_tokens, block, n_windows", [(1000, 16, 10), (1000, 16, 10**6),
                                                         (17, 16, 5), (100, 9, 10)])
def test_validation_starts_spread_without_overlap(n_tokens, block, n_windows):
    starts = validation_starts(n_tokens, block, n_windows)
    assert len(starts) == min(n_windows, n_tokens // (block + 1))
    assert starts[0] == 0 and starts[-1] + block + 1 <= n_tokens
    assert np.all(np.diff(starts) >= block + 1)
    if len(starts) > 1:
        assert starts[-1] == n_tokens - block - 1


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="nope.h5"):
        TokenData(tmp_path / "nope.h5")


def test_not_an_hdf5_file(tmp_path):
    path = tmp_path / "text.h5"
    path.write_text("just text")
    with pytest.raises(UserError, match=r"text\.h5.*not an HDF5 file"):
        TokenData(path)


def write_h5(path, attrs=None, **datasets):
    with h5py.File(path, "w") as f:
        f.attrs.update(attrs or {})
        for name, array in datasets.items():
            f[name] = array
    return path


GOOD = {"format": "gpt-tokens", "format_version": 1, "tokenizer": "bytes", "vocab_size": 256}
TOKENS = np.arange(100, dtype=np.uint8)


@pytest.mark.parametrize("attrs, match", [
    ({}, "format attribute None"),
    ({**GOOD, "format": "other"}, "format attribute 'other'"),
    ({**GOOD, "format_version": 2}, "format_version 2"),
    ({k: v for k, v in GOOD.items() if k != "vocab_size"}, "'vocab_size'"),
])
def test_not_a_token_file(tmp_path, attrs, match):
    path = write_h5(tmp_path / "x.h5", attrs, train=TOKENS, val=TOKENS)
    with pytest.raises(UserError, match=match):
        TokenData(path)


def test_missing_dataset(tmp_path):
    path = write_h5(tmp_path / "x.h5", GOOD, train=TOKENS)
    with pytest.raises(UserError, match=r"x\.h5.*'val'"):
        TokenData(path)


def test_split_shorter_than_a_window(data):
    n = len(data.val)
    with pytest.raises(UserError, match=rf"val split .* {n} tokens.*needs at least {n + 1}"):
        BatchLoader(data, "val", n, 4, seed=0)
    with pytest.raises(UserError, match=rf"val split .* {n} tokens"):
        validation_batches(data, n, 4, n_windows=4)
    with pytest.raises(UserError, match="train split"):
        BatchLoader(data, "train", len(data.train), 4, seed=0)


def test_batch_not_divisible_by_dp_size(data):
    loader = BatchLoader(data, "train", BLOCK, 6, seed=0)
    with pytest.raises(UserError, match="batch_size 6.*4"):
        loader.batch(0, 0, 4)
    with pytest.raises(ValueError, match="dp_rank 3"):
        loader.batch(0, 3, 3)


@pytest.mark.parametrize("block, batch", [(0, 4), (BLOCK, 0)])
def test_non_positive_sizes(data, block, batch):
    with pytest.raises(UserError, match="must be a positive integer"):
        BatchLoader(data, "train", block, batch, seed=0)


# --------------------------------------------------------------------------- bad data


@pytest.mark.parametrize("attrs, match", [
    ({**GOOD, "tokenizer": "gpt5"}, r"x\.h5'?: unknown tokenizer 'gpt5': expected one of bytes"),
    ({**GOOD, "vocab_size": 1000}, r"x\.h5' has vocab_size 1000 but its tokenizer 'bytes' has "
                                   "256: expected them to match"),
])
def test_vocab_size_must_be_the_tokenizers(tmp_path, attrs, match):
    path = write_h5(tmp_path / "x.h5", attrs, train=TOKENS, val=TOKENS)
    with pytest.raises(UserError, match=match):
        TokenData(path)


def test_signed_token_ids_are_refused_at_open(tmp_path):
    signed = TOKENS.astype(np.int16)
    signed[10] = -1
    path = write_h5(tmp_path / "x.h5", GOOD, train=signed, val=TOKENS)
    with pytest.raises(UserError) as err:
        TokenData(path)
    assert str(err.value) == (f"{str(path)!r} dataset 'train' has dtype int16: expected "
                              "unsigned integer token ids")


def test_float_token_ids_are_refused_at_open(tmp_path):
    path = write_h5(tmp_path / "x.h5", GOOD, train=TOKENS, val=TOKENS.astype(np.float32))
    with pytest.raises(UserError, match="'val' has dtype float32: expected unsigned integer"):
        TokenData(path)


def file_with_bad_id(tmp_path, max_token=None):
    """A token file whose train split holds id 300 (vocab 256) at position 60."""
    train = np.arange(100, dtype=np.uint16)
    train[60] = 300
    path = write_h5(tmp_path / "x.h5", GOOD, train=train, val=TOKENS)
    if max_token is not None:
        with h5py.File(path, "r+") as f:
            f["train"].attrs["max_token"] = max_token
    return path


def test_id_beyond_vocab_without_max_token_fails_at_the_batch_that_reads_it(tmp_path):
    path = file_with_bad_id(tmp_path)
    with TokenData(path) as data:  # an older file: nothing to check at open
        loader = BatchLoader(data, "train", 9, 4, seed=0)
        steps = [s for s in range(50) if any(st <= 60 < st + 10 for st in loader.starts(s))]
        clean = next(s for s in range(50) if s not in steps)
        loader.batch(clean)
        start = next(st for st in loader.starts(steps[0]) if st <= 60 < st + 10)
        with pytest.raises(UserError) as err:
            loader.batch(steps[0])
    assert str(err.value) == (f"{str(path)!r}: train token 60 (in the window at {start}) is "
                              "300: expected ids below vocab_size 256; run `python -m app "
                              "prepare` again")


def test_id_beyond_vocab_with_max_token_fails_at_open(tmp_path):
    path = file_with_bad_id(tmp_path, max_token=300)
    with pytest.raises(UserError) as err:
        TokenData(path)
    assert str(err.value) == (f"{str(path)!r} dataset 'train' has max_token 300: expected ids "
                              "below vocab_size 256; run `python -m app prepare` again")


def test_id_beyond_vocab_in_validation(tmp_path):
    val = np.arange(100, dtype=np.uint16)
    val[-1] = 256
    path = write_h5(tmp_path / "x.h5", GOOD, train=TOKENS, val=val)
    with TokenData(path) as data:
        batches = validation_batches(data, 9, 4, n_windows=10)
        with pytest.raises(UserError, match=r"val token 99 \(in the window at 90\) is 256"):
            list(batches)


@pytest.fixture
def chunked_h5(tmp_path, monkeypatch):
    """A prepared file of ~10 KB of text in gzip chunks of 1024 tokens."""
    monkeypatch.setattr(prepare_cmd, "CHUNK_TOKENS", 1024)
    (tmp_path / "text.txt").write_text(corpus_text(), encoding="utf-8")
    prepare_cmd.prepare([tmp_path / "text.txt"], tmp_path / "chunked.h5")
    return tmp_path / "chunked.h5"


def test_damaged_chunk_names_file_split_and_tokens(chunked_h5):
    with h5py.File(chunked_h5, "r") as f:
        original = f["train"][:]
    lo, hi = damage_chunk(chunked_h5, "train", 3)
    with TokenData(chunked_h5) as data:
        assert data.train.id.get_num_chunks() > 5
        loader = BatchLoader(data, "train", BLOCK, 8, seed=0)

        def touches(start):
            return start < hi and lo < start + BLOCK + 1

        bad = next(s for s in range(200) if any(map(touches, loader.starts(s))))
        good = [s for s in range(200) if not any(map(touches, loader.starts(s)))][:5]
        start = next(filter(touches, loader.starts(bad)))
        with pytest.raises(UserError) as err:
            loader.batch(bad)
        for step in good:  # the other chunks still read, and read right
            x, _ = loader.batch(step)
            for row, s in enumerate(loader.starts(step)):
                np.testing.assert_array_equal(x[row], original[s:s + BLOCK])
    message = str(err.value)
    assert message.startswith(f"{str(chunked_h5)!r}: cannot read train tokens "
                              f"[{start}, {start + BLOCK + 1}): HDF5 error (")
    assert message.endswith("): the file may be damaged; run `python -m app prepare` again")
    assert "\n" not in message


def test_damaged_chunk_in_validation(chunked_h5):
    damage_chunk(chunked_h5, "val", 0)
    with TokenData(chunked_h5) as data:
        batches = validation_batches(data, BLOCK, 4, n_windows=8)
        with pytest.raises(UserError, match=r"cannot read val tokens \[0, 17\): HDF5 error"):
            list(batches)


def test_damaged_dataset_header_fails_at_open(chunked_h5):
    damage_header(chunked_h5, "val")
    with pytest.raises(UserError) as err:
        TokenData(chunked_h5)
    assert str(err.value).startswith(f"{str(chunked_h5)!r}: cannot read dataset 'val': HDF5 "
                                      "error (")
    assert str(err.value).endswith("the file may be damaged; run `python -m app prepare` again")
