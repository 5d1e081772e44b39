"""Reading token files written by `python -m app prepare`, and drawing batches from them.

The token arrays stay on disk: every batch reads just its own windows through h5py, so
a file may be larger than memory.  The global batch of a step depends on `(seed, step)`
only; a data-parallel rank reads its contiguous share of it, so every layout trains on
the same tokens.
"""
from pathlib import Path

import h5py
import numpy as np

from app.errors import damaged_file, UserError
from app.tokenizer import get_tokenizer

FORMAT = "gpt-tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
PREPARE_AGAIN = "run `python -m app prepare` again"

# h5py's default chunk cache is 1 MiB per dataset, i.e. ~16 compressed chunks of 64K
# tokens: random windows over a bigger file would decompress the same chunk again and
# again.  64 MiB holds the whole of a small corpus and a useful share of a large one.
_CACHE_BYTES = 64 << 20
_CACHE_SLOTS = 10007  # a prime well above the number of chunks the cache can hold


def h5_attr(attrs, name):
    """An attribute as a plain Python value (so messages read `2`, not `np.int64(2)`)."""
    value = attrs.get(name)
    if isinstance(value, np.generic):
        value = value.item()
    return value.decode() if isinstance(value, bytes) else value


class TokenData:
    """An open token file: `train` and `val` are h5py datasets, read lazily."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"data file {str(self.path)!r} not found: "
                            "expected an HDF5 token file from `python -m app prepare`")
        try:
            self._file = h5py.File(self.path, "r", rdcc_nbytes=_CACHE_BYTES,
                                   rdcc_nslots=_CACHE_SLOTS)
        except OSError as err:
            raise UserError(f"{str(self.path)!r} is not an HDF5 file ({err}): expected a "
                            "token file from `python -m app prepare`") from None
        try:
            self._validate()
        except OSError as err:
            self._file.close()
            raise damaged_file(repr(str(self.path)), "its metadata", err,
                               PREPARE_AGAIN) from None
        except BaseException:
            self._file.close()
            raise

    def _validate(self):
        attrs, where = self._file.attrs, repr(str(self.path))
        fmt = h5_attr(attrs, "format")
        if fmt != FORMAT:
            raise UserError(f"{where} has format attribute {fmt!r}: expected {FORMAT!r} "
                            "(a token file from `python -m app prepare`)")
        version = h5_attr(attrs, "format_version")
        if version != FORMAT_VERSION:
            raise UserError(f"{where} has format_version {version!r}: this program reads "
                            f"version {FORMAT_VERSION}; run `python -m app prepare` again")
        for name in ("tokenizer", "vocab_size"):
            if name not in attrs:
                raise UserError(f"{where} has no {name!r} attribute: expected one written by "
                                "`python -m app prepare`")
        self.vocab_size = int(h5_attr(attrs, "vocab_size"))
        self.tokenizer = str(h5_attr(attrs, "tokenizer"))
        try:
            expected = get_tokenizer(self.tokenizer).vocab_size
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        if self.vocab_size != expected:
            raise UserError(f"{where} has vocab_size {self.vocab_size} but its tokenizer "
                            f"{self.tokenizer!r} has {expected}: expected them to match; run "
                            "`python -m app prepare` again")
        for name in SPLITS:
            try:
                ds = self._file[name]
            except KeyError as err:  # h5py's word for both a missing and a damaged object
                if name in self._file:
                    raise damaged_file(where, f"dataset {name!r}", err, PREPARE_AGAIN) from None
                ds = None
            if not isinstance(ds, h5py.Dataset) or ds.ndim != 1:
                raise UserError(f"{where} has no 1-D dataset {name!r}: "
                                f"expected datasets {', '.join(SPLITS)}")
            if not np.issubdtype(ds.dtype, np.unsignedinteger):
                raise UserError(f"{where} dataset {name!r} has dtype {ds.dtype}: expected "
                                "unsigned integer token ids")
            # Written by `prepare` since it was added; older files rely on the batch check.
            max_token = h5_attr(ds.attrs, "max_token")
            if max_token is not None and max_token >= self.vocab_size:
                raise UserError(f"{where} dataset {name!r} has max_token {max_token}: expected "
                                f"ids below vocab_size {self.vocab_size}; run "
                                "`python -m app prepare` again")
            setattr(self, name, ds)

    def split(self, name: str) -> h5py.Dataset:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)

    def windows(self, split: str, starts, length: int):
        """Rows `split[s : s + length]` for each start: x and y (x shifted by one), int64.

        A damaged chunk or an id >= vocab_size is a UserError naming the tokens."""
        dataset, where = self.split(split), repr(str(self.path))
        windows = np.empty((len(starts), length), dtype=np.int64)
        for row, start in enumerate(starts):
            try:
                windows[row] = dataset[start:start + length]
            except OSError as err:
                raise damaged_file(where, f"{split} tokens [{start}, {start + length})", err,
                                   PREPARE_AGAIN) from None
        if windows.size and windows.max() >= self.vocab_size:  # unsigned: never below 0
            row, col = np.argwhere(windows >= self.vocab_size)[0]
            raise UserError(f"{where}: {split} token {starts[row] + col} (in the window at "
                            f"{starts[row]}) is {windows[row, col]}: expected ids below "
                            f"vocab_size {self.vocab_size}; run `python -m app prepare` again")
        return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])

    def require_tokens(self, split: str, block_size: int):
        """UserError unless `split` holds at least one window of `block_size + 1` tokens."""
        n = len(self.split(split))
        if n < block_size + 1:
            raise UserError(f"the {split} split of {str(self.path)!r} has {n} tokens: "
                            f"block_size {block_size} needs at least {block_size + 1}; "
                            "use a longer corpus or a smaller block_size")

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _positive(name: str, value: int):
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")


class BatchLoader:
    """Random windows of `block_size + 1` tokens from one split.

    `batch(step)` is the global batch of `step`; `batch(step, r, n)` is rows
    `r*b:(r+1)*b` of it with `b = batch_size // n`, and reads only those rows.
    """

    def __init__(self, data: TokenData, split: str, block_size: int, batch_size: int,
                 seed: int):
        _positive("block_size", block_size)
        _positive("batch_size", batch_size)
        data.require_tokens(split, block_size)
        self.split, self.block_size, self.batch_size, self.seed = \
            split, block_size, batch_size, seed
        self._data = data
        self._n_starts = len(data.split(split)) - block_size

    def starts(self, step: int) -> np.ndarray:
        """The global batch's start offsets: a function of (seed, step) alone."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, self._n_starts, size=self.batch_size)

    def batch(self, step: int, dp_rank: int = 0, dp_size: int = 1):
        mine = self.starts(step)[rank_rows(self.batch_size, dp_rank, dp_size)]
        return self._data.windows(self.split, mine, self.block_size + 1)


