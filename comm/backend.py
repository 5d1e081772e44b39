"""The array backend: NumPy on CPU, CuPy on GPU, chosen once per process; and where device
arrays meet MPI.

Model code never imports cupy; it asks `array_module(x)` for the module that owns an array,
so one code path serves both devices. Everything else that knows of devices is here too:
`to_host`, `synchronize`, and how a device buffer reaches MPI.

An MPI library that is not CUDA-aware takes a device pointer for a host one: it crashes or
sends garbage. `configure_mpi_buffers` decides once per process (`--cuda-aware-mpi auto`
asks the library's MPIX_Query_cuda_support, which Open MPI and MPICH 4 have; yes and no
override it) whether device arrays go to MPI as they are, after a stream synchronize, or
through host staging buffers. The transfers of comm/ (ring.py, p2p.py, ps.py) ask
`needs_staging(x)` for each buffer: staged, a send copies its segment into a pinned host
buffer and sends that, a receive lands in one and is copied to the device when it
completes. Staging buffers come from a pool keyed by size, so each step reuses the last
one's: a step's messages have the same sizes every time. `forced_host_staging()` stages
NumPy buffers too, so that the CPU tests run every line of the staging path.
"""
import contextlib
import sys

import numpy as np

DEVICES = ("cpu", "gpu")


class BackendUnavailable(RuntimeError):
    """The asked-for device cannot be used here (the caller decides how to report it)."""


def get_xp(device: str):
    """The array module for `device`: numpy for 'cpu', cupy for 'gpu'."""
    if device == "cpu":
        return np
    if device == "gpu":
        try:
            import cupy
        except ImportError as err:
            raise BackendUnavailable(f"device 'gpu' needs cupy, which failed to import ({err}); "
                                     "install cupy-cuda12x or use device 'cpu'") from None
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise BackendUnavailable("device 'gpu': cupy found no CUDA device; use device 'cpu'")
        return cupy
    raise BackendUnavailable(f"device {device!r} is not one of {', '.join(DEVICES)}")


def gpu_available() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no cupy, no driver, no device: all mean "no GPU here"
        return False


def array_module(x):
    """numpy or cupy, whichever owns `x` (numpy for scalars and host arrays)."""
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return np
    module = type(x).__module__
    if module.startswith("cupy"):
        import cupy
        return cupy
    return np


def to_host(x):
    """A NumPy copy (or the same array) of `x`, wherever it lives."""
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)


def synchronize(xp):
    """Waits for the work queued on the current CUDA stream; a no-op for NumPy. Everything
    here runs on that one stream, so a timer or an MPI call that reads device memory needs
    only this."""
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def use_local_device(local_rank: int) -> int:
    """One rank per GPU: rank `local_rank` of its node takes device local_rank mod the
    devices it sees (all of them, or what CUDA_VISIBLE_DEVICES leaves it); the device id."""
    import cupy
    device = local_rank % cupy.cuda.runtime.getDeviceCount()
    cupy.cuda.Device(device).use()
    return device


# ---- device buffers and MPI -------------------------------------------------------------

CUDA_AWARE_CHOICES = ("auto", "yes", "no")
_STAGING = {"device": False, "all": False}  # stage device arrays; stage every array (tests)
_host_pool = {}  # (dtype, size) -> free host staging buffers
staged_bytes = [0]  # bytes copied through staging buffers, both ways, since the start


def query_cuda_aware_mpi():
    """True or False where the MPI library answers MPIX_Query_cuda_support (Open MPI, MPICH
    4 and later), None where it has no such call."""
    import ctypes

    from mpi4py import MPI
    try:  # the extension module links the MPI library: its symbols resolve through it
        query = ctypes.CDLL(MPI.__file__).MPIX_Query_cuda_support
    except (OSError, AttributeError):
        return None
    query.restype, query.argtypes = ctypes.c_int, []
    return bool(query())


