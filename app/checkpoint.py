"""Parameters and training state on disk, as logical tensors under their GPT-2 names.

`save_params`/`load_params`: one HDF5 file of the final parameters (params.h5).
`save_checkpoint`/`load_checkpoint`: the whole training state, sharded over the ranks that
own it, loadable into any layout (see the block comment below).
"""
import json
import os
import shutil
import time
from contextlib import contextmanager
import tomllib
import zlib
from pathlib import Path

import h5py
import numpy as np

from app.atomic import fsync_path, replacing
from app.errors import damaged_file, UserError
from app.parallel.state import checkpoint_names, placement
from app.parallel.precision import master_dtype_of
from comm import watchdog
from comm.backend import array_module, to_host
from models.gpt import param_shapes
from models.sharding import padded_vocab

FORMAT = "gpt-params"


def save_params(path, params: dict, attrs: dict | None = None):
    """params: name -> array (NumPy or CuPy); attrs: extra file attributes (step, config...).
    Written atomically (app/atomic.py)."""
    with replacing(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = 1
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
        for name, value in params.items():
            f.create_dataset(name, data=to_host(value))


def load_params(path) -> tuple[dict, dict]:
    """(name -> NumPy array, file attributes), checking the file is one of ours."""
    try:
        f = h5py.File(path, "r")
    except (FileNotFoundError, OSError) as err:
        raise UserError(f"parameter file {path}: cannot open as HDF5 ({err})") from None
    with f:
        what = "its attributes"
        try:
            attrs = dict(f.attrs)
            if attrs.get("format") != FORMAT:
                raise UserError(f"parameter file {path}: not written by `app train` (attribute "
                                f"format={attrs.get('format')!r}, expected {FORMAT!r})")
            params = {}
            for name in f:
                what = repr(name)
                obj = f[name]  # a KeyError here is a damaged object header
                if isinstance(obj, h5py.Dataset):
                    params[name] = obj[()]
        except (OSError, KeyError) as err:
            raise damaged_file(f"parameter file {path}", what, err, "train the run again") \
                from None
    return params, attrs


# --------------------------------------------------------------------------- checkpoints
#
# A checkpoint is a directory checkpoints/step_XXXXXXXX/ of a run:
#
#   rank_NNNNN.h5   what rank NNNNN owns: boxes of logical tensors, as datasets
#                   {param,m,v}/<name>/<k> with attributes `start` (per axis) and `crc32`
#   model.h5        HDF5 virtual datasets {param,m,v}/<name>: each whole logical tensor,
#                   mapped onto the boxes in the rank files (for h5ls, h5py and resume)
#   manifest.json   written last: format, step, AdamW's step count, config, layout, and
#                   every box with its file and checksum. No manifest, no checkpoint.
#
# A rank holds its tensors (and, under ZeRO-1, its share of the moments) as flat ranges of
# one buffer; a flat range of a C-order tensor is a short run of boxes (`boxes`), so the
# box is the one unit of storage; a tensor-parallel share is cut into boxes by its pieces
# of the logical tensor (models.sharding.tp_pieces), so a file never knows the layout.
# Data-parallel replicas write once (dp rank 0; under ZeRO-1 each rank its own moments),
# the tied wte once (the first stage). Each rank writes its own file; rank 0 binds them.
# Everything goes into checkpoints/.step_XXXXXXXX.tmp/, renamed once the manifest is in.

CKPT_FORMAT, CKPT_VERSION = "gpt-checkpoint", 1
MANIFEST, VIEW = "manifest.json", "model.h5"
KINDS = ("param", "m", "v")
# What must match between a checkpoint and the run that resumes it; everything else
# (steps, learning rates, intervals, the layout, the data file) may change.
MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "n_classes", "pool",
                "dtype")


class CheckpointError(Exception):
    """A checkpoint directory that cannot be used: partial, damaged or foreign."""


def boxes(lo: int, hi: int, shape) -> list:
    """Elements [lo, hi) of a C-order tensor of `shape` (ndim >= 1) as consecutive boxes
    (flat start, start per axis, shape per axis), each one contiguous in flat order."""
    shape = tuple(shape)
    if lo >= hi:
        return []
    if len(shape) == 1:
        return [(lo, (lo,), (hi - lo,))]
    row = int(np.prod(shape[1:]))
    first = lo // row
    if lo % row or hi < (first + 1) * row:  # a part of one row: that row's own boxes
        stop = min(hi, (first + 1) * row)
        head = [(first * row + f, (first,) + s, (1,) + b)
                for f, s, b in boxes(lo - first * row, stop - first * row, shape[1:])]
        return head + boxes(stop, hi, shape)
    whole = hi // row  # rows first .. whole-1 are complete
    return [(lo, (first,) + (0,) * (len(shape) - 1), (whole - first,) + shape[1:])] + \
        boxes(whole * row, hi, shape)


