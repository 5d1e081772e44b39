"""comm/backend.py: the array module, device placement, and how buffers reach MPI."""
import numpy as np
import pytest

from comm import backend
from comm.backend import (configure_mpi_buffers, copy_from_host, copy_to_host,
                          forced_host_staging, give_back_host_buffer, needs_staging,
                          take_host_buffer)


def test_host_arrays_reach_mpi_as_they_are():
    assert configure_mpi_buffers("no", np) == "MPI buffers: host arrays"
    assert not needs_staging(np.zeros(3))
    with pytest.raises(ValueError, match="cuda_aware_mpi 'maybe' is not one of auto, yes, no"):
        configure_mpi_buffers("maybe", np)


def test_forced_staging_stages_numpy_buffers_until_it_ends():
    with forced_host_staging():
        assert needs_staging(np.zeros(3))
        with forced_host_staging():
            pass
        assert needs_staging(np.zeros(3))  # an inner one leaves the outer one on
    assert not needs_staging(np.zeros(3))


def test_staging_buffers_are_reused_by_size_and_dtype():
    first = take_host_buffer(1000, np.float32)
    give_back_host_buffer(first)
    assert take_host_buffer(1000, np.float32) is first
    assert take_host_buffer(1000, np.float32) is not first  # taken: a new one
    assert take_host_buffer(1000, np.float64).dtype == np.float64


def test_copies_through_a_staging_buffer_keep_values_and_shape_and_are_counted():
    src = np.arange(12.0).reshape(3, 4)
    host, out = take_host_buffer(12, src.dtype), np.empty((3, 4))
    before = backend.staged_bytes[0]
    copy_to_host(src, host)
    copy_from_host(host, out)
    np.testing.assert_array_equal(out, src)
    assert backend.staged_bytes[0] - before == 2 * src.nbytes


def test_the_mpi_library_answers_or_says_it_cannot():
    pytest.importorskip("mpi4py")
    assert backend.query_cuda_aware_mpi() in (True, False, None)


@pytest.mark.gpu
@pytest.mark.skipif(not backend.gpu_available(), reason="no cupy or no CUDA device here")
def test_device_arrays_stage_unless_mpi_reads_device_memory():
    import cupy
    x = cupy.zeros(4)
    assert "no (--cuda-aware-mpi no)" in configure_mpi_buffers("no", cupy)
    assert needs_staging(x) and not needs_staging(np.zeros(4))
    host = take_host_buffer(4, x.dtype)
    copy_to_host(cupy.arange(4.0), host)
    copy_from_host(host, x)
    np.testing.assert_array_equal(backend.to_host(x), np.arange(4.0))
    assert "yes (--cuda-aware-mpi yes)" in configure_mpi_buffers("yes", cupy)
    assert not needs_staging(x)
    configure_mpi_buffers("auto", cupy)  # the library's own answer, whatever it is


def test_16_bit_floats_without_an_mpi_type_travel_as_their_bits():
    """bfloat16 is a NumPy extension dtype (kind 'V') that MPI has no type for: MPI gets
    a uint16 view of the same memory; float16 and wider types go as they are."""
    from comm.backend import mpi_view
    bf16_like = np.arange(4, dtype=np.uint16).view(np.dtype("V2"))
    view = mpi_view(bf16_like)
    assert view.dtype == np.uint16 and np.shares_memory(view, bf16_like)
    for dtype in (np.float16, np.float32, np.float64):
        x = np.zeros(3, dtype)
        assert mpi_view(x) is x
