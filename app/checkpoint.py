"""Parameters on disk: one HDF5 file of logical tensors under their GPT-2 names.

Written under a temporary name and renamed, so a file that exists is complete.
"""
import h5py

from app.atomic import replacing
from app.errors import damaged_file, UserError
from comm.backend import to_host

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