def _pieces(shapes: dict, ranges, names):
    """(name, lo, hi, at): elements [lo, hi) of tensor `name` (one of `names`) sit at `at`
    in a buffer that packs the flat `ranges` of the layout `shapes` one after another."""
    bounds, offset = {}, 0
    for name, shape in shapes.items():
        bounds[name] = (offset, offset + int(np.prod(shape)))
        offset = bounds[name][1]
    at = 0
    for a, b in ranges:
        for name in shapes:
            start, stop = bounds[name]
            lo, hi = max(a, start), min(b, stop)
            if lo < hi and name in names:
                yield name, lo - start, hi - start, at + lo - a
        at += b - a


def _crc(array) -> int:
    return zlib.crc32(np.ascontiguousarray(array).view(np.uint8))


def _placed(start, shape, placed):
    """(logical start, index into the local box) of each part of the local box at `start`
    of `shape`: the box itself for a whole tensor, else its intersection with each
    tensor-parallel piece (axis, [(local start, logical start, length)])."""
    if placed is None:
        yield list(start), ()
        return
    axis, pieces = placed
    lo_box, hi_box = start[axis], start[axis] + shape[axis]
    for local, logical, length in pieces:
        lo, hi = max(lo_box, local), min(hi_box, local + length)
        if lo < hi:
            at = list(start)
            at[axis] = lo - local + logical
            part = [slice(None)] * len(shape)
            part[axis] = slice(lo - lo_box, hi - lo_box)
            yield at, tuple(part)


def _selection(start, shape):
    return tuple(slice(s, s + n) for s, n in zip(start, shape))


