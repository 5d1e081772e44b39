"""The array backend: NumPy on CPU, CuPy on GPU, chosen once per process.

Model code never imports cupy; it asks `array_module(x)` for the module that owns an array,
so one code path serves both devices.
"""
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
