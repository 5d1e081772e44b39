"""Nothing half-written: a file appears under its final name complete, or not at all.

Every file the program writes for later (token files, config.toml, params.h5, checkpoint
shards and manifests) is written under a temporary name beside its target, flushed to disk
(`fsync`), renamed onto the target (atomic on POSIX filesystems), and the directory entry
is flushed too, so that a crash at any moment leaves either the old file or the new one.
"""
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from app.errors import UserError


def output_file(out) -> Path:
    """`out` as a Path; a one-line UserError if it names a directory (a file is expected)."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"output {str(out)!r} is a directory: expected a file name like "
                        "data/NAME.h5")
    return out


def fsync_path(path):
    """Flushes a file's data, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replacing(target):
    """Yields a temporary path beside `target` for the block to write (a file or a
    directory); then syncs it and renames it onto `target`. If the block or the rename
    fails, the temporary is removed and the target is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Hidden, and not mkstemp: its 0600 mode would survive the rename; the pid keeps
    # concurrent writers apart.
    tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
    try:
        yield tmp
        if tmp.is_dir():
            for child in tmp.iterdir():
                fsync_path(child)
        fsync_path(tmp)
        os.replace(tmp, target)
        fsync_path(target.parent)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_text(path, text: str):
    """Writes `text` (UTF-8) to `path` atomically."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