def checkpoint_dir(run_dir, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def list_checkpoints(run_dir) -> list:
    """The checkpoint directories of a run, newest first (temporaries of unfinished saves,
    hidden, are not listed)."""
    root = Path(run_dir) / "checkpoints"
    return sorted(root.glob("step_*"), reverse=True) if root.is_dir() else []


def save_checkpoint(comm, run_dir, step: int, params, optimizer, param_names, moment_names,
                    meta: dict, keep: int = 0, placement=None, param_ranges=None) -> Path:
    """Writes this rank's share of the training state; rank 0 binds the shares and keeps
    the newest `keep` checkpoints (0: all). Collective over `comm`.

    params: this rank's FlatParams; optimizer: its AdamW (m, v pack `optimizer.ranges`);
    param_names, moment_names: the tensors whose values, and moments, this rank writes;
    meta: "config" (TOML), "layout", "shapes" (logical, every tensor), "dtype", "tokenizer";
    placement: name -> where a tensor-parallel share sits in the logical tensor
    (models.sharding.tp_pieces; missing or None: the whole tensor); param_ranges: the flat
    ranges of `params` this rank writes values of (default all; a parameter server: its
    shard); optimizer None: no moments here (a parameter server's worker)."""
    where = placement or {}
    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".{final.name}.tmp"
    rank = comm.Get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save of this step that died midway
        tmp.mkdir(parents=True)
    with watchdog.waiting("rank 0 to create the checkpoint directory"):
        comm.Barrier()
    buffers = [("param", params.flat, param_ranges or [(0, params.size)], param_names)]
    if optimizer is not None:
        buffers += [("m", optimizer.m, optimizer.ranges, moment_names),
                    ("v", optimizer.v, optimizer.ranges, moment_names)]
    file_name, listing = f"rank_{rank:05d}.h5", []
    for kind, buf, ranges, names in buffers:
        flat = to_host(buf)
        if kind == "param" and param_ranges:  # packed like the moments' ranges
            flat = np.concatenate([flat[a:b] for a, b in param_ranges])
        for name, lo, hi, at in _pieces(params.shapes, ranges, set(names)):
            for first, start, shape in boxes(lo, hi, params.shapes[name]):
                at_box = at + first - lo
                box = flat[at_box:at_box + int(np.prod(shape))].reshape(shape)
                for logical_start, part in _placed(start, shape, where.get(name)):
                    data = box[part]
                    listing.append(({"kind": kind, "tensor": name,
                                     "path": f"{kind}/{name}/{len(listing)}",
                                     "start": logical_start, "shape": list(data.shape),
                                     "crc32": _crc(data)}, data))
    if listing:
        with h5py.File(tmp / file_name, "w") as f:
            for box, data in listing:
                dataset = f.create_dataset(box["path"], data=data)
                dataset.attrs["start"], dataset.attrs["crc32"] = box["start"], box["crc32"]
        fsync_path(tmp / file_name)
    with watchdog.waiting("the other ranks' checkpoint files"):
        listings = comm.gather((file_name, [box for box, _ in listing]), root=0)
    if rank == 0:
        files = {name: boxes_ for name, boxes_ in listings if boxes_}
        _write_view(tmp / VIEW, files, meta["shapes"], master_dtype_of(meta["dtype"]))
        manifest = {"format": CKPT_FORMAT, "version": CKPT_VERSION, "step": step,
                    "adam_t": optimizer.t, "config": meta["config"], "layout": meta["layout"],
                    "dtype": meta["dtype"], "tokenizer": meta.get("tokenizer", "bytes"),
                    "shapes": {n: list(s) for n, s in meta["shapes"].items()}, "files": files}
        if meta.get("loss_scale"):  # float16's dynamic scale: a resume goes on with it
            manifest["loss_scale"] = meta["loss_scale"]
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        fsync_path(tmp / MANIFEST)
        fsync_path(tmp / VIEW)
        fsync_path(tmp)
        if final.exists():  # a save of the same step by an earlier job: replaced whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(final.parent)
        for old in (list_checkpoints(run_dir)[keep:] if keep else []):
            shutil.rmtree(old, ignore_errors=True)  # only now that a newer one is complete
        for stale in final.parent.glob(".step_*.tmp"):  # saves of killed jobs (the run's
            shutil.rmtree(stale, ignore_errors=True)    # lock: no other job is saving)
    return final


def _write_view(path, files: dict, shapes: dict, dtype):
    by_tensor = {}
    for file_name, listing in files.items():
        for box in listing:
            by_tensor.setdefault((box["kind"], box["tensor"]), []).append((file_name, box))
    with h5py.File(path, "w") as f:
        f.attrs["format"] = CKPT_FORMAT
        f.attrs["description"] = ("whole logical tensors (param, AdamW moments m and v) "
                                  "mapped onto the rank files of this checkpoint")
        for (kind, name), parts in by_tensor.items():
            layout = h5py.VirtualLayout(tuple(shapes[name]), dtype)
            for file_name, box in parts:
                layout[_selection(box["start"], box["shape"])] = h5py.VirtualSource(
                    file_name, box["path"], shape=tuple(box["shape"]))
            f.create_virtual_dataset(f"{kind}/{name}", layout, fillvalue=np.nan)


def read_manifest(path) -> dict:
    """The manifest of checkpoint `path`; CheckpointError if missing or foreign."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError("no manifest.json (a save that did not finish)") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"manifest.json cannot be read ({err})") from None
    found = (manifest.get("format"), manifest.get("version"))
    if found != (CKPT_FORMAT, CKPT_VERSION):
        raise CheckpointError(f"format {found[0]!r} version {found[1]!r}: expected "
                              f"{CKPT_FORMAT!r} version {CKPT_VERSION}")
    return manifest


def verify_checkpoint(path) -> dict:
    """The manifest of checkpoint `path` once every box has been read back, matched against
    its checksum, and the boxes found to cover every tensor; CheckpointError otherwise."""
    path = Path(path)
    manifest = read_manifest(path)
    covered = {}
    for file_name, listing in manifest["files"].items():
        try:
            with h5py.File(path / file_name, "r") as f:
                for box in listing:
                    data = f[box["path"]][()]
                    if list(data.shape) != box["shape"] or _crc(data) != box["crc32"]:
                        raise CheckpointError(f"{file_name}: {box['path']} does not match its "
                                              "checksum")
                    key = (box["kind"], box["tensor"])
                    covered[key] = covered.get(key, 0) + data.size
        except (OSError, KeyError) as err:
            raise CheckpointError(f"{file_name} cannot be read ({err})") from None
    for name, shape in manifest["shapes"].items():
        for kind in KINDS:
            if covered.get((kind, name), 0) != int(np.prod(shape)):
                raise CheckpointError(f"the {kind} boxes of {name!r} do not cover it")
    if not (path / VIEW).is_file():
        raise CheckpointError(f"{VIEW} is missing")
    return manifest


def load_checkpoint(path, params, optimizer, placement=None) -> int:
    """Fills this rank's parameters and AdamW state from a verified checkpoint, whatever
    layout saved it, reading just the boxes this rank holds (`placement` as for
    `save_checkpoint`); returns the step."""
    manifest = read_manifest(path)
    where = placement or {}
    xp = array_module(params.flat)
    with h5py.File(Path(path) / VIEW, "r") as view:
        for kind, buf, ranges in (("param", params.flat, [(0, params.size)]),
                                  ("m", optimizer.m, optimizer.ranges),
                                  ("v", optimizer.v, optimizer.ranges)):
            host = np.zeros(buf.shape, buf.dtype)  # rows no file holds (padding) stay 0
            for name, lo, hi, at in _pieces(params.shapes, ranges, params.shapes):
                dataset = view[f"{kind}/{name}"]
                for first, start, shape in boxes(lo, hi, params.shapes[name]):
                    at_box = at + first - lo
                    box = host[at_box:at_box + int(np.prod(shape))].reshape(shape)
                    for logical_start, part in _placed(start, shape, where.get(name)):
                        box[part] = dataset[_selection(logical_start, box[part].shape)]
            buf[...] = xp.asarray(host)
    optimizer.t = manifest["adam_t"]
    return manifest["step"]


def find_resume(run_dir, resume, warn) -> Path | None:
    """The checkpoint to resume from: for "auto" the newest valid one in `run_dir` (None if
    there is none; invalid ones are skipped with a warning), else the directory `resume`."""
    if resume == "auto":
        for path in list_checkpoints(run_dir):
            try:
                verify_checkpoint(path)
                return path
            except CheckpointError as err:
                warn(f"warning: skipping checkpoint {path}: {err}")
        return None
    try:
        verify_checkpoint(resume)
    except CheckpointError as err:
        raise UserError(f"--resume {resume}: {err}: expected a checkpoint directory "
                        "(RUN/checkpoints/step_N) or auto") from None
    return Path(resume)


def check_resumable(path, cfg):
    """UserError naming the first model field in which config `cfg` differs from the
    config checkpoint `path` was saved with."""
    saved = tomllib.loads(read_manifest(path)["config"])
    defaults = type(cfg)()  # a key older checkpoints lack had its default value
    for field in MODEL_FIELDS:
        value = saved.get(field, getattr(defaults, field))
        if value != getattr(cfg, field):
            raise UserError(f"checkpoint {path} was saved with {field} = {value!r} "
                            f"but the config says {field} = {getattr(cfg, field)!r}: expected "
                            f"the model fields ({', '.join(MODEL_FIELDS)}) to match")


def read_checkpoint_params(path, flag="--checkpoint") -> tuple[dict, dict]:
    """(manifest, name -> whole logical parameter) of a checkpoint, verified first;
    UserError, naming `flag`, if it cannot be used."""
    try:
        manifest = verify_checkpoint(path)
    except CheckpointError as err:
        raise UserError(f"{flag} {path}: {err}: expected a checkpoint directory "
                        "(RUN/checkpoints/step_N)") from None
    with h5py.File(Path(path) / VIEW, "r") as view:
        params = {name: view[f"param/{name}"][()] for name in manifest["shapes"]}
    return manifest, params


def training_meta(cfg, layout, tokenizer) -> dict:
    """What a checkpoint's manifest says of the run (save_checkpoint's `meta`)."""
    model_cfg = cfg.model_config()
    return {"config": cfg.to_toml(), "dtype": cfg.dtype, "tokenizer": tokenizer,
            "shapes": param_shapes(model_cfg),
            "layout": {"world": layout.world, "dp": layout.dp, "pp": layout.pp,
                       "tp": layout.tp, "zero": cfg.zero, "schedule": layout.schedule,
                       "chunks": layout.chunks, "micro_batches": layout.micro_batches,
                       "sequence_parallel": layout.sequence_parallel,
                       "padded_vocab": padded_vocab(model_cfg, layout.tp),
                       "mode": layout.mode, "servers": layout.servers}}


def save_training_state(cfg, layout, engine, grid, run_dir, step, tokenizer, log):
    """A checkpoint of step `step` from every rank of the grid: each writes what it alone
    owns (app/parallel/state.py), as logical tensors; logs the path and time."""
    values, moments = checkpoint_names(engine, cfg.zero, grid.coords.dp)
    meta = training_meta(cfg, layout, tokenizer)
    if engine.mixed and engine.mixed.dynamic:
        meta["loss_scale"] = engine.mixed.state()
    with saving(run_dir, step, cfg.steps, log):
        save_checkpoint(grid.comm, run_dir, step, engine.params, engine.optimizer, values,
                        moments, meta, cfg.keep, placement(engine))


@contextmanager
def saving(run_dir, step, steps, log):
    """Times a save and logs it; a failed write is the user's to fix (one line)."""
    start = time.perf_counter()
    try:
        yield
    except OSError as err:
        raise UserError(f"cannot write a checkpoint of step {step} in {run_dir} "
                        f"({err.strerror or err}): expected a writable run directory with "
                        "free space") from None
    log(f"step {step:5d}/{steps} | saved {checkpoint_dir(run_dir, step)} in "
        f"{time.perf_counter() - start:.2f} s")
