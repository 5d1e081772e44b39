"""Real damage to HDF5 files, for the tests of the errors it must cause."""
import h5py


def damage_chunk(path, split, index):
    """Overwrite chunk `index` of `split` with zeros (no longer a gzip stream); its tokens."""
    with h5py.File(path, "r") as f:
        ds = f[split]
        info = ds.id.get_chunk_info(index)
        first = info.chunk_offset[0]
        tokens = (first, min(first + ds.chunks[0], len(ds)))
    with open(path, "r+b") as f:
        f.seek(info.byte_offset)
        f.write(bytes(info.size))
    return tokens


def damage_header(path, name):
    """Overwrite the start of object `name`'s header: h5py still lists it, cannot open it."""
    with h5py.File(path, "r") as f:
        header = h5py.h5o.get_info(f[name].id).addr
    with open(path, "r+b") as f:
        f.seek(header)
        f.write(b"\xff" * 16)