def configure_mpi_buffers(choice: str, xp) -> str:
    """Whether this process hands device arrays to MPI or stages them through host buffers
    (`choice`: --cuda-aware-mpi, one of auto, yes, no); returns the start-up line's words."""
    if choice not in CUDA_AWARE_CHOICES:
        raise ValueError(f"cuda_aware_mpi {choice!r} is not one of "
                         f"{', '.join(CUDA_AWARE_CHOICES)}")
    if xp is np:
        _STAGING["device"] = False
        return "MPI buffers: host arrays"
    if choice == "auto":
        answer = query_cuda_aware_mpi()
        aware = bool(answer)
        source = "MPIX_Query_cuda_support" if answer is not None else \
            "the library has no MPIX_Query_cuda_support; --cuda-aware-mpi yes if it is"
    else:
        aware, source = choice == "yes", f"--cuda-aware-mpi {choice}"
    _STAGING["device"] = not aware
    return f"CUDA-aware MPI: {'yes' if aware else 'no'} ({source}): " + (
        "device buffers go to MPI" if aware else "transfers stage through pinned host buffers")


def needs_staging(x) -> bool:
    """Whether transfers of `x` go through host staging buffers."""
    return _STAGING["all"] or (_STAGING["device"] and not isinstance(x, np.ndarray))


@contextlib.contextmanager
def forced_host_staging():
    """Stages every buffer, NumPy ones included, meanwhile: the CPU tests' way through the
    staging path that a GPU without CUDA-aware MPI takes."""
    before = _STAGING["all"]
    _STAGING["all"] = True
    try:
        yield
    finally:
        _STAGING["all"] = before


def take_host_buffer(size: int, dtype):
    """A 1-D host array of `size` elements: pinned when CuPy is in use (copies to and from
    the device then run at full speed), reused from the pool when one of that size is free."""
    free = _host_pool.get((np.dtype(dtype), size))
    if free:
        return free.pop()
    cupy = sys.modules.get("cupy")
    if cupy is not None and gpu_available():
        import cupyx
        return cupyx.empty_pinned(size, dtype)
    return np.empty(size, dtype)


def give_back_host_buffer(buf):
    _host_pool.setdefault((buf.dtype, buf.size), []).append(buf)


def mpi_view(buf):
    """The buffer as MPI is handed it: 16-bit floats that MPI has no type for (bfloat16, a
    NumPy extension dtype) travel as uint16, their bits unchanged."""
    return buf.view(np.uint16) if buf.dtype.kind == "V" and buf.dtype.itemsize == 2 else buf


def send_buffer(buf):
    """What MPI sends for `buf`: buf itself, or (staged) a host copy of it from the pool,
    which `after_transfer` gives back."""
    if not needs_staging(buf):
        return buf
    host = take_host_buffer(buf.size, buf.dtype)
    copy_to_host(buf, host)
    return host


def receive_buffer(buf):
    """What MPI receives `buf` into: buf itself, or (staged) a host buffer from the pool,
    which `after_transfer` copies into buf."""
    return take_host_buffer(buf.size, buf.dtype) if needs_staging(buf) else buf


def after_transfer(received=(), sent=()):
    """Once the transfers are complete: each staged receive copied into its buffer, and
    every staging buffer back in the pool. received, sent: [(buf, what MPI used for it)]."""
    for buf, used in received:
        if used is not buf:
            copy_from_host(used, buf)
            give_back_host_buffer(used)
    for buf, used in sent:
        if used is not buf:
            give_back_host_buffer(used)


def copy_to_host(src, out):
    """out (a 1-D host array of src.size elements) = src, from the device or the host. A
    device copy runs on the current stream, after the kernels that wrote src, and returns
    once it is done."""
    if isinstance(src, np.ndarray):
        np.copyto(out, src.reshape(-1))
    else:
        src.reshape(-1).get(out=out)
    staged_bytes[0] += out.nbytes


def copy_from_host(src, out):
    """out (any shape, src.size elements) = src (a 1-D host array); returns once src may
    be reused."""
    if isinstance(out, np.ndarray):
        np.copyto(out, src.reshape(out.shape))
    else:
        out.set(src.reshape(out.shape))
        synchronize(array_module(out))
    staged_bytes[0] += src.nbytes


def keep_freed_host_memory():
    """Asks glibc to keep freed memory for reuse instead of returning it to the OS.

    A training step allocates and frees the same few-MB activation arrays every time. By
    default glibc serves each from fresh mmap'd pages (or trims the heap on free), and the
    kernel's page faults and zeroing then cost about a fifth of a small model's step. No-op
    where libc is not glibc.
    """
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    ok = mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)  # glibc's maximum
    ok &= mallopt(M_TRIM_THRESHOLD, 1 << 30)
    return bool(ok)