def rank_rows(batch_size: int, dp_rank: int, dp_size: int) -> slice:
    """The rows of a global batch that data-parallel rank `dp_rank` of `dp_size` takes."""
    if dp_size < 1 or batch_size % dp_size:
        raise UserError(f"batch_size {batch_size} must be divisible by the "
                        f"data-parallel size {dp_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} out of range for dp_size {dp_size}")
    b = batch_size // dp_size
    return slice(dp_rank * b, (dp_rank + 1) * b)


def validation_starts(n_tokens: int, block_size: int, n_windows: int) -> np.ndarray:
    """Evenly spaced, non-overlapping window starts covering a split of `n_tokens`.

    At most `n_tokens // (block_size + 1)` windows: beyond that they would overlap and
    count the same tokens twice.  No RNG, so the set is the same for every step and run.
    """
    window = block_size + 1
    k = max(1, min(n_windows, n_tokens // window))
    return (np.arange(k) * (n_tokens - window)) // max(k - 1, 1)


def validation_batches(data: TokenData, block_size: int, batch_size: int, n_windows: int):
    """The fixed validation windows of the `val` split, as (x, y) batches of up to
    `batch_size` rows (the last one may be smaller)."""
    _positive("block_size", block_size)
    _positive("batch_size", batch_size)
    _positive("n_windows", n_windows)
    data.require_tokens("val", block_size)
    starts = validation_starts(len(data.val), block_size, n_windows)

    def batches():
        for i in range(0, len(starts), batch_size):
            yield data.windows("val", starts[i:i + batch_size], block_size + 1)

    # Errors above are raised at the call, not at the first next().
    return batches()
